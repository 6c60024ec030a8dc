"""Search over one head's params on the cached features: a fit per grid point, one table, the best point.

Each point is the head's params.yaml section with some keys replaced, built and validated by the same typed config
as the stage (an unknown key or a value out of range stops the search before any fit), and fitted by the same
:func:`pipeline.core.heads.fitting.fit_head` as `heads@<head>`, so a row's figures are the ones the stage would write for
those params. Nothing but the features is read: a point costs its fit, never an extraction.

Points are numbered from 1, in the progress lines, the table, search.json and the summary alike. The best point is
the one with the highest val accuracy; ties go to the lower val loss, then to the earlier point (the rule `select`
and the logreg C sweep use).

`--grid` values are read as a command line means them: `3e-4` and `1E5` are numbers (YAML 1.2, as DVC's `-S` reads
them), while PyYAML's YAML 1.1 would make them strings; only params.yaml itself must be YAML 1.1-safe, so the
`dvc exp run -S` line writes floats in a form both read as numbers.
"""
from __future__ import annotations

import itertools
import json
import logging
import random
import re
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.infra.artifacts import read_json, write_csv, write_json
from pipeline.infra.config import MAX_SEED, ConfigError, build, to_dict

log = logging.getLogger(__name__)

METRICS = ("val_accuracy", "val_loss", "val_balanced_accuracy", "train_accuracy", "seconds")

# Points fitted in one search at most: a point costs seconds, so this is already days; a grid larger than that is a
# typo or a job for --random, and the limit keeps the product from being built in memory.
MAX_POINTS = 10_000


class _CommandLineLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but with YAML 1.2's floats: `3e-4`, `1E5`, `1.0e5` are numbers, as a person typing a
    command line (and DVC's -S) means them; YAML 1.1 wants a decimal point and a signed exponent."""


_CommandLineLoader.add_implicit_resolver(  # copies SafeLoader's resolvers first: PyYAML's own loaders are unchanged
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$"), list("-+0123456789."))


def parse_grid(specs: list[str], base: Any, prefix: str) -> dict[str, list]:
    """`key=VALUES` strings to {key: [values]}; VALUES is YAML (with YAML 1.2 floats): a list of values, or one value.

    A value given for a list-valued key (`hidden`, `C`) that is not itself a list is wrapped: `hidden=[256,512]`
    means the two points [256] and [512]; `hidden=[[256],[256,128]]` gives lists of several layers.

    Raises:
        ConfigError: no --grid at all (the base alone is no search), a spec that does not parse, an unknown or
            repeated key, no values, or a value listed twice (the same fit twice).
    """
    defaults = to_dict(base)
    if not specs:
        raise ConfigError(f"no --grid given: nothing to search; give at least one --grid KEY=VALUES, e.g. --grid "
                          f"'{next(iter(defaults))}=[...]' (keys of {prefix}: {', '.join(defaults)})")
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
            values = yaml.load(text, Loader=_CommandLineLoader)
        except yaml.YAMLError:
            raise ConfigError(f"--grid '{spec}': the values are not valid YAML") from None
        values = values if isinstance(values, list) else [values]
        if isinstance(defaults[key], list):
            values = [v if isinstance(v, list) else [v] for v in values]
        if not values:
            raise ConfigError(f"--grid '{spec}': no values")
        for i, value in enumerate(values):
            if value in values[:i]:
                raise ConfigError(f"--grid '{spec}': {json.dumps(value)} is listed twice; list each value once")
        grid[key] = values
    return grid


def grid_points(grid: dict[str, list], sample: int | None = None, seed: int | None = None) -> list[dict]:
    """The Cartesian product of the grid, in order (last key fastest); with `sample`, that many distinct points of
    it drawn at random (seeded by `seed`, default 0), in the order drawn: a random search over the same space.

    Raises:
        ConfigError: `sample` below 1 (zero points would fit nothing and have no best one) or above MAX_POINTS,
            `seed` out of range or given without `sample` (it would change nothing), or a grid of more than
            MAX_POINTS points without `sample`.
    """
    if sample is not None and sample < 1:
        raise ConfigError(f"--random {sample}: give the number of points to draw, 1 or more")
    if sample is not None and sample > MAX_POINTS:
        raise ConfigError(f"--random {sample}: at most {MAX_POINTS:,} points in one search (a point is a head fit)")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {seed}: give a seed from 0 to {MAX_SEED:,}")
    if seed is not None and sample is None:  # a user may take it for the head's training seed
        raise ConfigError(f"--seed {seed} seeds the draw of --random N, and no --random was given (every point is "
                          "fitted); drop --seed or add --random N (a head's own training seed is a grid key: "
                          "--grid 'seed=[0,1]')")
    keys, sizes = list(grid), [len(v) for v in grid.values()]
    total = 1
    for s in sizes:
        total *= s
    if sample is None and total > MAX_POINTS:
        raise ConfigError(f"the grid has {total:,} points ({' x '.join(map(str, sizes))}), more than {MAX_POINTS:,}; "
                          "give fewer values, or fit a sample of it with --random N")
    if sample is not None and sample >= total:
        log.info("search: --random %d is not less than the grid's %d point(s): fitting all of them, in grid order",
                 sample, total)
    if sample is None or sample >= total:
        return [dict(zip(keys, combo)) for combo in itertools.product(*grid.values())]
    points = []
    for index in random.Random(seed or 0).sample(range(total), sample):  # without building the product
        combo = []
        for key, size in zip(reversed(keys), reversed(sizes)):
            index, i = divmod(index, size)
            combo.append((key, grid[key][i]))
        points.append(dict(reversed(combo)))
    return points


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


def run_search(head: str, features: Path, base: Any, points: list[dict]) -> tuple[list[dict], dict]:
    """Fits `head` once per point; returns the table rows (point numbered from 1, params varied, metrics) and the
    best row."""
    from pipeline.core.heads.fitting import fit_head

    prefix = f"heads.{head}"
    configs = [point_config(base, p, prefix) for p in points]  # every point is valid before the first fit
    rows = []
    for number, (point, cfg) in enumerate(zip(points, configs), start=1):  # from 1, as the progress line counts
        t0 = time.perf_counter()
        _, spec, metrics = fit_head(head, features, cfg)
        row = {"point": number, **point, "val_accuracy": metrics["val"]["accuracy"], "val_loss": metrics["val"]["loss"],
               "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
               "train_accuracy": metrics["train"]["accuracy"], "seconds": round(time.perf_counter() - t0, 2)}
        if head == "logreg":
            row["chosen_C"] = spec.fit["C"]  # the C the fit picked on val when a point lists several
        rows.append(row)
        log.info("search: %d/%d %s: val accuracy %.4f, loss %.4f (%.1f s)", number, len(points),
                 json.dumps(point), row["val_accuracy"], row["val_loss"], row["seconds"])
    best = min(rows, key=lambda r: (-r["val_accuracy"], r["val_loss"], r["point"]))
    return rows, best


def _yaml11(value: Any) -> str:
    """`value` as YAML text that YAML 1.1 and 1.2 read alike: a float always with a decimal point and a signed
    exponent (1.0e-05, never 1e-05, which PyYAML reads as a string); the rest as JSON (a subset of YAML)."""
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")  # repr's exponent is always signed: 1e-05, 1e+16
        return (mantissa if "." in mantissa else f"{mantissa}.0") + e + exponent
    if isinstance(value, list):
        return "[" + ", ".join(_yaml11(v) for v in value) + "]"
    return json.dumps(value)


def set_command(head: str, point: dict) -> str:
    """The `dvc exp run` line that runs the pipeline with `point`'s params."""
    return "dvc exp run " + " ".join(f"-S 'heads.{head}.{k}={_yaml11(v)}'" for k, v in point.items())


def dvc_note(head: str, point: dict) -> str | None:
    """What to do instead of the -S line when DVC would write a value into params.yaml as YAML 1.1 cannot read it.

    DVC parses a -S value to a number and writes it back with Python's repr, so 1.0e-05 lands in params.yaml as
    `1e-05` (seen with DVC 3), a string to PyYAML that the stages refuse; floats of 1e-4 and above are written
    without an exponent and are safe.
    """
    def has_exponent(value: Any) -> bool:
        if isinstance(value, list):
            return any(has_exponent(v) for v in value)
        return isinstance(value, float) and "e" in repr(value)

    keys = [k for k, v in point.items() if has_exponent(v)]
    if not keys:
        return None
    edits = ", ".join(f"heads.{head}.{k}: {_yaml11(point[k])}" for k in keys)
    return (f"DVC writes {', '.join(f'heads.{head}.{k}' for k in keys)} into params.yaml without a decimal point "
            f"(e.g. 1e-05), which YAML 1.1 reads as a string; instead write {edits} in params.yaml and run "
            "`dvc exp run`")


def write_results(out: Path, head: str, base: Any, grid: dict[str, list], rows: list[dict], best: dict) -> None:
    """`out/table.csv` (one row per point; list values as JSON) and `out/search.json` (rows, best, base config).

    An earlier search's files there are replaced (the documented place of a head's search), and a line says so,
    naming what they held, so a table is never lost without a word; --out keeps searches apart.
    """
    table, result = out / "table.csv", out / "search.json"
    earlier = [p for p in (table, result) if p.exists()]
    held = ""
    if result.exists():
        try:
            old = read_json(result)
            held = f" (heads.{old['head']}, grid {', '.join(old['grid'])}, {len(old['rows'])} points)"
        except Exception:  # an unreadable old file is still replaced; only the description is lost
            held = ""
    columns = list(rows[0])
    write_csv(table, columns, ([json.dumps(row[c]) if isinstance(row[c], list) else row[c] for c in columns]
                               for row in rows))
    params = {k: best[k] for k in grid}
    note = dvc_note(head, params)
    write_json(result, {"head": head, "grid": grid, "base": to_dict(base), "rows": rows,
                        "best": {"point": best["point"], "params": params, **{m: best[m] for m in METRICS},
                                 "command": set_command(head, params), **({"note": note} if note else {})}})
    if earlier:
        log.info("search: replaced %s from an earlier search%s; give --out DIR to keep each search",
                 " and ".join(str(p) for p in earlier), held)
