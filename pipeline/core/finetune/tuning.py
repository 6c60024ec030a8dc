"""Fine-tune trials as DVC experiments: a sampler proposes params, DVC runs each trial, its val metrics come back.

A fine-tune costs minutes to hours, so each trial is an ordinary DVC experiment (`dvc exp run --queue -n <name>-NNN
finetune -S finetune.<key>=<value> ...`, then `dvc queue start -j N`): it runs the pipeline up to the fine-tune (by
default; evaluate only reports, so it runs once, for the trial taken) in its own copy of the repository, reuses every
stage its params leave unchanged (prepare, extract and the heads come from the cache), and stays in
`dvc exp show` to inspect, `dvc exp apply` or `dvc exp push` like any other. The sampler sees each batch's val
accuracy and loss (`metrics/finetune.json`) before it proposes the next; `--jobs N` runs N trials at once, proposed
from the same finished trials.

The study journal (pipeline/infra/study.py) makes the tuning resumable: run the command again and the finished trials
are replayed, and a trial whose experiment already exists (queued, running or done when the command was stopped) is
waited for and read back rather than queued twice; an existing experiment of that name with other params is refused.
"""
from __future__ import annotations

import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.infra.config import to_dict
from pipeline.infra.errors import PipelineError
from pipeline.infra.space import Dimension, yaml_text
from pipeline.infra.study import Study

log = logging.getLogger(__name__)

METRICS_FILE = "metrics/finetune.json"
_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,40}$")


class TuningError(PipelineError):
    """A DVC command of the tuning failed, or an experiment did; the message says which and where its log is."""


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise TuningError(f"--name {name!r}: give letters, digits, '-' or '_', starting with a letter (it prefixes "
                          "each experiment's name, e.g. tune-001)")
    return name


def experiment_name(study_name: str, number: int) -> str:
    return f"{study_name}-{number:03d}"


def _dvc(repo: Path, *args: str) -> str:
    exe = Path(sys.executable).parent / "dvc"  # the dvc of this environment, as the stages' python
    proc = subprocess.run([str(exe) if exe.exists() else "dvc", *args], cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise TuningError(f"`dvc {' '.join(args)}` failed ({proc.returncode}):\n{tail}")
    return proc.stdout


def head_revision(repo: Path) -> str:
    """The commit the experiments are based on, after refusing a folder where `dvc exp run` cannot work."""
    if not (repo / ".dvc").is_dir() or not (repo / "dvc.yaml").is_file():
        raise TuningError(f"{repo} is not the root of a DVC repository (no .dvc/ or dvc.yaml): run "
                          "`python -m pipeline.tune` where you run `dvc repro`")
    proc = subprocess.run(["git", "rev-parse", "--verify", "HEAD"], cwd=repo, capture_output=True, text=True)
    if proc.returncode:
        raise TuningError(f"{repo} has no git commit: DVC experiments are based on one; commit the pipeline first "
                          "(git add -A && git commit)")
    return proc.stdout.strip()


def open_study(out: Path, name: str, section: str, base: Any, space: dict[str, Dimension], sampler: str, seed: int,
               repo: Path) -> Study:
    """The tuning's study: resumed when its journal holds the same tuning on the same commit."""
    header = {"section": section, "name": name, "base": to_dict(base), "rev": head_revision(repo)}
    return Study(out / name / "trials.jsonl", space, sampler, seed, header)


def queue_status(repo: Path) -> dict[str, str]:
    """{experiment name: Queued | Running | Success | Failed ...} from `dvc queue status`."""
    out = {}
    for line in _dvc(repo, "queue", "status").splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if len(cells) >= 4 and cells[0] != "Task":
            out[cells[1]] = cells[-1]
    return out


def experiments(repo: Path) -> dict[str, dict]:
    """{experiment name: {"rev", "params" (params.yaml), "metrics" (metrics/finetune.json)}} from `dvc exp show`."""
    found: dict[str, dict] = {}

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            data = node.get("data")
            if node.get("name") and isinstance(data, dict) and "params" in data and node.get("rev") != "workspace":
                params = (data.get("params") or {}).get("params.yaml", {}).get("data", {})
                metrics = (data.get("metrics") or {}).get(METRICS_FILE, {}).get("data")
                found.setdefault(node["name"], {"rev": node.get("rev"), "params": params, "metrics": metrics})
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(json.loads(_dvc(repo, "exp", "show", "--json", "--no-fetch") or "[]"))
    return found


def _params_match(params: dict, section: str, point: dict) -> bool:
    node = params
    for part in section.split("."):
        node = node.get(part, {}) if isinstance(node, dict) else {}
    return all(node.get(k) == v for k, v in point.items())


def run_batch(repo: Path, section: str, names: list[str], points: list[dict], jobs: int, target: str,
              poll: float = 2.0) -> list[dict]:
    """Queues the trials not queued yet, runs the queue with `jobs` workers, waits, returns each trial's metrics."""
    status, known = queue_status(repo), experiments(repo)
    for name, point in zip(names, points):
        if name in known and not _params_match(known[name]["params"], section, point):
            raise TuningError(f"experiment {name} exists with other params (another tuning's trial): give another "
                              f"--name, or remove it with `dvc exp remove {name}`")
        if name in known or status.get(name) in ("Queued", "Running"):
            log.info("tune: %s already exists (an earlier run of this tuning): waiting for it / reading it", name)
            continue
        _dvc(repo, "exp", "run", "--queue", "-n", name, *([target] if target else []),
             *[x for k, v in point.items() for x in ("-S", f"{section}.{k}={yaml_text(v)}")])
        log.info("tune: queued %s: %s", name, json.dumps(point))
    _dvc(repo, "queue", "start", "-j", str(jobs))
    while True:
        status = queue_status(repo)
        pending = [n for n in names if status.get(n) in ("Queued", "Running")]
        if not pending:
            break
        time.sleep(poll)
    failed = [n for n in names if status.get(n) == "Failed"]
    if failed:
        raise TuningError(f"experiment {', '.join(failed)} failed; its log: `dvc queue logs {failed[0]}`")
    known = experiments(repo)
    results = []
    for name in names:
        metrics = (known.get(name) or {}).get("metrics")
        if not metrics or "val" not in metrics:
            raise TuningError(f"experiment {name} has no {METRICS_FILE} with val metrics; its log: "
                              f"`dvc queue logs {name}`")
        results.append({"val_accuracy": metrics["val"]["accuracy"], "val_loss": metrics["val"]["loss"],
                        "best_epoch": metrics.get("best_epoch"), "experiment": name, "rev": known[name]["rev"]})
    return results


def run_tuning(repo: Path, section: str, study: Study, total: int, jobs: int, name: str,
               target: str = "finetune") -> tuple[list[dict], dict]:
    """Runs the study's trials up to `total`, `jobs` at a time, as DVC experiments of `target` (a stage: the pipeline
    up to it; "" for the whole pipeline); returns the rows and the best."""
    while len(study.trials) < total:
        first = len(study.trials) + 1
        batch = range(first, min(first + jobs, total + 1))
        points = [study.propose(n) for n in batch]  # each from its own seed, over the same finished trials
        names = [experiment_name(name, n) for n in batch]
        t0 = time.perf_counter()
        for point, metrics in zip(points, run_batch(repo, section, names, points, jobs, target)):
            study.record(point, metrics, time.perf_counter() - t0)
            log.info("tune: %d/%d %s %s: val accuracy %.4f, loss %.4f", study.trials[-1]["trial"], total,
                     metrics["experiment"], json.dumps(point), metrics["val_accuracy"], metrics["val_loss"])
    rows = [{"trial": t["trial"], **t["point"], **t["metrics"]} for t in study.trials[:total]]
    best = min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["trial"]))
    return rows, best
