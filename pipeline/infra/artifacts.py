"""Writing and reading the files that later stages trust: atomically, deterministically, without pickle."""
from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from pipeline.infra.errors import PipelineError

# Read once, at import (single-threaded): os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _temp_prefix(path: Path) -> str:
    # host and pid in the name: a later writer can tell a dead writer's leftover from a live writer's file,
    # also on a file system shared between machines
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(path: Path | str) -> list[Path]:
    """Deletes the temporaries of `path` that writers killed on this host left behind; returns them.

    SIGKILL skips every cleanup, so a killed writer's temporary stays beside its target (never *as* the target).
    """
    path = Path(path)
    host_prefix = f".{path.name}.{socket.gethostname()}."
    removed = []
    for tmp in path.parent.glob(f"{glob.escape(host_prefix)}*.tmp"):
        pid = tmp.name[len(host_prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


class DiskFullError(PipelineError, OSError):
    """No space left for an output; the message names the path, the bytes it needs and the bytes free."""


# How "no space left" arrives: OSError errno 28 from Python, "errno = 28" inside h5py's HDF5 error stack, and the
# Rust io::Error text from safetensors ("StorageFull", "No space left on device"), none of them an OSError errno.
_ENOSPC_TEXT = ("No space left on device", "errno = 28", "StorageFull", "code: 28")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) says the device is full."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return True
        if any(text in str(exc) for text in _ENOSPC_TEXT):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def free_bytes(folder: Path | str) -> int:
    """Free bytes for an unprivileged writer on the file system of `folder` (its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists():
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_free_space(path: Path | str, needed: int, what: str) -> None:
    """Raises DiskFullError before any work when the file system of `path` has less than `needed` bytes free.

    Why up front: a file system that fills half way costs the run, and h5py may crash (segfault, exit 139, no
    message) instead of raising.
    """
    free = free_bytes(Path(path).parent)
    if free < needed:
        raise DiskFullError(f"not enough free space for {what} '{path}': it needs about {needed:,} bytes, "
                            f"{free:,} are free on its file system; free some space or write it elsewhere")


@contextlib.contextmanager
def atomic_path(path: Path | str, needed: int | None = None) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renames it into place only if the block finishes.

    A killed or failing writer therefore never leaves a truncated file where a later stage (or DVC) reads it, and
    the next writer of the same path removes what a killed one left behind. A full disk (ENOSPC, however the
    library writing reports it) becomes a DiskFullError naming `path` and the bytes needed (`needed`, when the
    caller knows it; else what had been written), with the temporary removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if is_disk_full(exc):
            raise _disk_full(path, needed, 0) from None
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes it private (0600); give what a plain open() would
        os.replace(tmp_path, path)
    except Exception as exc:
        if isinstance(exc, DiskFullError) or not is_disk_full(exc):
            raise
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        raise _disk_full(path, needed, written) from None
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def _disk_full(path: Path, needed: int | None, written: int) -> DiskFullError:
    need = f"about {needed:,} bytes" if needed else f"more than the {written:,} bytes written"
    return DiskFullError(f"no space left on the device while writing '{path}': it needs {need}, "
                         f"{free_bytes(path.parent):,} bytes are free (the temporary file was removed); free some "
                         "space or write it elsewhere, then rerun")


def write_json(path: Path | str, obj: Any) -> None:
    """Writes JSON with sorted keys and a trailing newline, so identical content gives identical bytes."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text())


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return obj.as_posix()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: Path | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_tensors(named: dict[str, Any]) -> str:
    """Hash of a state dict's names, shapes, dtypes and bytes; the same weights hash the same wherever they came from."""
    h = hashlib.sha256()
    for name in sorted(named):
        arr = named[name].detach().cpu().contiguous().numpy() if hasattr(named[name], "detach") else named[name]
        h.update(name.encode())
        h.update(str(arr.dtype).encode())
        h.update(str(tuple(arr.shape)).encode())
        h.update(np.ascontiguousarray(arr).tobytes())
    return h.hexdigest()


# Cells a spreadsheet would run as a formula (OWASP "CSV injection"): text starting with = + - @, tab or CR. A class
# or file named "=HYPERLINK(...)" is data the user does not control (downloaded data sets), so it is escaped.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
# Plain numbers stay as they are (a negative number is not a formula), so the CSVs remain machine-readable.
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def escape_cell(value: Any) -> Any:
    """A CSV cell made inert for spreadsheets: a leading apostrophe before a formula-like text.

    Reversible (:func:`unescape_cell`): a text that already starts with an apostrophe gets one more, so reading the
    file back through :func:`read_csv_rows` returns exactly what was written.
    """
    if not isinstance(value, str) or not value or _NUMBER.fullmatch(value):
        return value
    if value.startswith(_FORMULA_START) or value.startswith("'"):
        return "'" + value
    return value


def unescape_cell(value: str) -> str:
    """The inverse of :func:`escape_cell` for a cell read back from a CSV the pipeline wrote."""
    return value[1:] if value.startswith("'") else value


def write_csv(path: Path | str, header: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    """A UTF-8 CSV with `\\n` line endings (the same bytes on every platform), appearing atomically.

    Text cells that a spreadsheet would evaluate as formulas are escaped (:func:`escape_cell`). A row with a bare CR
    in a cell (a legal character in Linux file and folder names) is written fully quoted: with `\n` line endings
    Python's writer leaves such a cell unquoted, and every reader then splits the row there.
    """
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        plain = csv.writer(f, lineterminator="\n")
        quoted = csv.writer(f, lineterminator="\n", quoting=csv.QUOTE_ALL)
        for row in (header, *rows):
            cells = [escape_cell(cell) for cell in row]
            has_cr = any(isinstance(cell, str) and "\r" in cell for cell in cells)
            (quoted if has_cr else plain).writerow(cells)


def read_csv_rows(path: Path | str) -> list[dict[str, str]]:
    """Rows of a CSV written by :func:`write_csv`, as dicts, with the formula escaping undone."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{unescape_cell(k): unescape_cell(v) for k, v in row.items()} for row in csv.DictReader(f)]
