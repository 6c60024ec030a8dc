"""The one base class for mistakes a user can fix (bad params, bad data, wrong weights, stale caches).

Stage entry points (pipeline/infra/runner.py) catch it and print a single line that says what to fix, with a non-zero
exit code, instead of a traceback; everything else (bugs, crashes) keeps its traceback.
"""
from __future__ import annotations


class PipelineError(Exception):
    """A problem with the inputs or settings, described in words the user can act on."""
