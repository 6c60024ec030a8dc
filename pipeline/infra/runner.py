"""What every command-line entry point shares: the argument parser with generated params help, and the wrapper
that turns user mistakes into one line.

A stage's `main()` builds its parser with :func:`stage_parser` (its docstring is the description; the epilog lists
the params it reads, with their defaults from pipeline/infra/config.py, so `--help` never disagrees with the code)
and runs under :func:`run_main`: one log line at start and end, a run-log record, and a PipelineError printed as
one line with exit code 2.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Callable

from pipeline.infra.config import params_help
from pipeline.infra.errors import PipelineError


def stage_parser(prog: str, doc: str | None, sections: tuple[str, ...] = (), params: bool = True,
                 epilog: str = "") -> argparse.ArgumentParser:
    """An ArgumentParser whose help is the stage's docstring plus its params (keys, defaults, speed-only marks).

    Args:
        prog: the command, e.g. ``python -m pipeline.extract``.
        doc: the stage module's docstring.
        sections: params.yaml sections (or ``heads.mlp``-style subsections) this stage reads.
        params: add the ``--params`` option.
        epilog: extra text after the params list.
    """
    text = "\n".join(part for part in (params_help(sections) if sections else "", epilog) if part)
    parser = argparse.ArgumentParser(prog=prog, description=doc, epilog=text or None,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    if params:
        parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                            help="params file (default: %(default)s)")
    return parser


def run_main(main: Callable[[], None], stage: str) -> None:
    """Runs a stage's `main`: one log line at start and end, a run-log record, PipelineError as one line + exit 2,
    Ctrl-C (KeyboardInterrupt) as one line + exit 130.

    Also applies the pinned torch thread count, and says at start when the CPU numerics are not pinned.
    """
    from pipeline.infra import numerics, runlog
    from pipeline.infra.runtime import pin_torch_threads, setup_logging

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
    except KeyboardInterrupt:
        # Ctrl-C is a choice, not a crash: one line instead of a traceback through torch/h5py, and the shell's
        # conventional 130 (128 + SIGINT). Outputs are written atomically, so nothing half-written is left.
        status = "interrupted"
        log.debug("interrupted", exc_info=True)
        print(f"{stage}: interrupted (Ctrl-C); nothing half-written was left: rerun to continue", file=sys.stderr)
        sys.exit(130)
    except SystemExit as exc:
        status = "ok" if exc.code in (0, None) else "error"
        raise
    finally:
        seconds = time.perf_counter() - t0
        if not {"-h", "--help"} & set(sys.argv[1:]):  # printing help is not a run
            runlog.write_record(stage, started, seconds, status)
            log.info("%s: %s in %.1f s (run log: %s)", stage,
                     {"ok": "done", "interrupted": "interrupted"}.get(status, "failed"),
                     seconds, runlog.record_path(stage))
