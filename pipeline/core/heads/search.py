"""Search over one head's params on the cached features: a fit per trial, one table, the best point.

Each point is the head's params.yaml section with some keys replaced, built and validated by the same typed config
as the stage (an unknown key or a value out of range stops the search before any fit), and fitted by the same
:func:`pipeline.core.heads.fitting.fit_head` as `heads@<head>`, so a row's figures are the ones the stage would write for
those params. Nothing but the features is read: a point costs its fit, never an extraction.

The points come from a sampler (pipeline/infra/study.py): every point of a grid, or a budget of trials drawn at random
or by Optuna's TPE from lists and ranges (pipeline/infra/space.py). The study's journal (`trials.jsonl` beside the
table) makes a search resumable: run the same command again and it goes on from the first trial not finished.

Points are numbered from 1, in the progress lines, the table, search.json and the summary alike. The best point is
the one with the highest val accuracy; ties go to the lower val loss, then to the earlier point (the rule `select`
and the logreg C sweep use). table.csv and search.json hold no timings, so the same search gives the same bytes; the
seconds of each fit are in the journal and the progress lines.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

from pipeline.infra.artifacts import read_json
from pipeline.infra.config import MAX_SEED, ConfigError, build, to_dict
from pipeline.infra.space import Dimension, describe, yaml_text
from pipeline.infra.study import MAX_TRIALS, Study, write_trials

log = logging.getLogger(__name__)

METRICS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "train_accuracy")
JOURNAL = "trials.jsonl"


def check_paths(features: Path, index: Path | None, out: Path) -> Path | None:
    """The index folder the features must come from (None when --index was not given and data/prepared is absent),
    after refusing paths that cannot work, naming the flag.

    Raises:
        ConfigError: --features missing or a folder, --index given without an index.csv, or --out a file (or under
            one).
    """
    if not features.exists():
        raise ConfigError(f"--features {features} does not exist; run `dvc repro` (or `python -m pipeline.extract`) "
                          "first, or give the features file extract wrote")
    if features.is_dir():
        raise ConfigError(f"--features {features} is a folder; give the features file extract wrote (e.g. "
                          "data/features.h5)")
    if index is not None and not (index / "index.csv").is_file():
        raise ConfigError(f"--index {index} has no index.csv; give prepare's output folder (e.g. data/prepared)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for table.csv and search.json")
    above = next((p for p in out.parents if p.exists()), None)  # missing folders are created
    if above is not None and not above.is_dir():
        raise ConfigError(f"--out {out}: '{above}' is a file, not a folder; give a folder for the results")
    default = Path("data/prepared")
    return index if index is not None else (default if (default / "index.csv").is_file() else None)


def point_config(base: Any, point: dict, prefix: str) -> Any:
    """The head's config with `point`'s keys replaced, validated like params.yaml."""
    return build(type(base), {**to_dict(base), **point}, prefix)


def resolve_sampler(sampler: str | None, trials: int | None, random: int | None, seed: int | None) -> tuple[str, int | None, int]:
    """(sampler, budget, seed) from the flags: `--random N` is `--sampler random --trials N`; the grid takes no seed.

    Raises:
        ConfigError: --random with another sampler or with --trials, a seed out of range, or a seed for the grid
            (it would change nothing, and a user may take it for the head's training seed).
    """
    if random is not None:
        if sampler not in (None, "random") or trials is not None:
            raise ConfigError(f"--random {random} is short for --sampler random --trials {random}; give either it or "
                              "--sampler and --trials")
        if random < 1:
            raise ConfigError(f"--random {random}: give the number of points to draw, 1 or more")
        if random > MAX_TRIALS:
            raise ConfigError(f"--random {random}: at most {MAX_TRIALS:,} points in one search (a point is a head fit)")
        sampler, trials = "random", random
    sampler = sampler or "grid"
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed}: give a seed from 0 to {MAX_SEED:,}")
    if seed is not None and sampler == "grid":
        raise ConfigError(f"--seed {seed} seeds the draws of --sampler random or tpe, and the grid draws nothing "
                          "(every point is fitted); drop --seed or choose a sampler (a head's own training seed is a "
                          "grid key: --grid 'seed=[0,1]')")
    return sampler, trials, seed or 0


def features_identity(features: Path) -> str:
    """A short hash of the features file's fingerprint attributes (backbone, weights, preprocessing, index): a study
    is resumed only on the features it began on."""
    from pipeline.core.features.cache import canonical_json, read_attrs

    attrs = {k: v for k, v in read_attrs(features).items() if k != "versions"}
    return hashlib.sha256(canonical_json(attrs).encode()).hexdigest()[:16]


def open_study(out: Path, head: str, base: Any, features: Path, space: dict[str, Dimension], sampler: str,
               seed: int, views: Path | None = None) -> Study:
    """The search's study in `out`: resumed when its journal holds the same search, else started afresh. The views
    file is part of the search only when it uses views (`views` in the grid or in the base config)."""
    header = {"head": head, "base": to_dict(base), "features": features_identity(features)}
    if views is not None and uses_views(base, space):
        header["views"] = features_identity(views)
    return Study(out / JOURNAL, space, sampler, seed, header)


def uses_views(base: Any, space: dict[str, Dimension]) -> bool:
    """Whether a search fits any head on augmented views (pipeline/core/heads/views.py)."""
    return "views" in space or bool(getattr(base, "views", 0))


def run_search(head: str, features: Path, base: Any, study: Study, total: int,
               views: Path | None = None) -> tuple[list[dict], dict]:
    """Runs the study's trials up to `total` (those in its journal are not fitted again); returns the table rows
    (point numbered from 1, params, metrics) and the best row."""
    from pipeline.core.heads.fitting import fit_head

    prefix = f"heads.{head}"
    while len(study.trials) < total:
        number, point = len(study.trials) + 1, study.propose()
        cfg = point_config(base, point, prefix)
        earlier = study.repeat_of(point)
        t0 = time.perf_counter()
        if earlier is not None:  # the fits are deterministic: the same point gives the same figures
            metrics = earlier["metrics"]
            log.info("search: %d/%d %s is trial %d's point again: not fitted again", number, total,
                     json.dumps(point), earlier["trial"])
        else:
            _, spec, fitted = fit_head(head, features, cfg, views)
            metrics = {"val_accuracy": fitted["val"]["accuracy"], "val_loss": fitted["val"]["loss"],
                       "val_balanced_accuracy": fitted["val"]["balanced_accuracy"],
                       "train_accuracy": fitted["train"]["accuracy"]}
            if head == "logreg":
                metrics["chosen_C"] = spec.fit["C"]  # the C the fit picked on val when a point lists several
        entry = study.record(point, metrics, time.perf_counter() - t0)
        log.info("search: %d/%d %s: val accuracy %.4f, loss %.4f (%.1f s)", number, total, json.dumps(point),
                 metrics["val_accuracy"], metrics["val_loss"], entry["seconds"])
    rows = [{"point": t["trial"], **t["point"], **t["metrics"]} for t in study.trials[:total]]
    best = min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["point"]))
    return rows, best


def set_command(head: str, point: dict) -> str:
    """The `dvc exp run` line that runs the pipeline with `point`'s params."""
    return "dvc exp run " + " ".join(f"-S 'heads.{head}.{k}={yaml_text(v)}'" for k, v in point.items())


def write_results(out: Path, head: str, base: Any, study: Study, rows: list[dict], best: dict) -> None:
    """`out/table.csv` (one row per point; list values as JSON) and `out/search.json` (the search, rows, best).

    Another search's files there are replaced (the documented place of a head's search), and a line says so, naming
    what they held, so a table is never lost without a word; --out keeps searches apart.
    """
    table, result = out / "table.csv", out / "search.json"
    space = describe(study.space)
    held = None
    if result.exists():
        try:
            old = read_json(result)
            if (old["head"], old["sampler"], old["space"]) != (head, study.sampler, space):
                held = f"heads.{old['head']}, {old['sampler']} over {', '.join(old['space'])}, {len(old['rows'])} points"
        except Exception:  # an unreadable or older file is still replaced; only the description is lost
            held = "unreadable"
    params = {k: best[k] for k in study.space}
    write_trials(out, "search.json", rows, {
        "head": head, "sampler": study.sampler, "seed": study.header["seed"], "space": space, "base": to_dict(base),
        "best": {"point": best["point"], "params": params, **{m: best[m] for m in METRICS},
                 "command": set_command(head, params)}})
    if held is not None:
        log.info("search: replaced %s and %s from another search (%s); give --out DIR to keep each search",
                 table, result, held)
