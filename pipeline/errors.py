"""The one base class for mistakes a user can fix (bad params, bad data, wrong weights, stale caches), and the
wrapper every stage's entry point runs under.

Stage entry points catch it and print a single line that says what to fix, with a non-zero exit code, instead of a
traceback; everything else (bugs, crashes) keeps its traceback. Every run, failed or not, gets a run-log record.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Callable


class PipelineError(Exception):
    """A problem with the inputs or settings, described in words the user can act on."""


def run_main(main: Callable[[], None], stage: str) -> None:
    """Runs a stage's `main`: one log line at start and end, a run-log record, PipelineError as one line + exit 2.

    Also applies the pinned torch thread count, and says at start when the CPU numerics are not pinned.
    """
    from pipeline import numerics, runlog
    from pipeline.runtime import pin_torch_threads, setup_logging

    setup_logging()
    pin_torch_threads()
    log = logging.getLogger(f"pipeline.{stage}")
    if not {"-h", "--help"} & set(sys.argv[1:]):
        log.info("%s: start", stage)
        numerics.log_status(log)  # one line, only when the CPU numerics are native or not fully pinned
    started, t0 = time.time(), time.perf_counter()
    status = "error"
    try:
        main()
        status = "ok"
    except PipelineError as exc:
        log.debug("failed", exc_info=True)
        print(f"{stage}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except SystemExit as exc:
        status = "ok" if exc.code in (0, None) else "error"
        raise
    finally:
        seconds = time.perf_counter() - t0
        if not {"-h", "--help"} & set(sys.argv[1:]):  # printing help is not a run
            runlog.write_record(stage, started, seconds, status)
            log.info("%s: %s in %.1f s (run log: %s/%s.json)", stage, "done" if status == "ok" else "failed",
                     seconds, runlog.run_dir(), stage)
