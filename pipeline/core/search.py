"""Search over one head's params on the cached features: a fit per grid point, one table, the best point.

Each point is the head's params.yaml section with some keys replaced, built and validated by the same typed config
as the stage (an unknown key or a value out of range stops the search before any fit), and fitted by the same
:func:`pipeline.core.heads.fit_head` as `heads@<head>`, so a row's figures are the ones the stage would write for
those params. Nothing but the features is read: a point costs its fit, never an extraction.

The best point is the one with the highest val accuracy; ties go to the lower val loss, then to the earlier point
(the rule `select` and the logreg C sweep use).
"""
from __future__ import annotations

import csv
import itertools
import json
import logging
import random
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.infra.artifacts import write_json
from pipeline.infra.config import ConfigError, build, to_dict

log = logging.getLogger("pipeline.search")

METRICS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "train_accuracy", "seconds")


def parse_grid(specs: list[str], base: Any, prefix: str) -> dict[str, list]:
    """`key=VALUES` strings to {key: [values]}; VALUES is YAML: a list of values, or one value.

    A value given for a list-valued key (`hidden`, `C`) that is not itself a list is wrapped: `hidden=[256,512]`
    means the two points [256] and [512]; `hidden=[[256],[256,128]]` gives lists of several layers.
    """
    defaults = to_dict(base)
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid '{spec}': expected KEY=VALUES, e.g. dropout=[0.2,0.5]")
        if key not in defaults:
            raise ConfigError(f"--grid: unknown key '{prefix}.{key}'; allowed keys: {', '.join(defaults)}")
        if key in grid:
            raise ConfigError(f"--grid: '{key}' given twice")
        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(f"--grid '{spec}': the values are not valid YAML") from None
        values = values if isinstance(values, list) else [values]
        if isinstance(defaults[key], list):
            values = [v if isinstance(v, list) else [v] for v in values]
        if not values:
            raise ConfigError(f"--grid '{spec}': no values")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list], sample: int | None = None, seed: int = 0) -> list[dict]:
    """The Cartesian product of the grid, in order (last key fastest); with `sample`, that many distinct points of
    it drawn at random (seeded), in the order drawn: a random search over the same space.

    Raises:
        ConfigError: `sample` is below 1 (zero points would fit nothing and have no best one).
    """
    if sample is not None and sample < 1:
        raise ConfigError(f"--random {sample}: give the number of points to draw, 1 or more")
    keys, sizes = list(grid), [len(v) for v in grid.values()]
    total = 1
    for s in sizes:
        total *= s
    if sample is None or sample >= total:
        return [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    points = []
    for index in random.Random(seed).sample(range(total), sample):  # without building the product
        combo = []
        for key, size in zip(reversed(keys), reversed(sizes)):
            index, i = divmod(index, size)
            combo.append((key, grid[key][i]))
        points.append(dict(reversed(combo)))
    return points


def point_config(base: Any, point: dict, prefix: str) -> Any:
    """The head's config with `point`'s keys replaced, validated like params.yaml."""
    return build(type(base), {**to_dict(base), **point}, prefix)


def run_search(head: str, features: Path, base: Any, points: list[dict]) -> tuple[list[dict], dict]:
    """Fits `head` once per point; returns the table rows (point, params varied, metrics) and the best row."""
    from pipeline.core.heads import fit_head  # torch and the heads load only when a search runs

    prefix = f"heads.{head}"
    configs = [point_config(base, p, prefix) for p in points]  # every point is valid before the first fit
    rows = []
    for i, (point, cfg) in enumerate(zip(points, configs)):
        t0 = time.perf_counter()
        _, spec, metrics = fit_head(head, features, cfg)
        row = {"point": i, **point, "val_accuracy": metrics["val"]["accuracy"], "val_loss": metrics["val"]["loss"],
               "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
               "train_accuracy": metrics["train"]["accuracy"], "seconds": round(time.perf_counter() - t0, 2)}
        if head == "logreg":
            row["chosen_C"] = spec["fit"]["C"]  # the C the fit picked on val when a point lists several
        rows.append(row)
        log.info("search: %d/%d %s: val accuracy %.4f, loss %.4f (%.1f s)", i + 1, len(points),
                 json.dumps(point), row["val_accuracy"], row["val_loss"], row["seconds"])
    best = min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["point"]))
    return rows, best


def set_command(head: str, point: dict) -> str:
    """The `dvc exp run` line that runs the pipeline with `point`'s params."""
    return "dvc exp run " + " ".join(f"-S 'heads.{head}.{k}={json.dumps(v)}'" for k, v in point.items())


def write_results(out: Path, head: str, base: Any, grid: dict[str, list], rows: list[dict], best: dict) -> None:
    """`out/table.csv` (one row per point; list values as JSON) and `out/search.json` (rows, best, base config)."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in columns])
    params = {k: best[k] for k in grid}
    write_json(out / "search.json", {"head": head, "grid": grid, "base": to_dict(base), "rows": rows,
                                     "best": {"point": best["point"], "params": params,
                                              **{m: best[m] for m in METRICS},
                                              "command": set_command(head, params)}})
