"""Plumbing shared by every stage: typed params, errors, the entry-point runner, process set-up, torchrun, the run
log and atomic artefact writes. It imports nothing from pipeline.core or from the stage modules."""
