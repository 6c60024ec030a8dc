"""Several torchrun nodes: every rank must see the same index, images and output folder, and decode alike.

Why: extraction shares work through files, not messages. Every rank reads the index (`--index`) and the images (at
the `source` path the index records), writes its checkpoints to `<out>.partial/`, and global rank 0 assembles them
into `<out>`. On several nodes that needs a file system they all mount at the same paths. A node that mounts another
copy, or none, used to fail late (rank 0 finding a checkpoint missing after every rank had computed its share) or,
with a different copy of the index, wrongly (other images under the same row ids). :func:`check_nodes_share_files`
finds out before any image is read, on every rank alike, and names the host and what it lacks.

One process, or several on one node, always passes: the check costs one small file and two collective calls.
"""
from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path

from pipeline.infra.distributed import broadcast_from_main, gather_to_all
from pipeline.infra.errors import PipelineError
from pipeline.infra.runtime import dist_info

log = logging.getLogger(__name__)

PROBE_PREFIX = ".node-probe-"  # in `<out>.partial/`; written by rank 0, read by every rank, removed right after


class NodesError(PipelineError, ValueError):
    """The ranks do not share the files extraction needs; the message names the host and what to share."""


def node_report(partial: Path, probe: str, index_sha256: str, source: Path) -> dict:
    """What this rank sees: rank 0's probe file in the output's partial folder, the index's hash, the source folder."""
    info = dist_info()
    return {"rank": info.rank, "local_rank": info.local_rank, "host": socket.gethostname(),
            "sees_output": (partial / probe).is_file(), "index_sha256": index_sha256,
            "source": str(source), "sees_source": Path(source).is_dir()}


def node_problems(reports: list[dict]) -> list[str]:
    """One line per rank that does not see what rank 0 sees (reports in rank order, rank 0 first)."""
    main = reports[0]
    problems = []
    for r in reports:
        where = f"rank {r['rank']} on {r['host']}"
        if not r["sees_output"]:
            problems.append(f"{where} does not see the output folder rank 0 writes (its probe file is missing)")
        if r["index_sha256"] != main["index_sha256"]:
            problems.append(f"{where} reads another index.csv than rank 0 (sha256 {r['index_sha256'][:12]} vs "
                            f"{main['index_sha256'][:12]})")
        if not r["sees_source"]:
            problems.append(f"{where} has no source folder {r['source']}")
    return problems


def check_nodes_share_files(partial: Path, index_sha256: str, source: Path) -> None:
    """Raises NodesError on every rank when any rank does not share rank 0's output folder, index or images.

    Call it on every rank, after rank 0 has created `partial` (the checkpoint folder), before any image is read.
    Nothing to check in one process.

    Raises:
        NodesError: the message lists each rank, by host, and what it lacks.
    """
    info = dist_info()
    if info.world_size == 1:
        return
    probe = None
    if info.is_main:
        probe = f"{PROBE_PREFIX}{uuid.uuid4().hex}"
        (partial / probe).write_text(f"{socket.gethostname()}\n")
    probe = broadcast_from_main(probe)  # also the wait for rank 0's file
    reports = gather_to_all(node_report(partial, probe, index_sha256, source))
    if info.is_main:  # every rank has looked: the gather returns only once all reports are in
        (partial / probe).unlink(missing_ok=True)
    problems = node_problems(reports)
    if problems:
        raise NodesError("extract under torchrun: the ranks do not share their files. " + "; ".join(problems) + ". "
                         "Every node must see --index, the source images (the path in the index's classes.json) and "
                         "--out's folder at the same paths: a shared file system (see README, Several nodes)")
    hosts = sorted({r["host"] for r in reports})
    if info.is_main and len(hosts) > 1:
        log.info("extract: %d ranks on %d hosts (%s) share the index, the images and %s", len(reports), len(hosts),
                 ", ".join(hosts), partial.parent)


def check_same_choice(what: str, value: str) -> str:
    """`value` (a choice each rank makes for itself, such as the JPEG decoder) when every rank made the same one.

    Why: the file records one choice; checkpoints from ranks that decoded differently would be merged under it.

    Raises:
        NodesError: on every rank, naming each rank's host and choice.
    """
    reports = gather_to_all((dist_info().rank, socket.gethostname(), value))
    if len({v for _, _, v in reports}) > 1:
        raise NodesError(f"extract under torchrun: the ranks chose different {what}s ("
                         + ", ".join(f"rank {r} on {h}: {v}" for r, h, v in reports)
                         + "); name one in params.yaml that works on every node")
    return value
