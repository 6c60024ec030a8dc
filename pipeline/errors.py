"""The one base class for mistakes a user can fix (bad params, bad data, wrong weights, stale caches).

Stage entry points catch it and print a single line that says what to fix, with a non-zero exit code, instead of a
traceback; everything else (bugs, crashes) keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable


class PipelineError(Exception):
    """A problem with the inputs or settings, described in words the user can act on."""


def run_main(main: Callable[[], None], stage: str) -> None:
    """Runs a stage's `main`, turning a PipelineError into one clear line and exit code 2."""
    try:
        main()
    except PipelineError as exc:
        logging.getLogger(f"pipeline.{stage}").debug("failed", exc_info=True)
        print(f"{stage}: error: {exc}", file=sys.stderr)
        sys.exit(2)
