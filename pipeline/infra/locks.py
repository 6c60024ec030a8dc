"""One writer per output: an exclusive lock file beside it that names its holder.

Two runs writing the same output (two `python -m pipeline.extract --out X`, or a manual run beside `dvc repro`)
would delete each other's checkpoints and fail with a misleading message; the second one now stops at once and says
who holds the output. `fcntl.flock` locks are released by the kernel when the holder dies, so a killed run never
leaves a lock that blocks the next one (its lock file may stay; it is reused).
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Iterator

from pipeline.infra.errors import PipelineError

log = logging.getLogger(__name__)


class OutputLockedError(PipelineError, BlockingIOError):
    """Another process holds the output's lock; the message names it (pid, host)."""


def lock_path(out: Path | str) -> Path:
    """The hidden lock file of output `out`: `.<name>.lock` in the same folder."""
    out = Path(out)
    return out.with_name(f".{out.name}.lock")


@contextlib.contextmanager
def exclusive_output(out: Path | str) -> Iterator[Path]:
    """Holds the exclusive lock of output `out` for the block; raises OutputLockedError when another process has it.

    The lock file is removed on release. A run that opened the file just before that removal would lock an unlinked
    file, so after locking, the file at the path must still be the one locked (same inode), else it tries again.
    """
    path = lock_path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputLockedError(
                f"'{out}' is being written by another process ({holder}); wait for it to finish, or stop it, "
                f"then run again (lock file: {path})") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its previous holder had just removed: take the current one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        os.close(fd)  # closing releases the lock, after the removal (see the docstring)
