"""Several torchrun nodes: the shared-files check (pipeline/core/features/nodes.py) and each rank's GPU.

The check itself runs in every torchrun test of tests/features/test_extract.py (two processes, two nodes), where it
passes; here, what it reports when a rank lacks something, which needs no second host.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core.features.nodes import (
    NodesError,
    check_nodes_share_files,
    check_same_choice,
    node_problems,
    node_report,
)
from pipeline.infra.runtime import resolve_device

SHA = "a" * 64


def _report(rank: int, host: str, **overrides) -> dict:
    return {"rank": rank, "local_rank": 0, "host": host, "sees_output": True, "index_sha256": SHA,
            "source": "/data/images", "sees_source": True, **overrides}


def test_ranks_that_share_everything_pass():
    assert node_problems([_report(0, "a"), _report(1, "b"), _report(2, "b")]) == []


def test_each_missing_share_is_named_with_its_host():
    reports = [_report(0, "a"), _report(1, "b", sees_output=False),
               _report(2, "c", index_sha256="b" * 64, sees_source=False)]
    assert node_problems(reports) == [
        "rank 1 on b does not see the output folder rank 0 writes (its probe file is missing)",
        "rank 2 on c reads another index.csv than rank 0 (sha256 bbbbbbbbbbbb vs aaaaaaaaaaaa)",
        "rank 2 on c has no source folder /data/images",
    ]


def test_the_report_sees_the_probe_the_index_hash_and_the_source(tmp_path: Path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    (tmp_path / ".node-probe-x").write_text("host\n")
    seen = node_report(tmp_path, ".node-probe-x", SHA, tmp_path)
    assert (seen["rank"], seen["local_rank"], seen["sees_output"], seen["sees_source"]) == (1, 0, True, True)
    unseen = node_report(tmp_path / "elsewhere", ".node-probe-x", SHA, tmp_path / "missing")
    assert (unseen["sees_output"], unseen["sees_source"]) == (False, False)


def test_one_process_has_nothing_to_check(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    check_nodes_share_files(tmp_path / "absent", SHA, tmp_path / "absent")  # no process group, no file: no error
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_raises_on_every_rank_with_the_problems(tmp_path: Path, monkeypatch):
    """The gathered reports are the same on every rank, so every rank raises (none waits at a barrier)."""
    from pipeline.core.features import nodes

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(nodes, "broadcast_from_main", lambda value: ".node-probe-from-rank-0")
    monkeypatch.setattr(nodes, "gather_to_all", lambda mine: [_report(0, "a"), mine])
    with pytest.raises(NodesError, match=r"rank 1 on .* does not see the output folder .*a shared file system"):
        check_nodes_share_files(tmp_path, SHA, tmp_path)


def test_ranks_that_choose_different_jpeg_decoders_stop_naming_each_choice(monkeypatch):
    """TorchCodec works on one node and not on another: the file could record only one of the two decoders."""
    from pipeline.core.features import nodes

    monkeypatch.setattr(nodes, "gather_to_all", lambda mine: [(0, "a", "torchcodec"), (1, "b", "torchcodec")])
    assert check_same_choice("JPEG decoder", "torchcodec") == "torchcodec"
    monkeypatch.setattr(nodes, "gather_to_all", lambda mine: [(0, "a", "torchcodec"), (1, "b", "torchvision")])
    with pytest.raises(NodesError, match=r"chose different JPEG decoders \(rank 0 on a: torchcodec, rank 1 on b: "
                                         r"torchvision\); name one in params.yaml"):
        check_same_choice("JPEG decoder", "torchcodec")


@pytest.mark.parametrize("rank,local_rank,world_size,want", [("5", "1", "8", "cuda:1"), ("0", "0", "1", "cuda")])
def test_bare_cuda_under_torchrun_is_the_local_rank_gpu(monkeypatch, rank: str, local_rank: str, world_size: str,
                                                        want: str):
    """On the second node of two with 4 GPUs each, RANK 5 is LOCAL_RANK 1: GPU 1 of its node, never GPU 5.
    (CUDA's availability is faked: only the device's name is computed, nothing runs on it.)"""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setenv("WORLD_SIZE", world_size)
    assert str(resolve_device("cuda")) == want
    assert str(resolve_device("auto")) == f"cuda:{local_rank}"
    assert str(resolve_device("cuda:3")) == "cuda:3"  # a device named with its index stays that device
