"""The feature cache: extraction (input path, resumable checkpoints, torchrun shards), the HDF5 file and its
stale-features check, and the feature store that keeps rows across runs.
"""
