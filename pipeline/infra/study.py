"""A search's trials: proposed by a sampler (grid, random or Optuna's TPE), recorded in a journal, resumable.

Every proposal is a function of the search's seed, the trial's number and the trials finished before it, and of
nothing else: trial n draws from its own generator, seeded by ``SeedSequence([seed, n])``, and the TPE sampler is
rebuilt for each trial from that seed over the finished trials. So the same seed gives the same trials, and a search
that was interrupted and started again proposes exactly what the uninterrupted one would have: the journal
(`trials.jsonl`, one JSON line per finished trial, written and flushed as each finishes) is the study, and resuming
is replaying it. A trial cut off mid-fit is simply not in it and runs again.

Why Optuna's TPE and not Ax: the cache makes a fit cost seconds, so the sampler's own cost matters as much as its
sample efficiency; TPE proposes in milliseconds from any mix of categorical and continuous keys, and Optuna is one
pure-Python package (plus SQLAlchemy/Alembic, unused here) against Ax's BoTorch, GPyTorch and pandas, whose Gaussian
processes pay off for budgets of tens of expensive trials over a few continuous keys, not for cheap head fits.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.infra.artifacts import write_csv, write_json
from pipeline.infra.config import ConfigError
from pipeline.infra.space import Choice, Dimension, Range, describe, has_ranges

log = logging.getLogger(__name__)

SAMPLERS = ("grid", "random", "tpe")
# Points in one search at most: a point costs seconds, so this is already days; a grid larger than that is a typo or
# a job for a sampler, and the limit keeps the grid's product from being built in memory.
MAX_TRIALS = 10_000


def objective(accuracy: float, loss: float) -> float:
    """What the samplers maximise: val accuracy, then (by less than any accuracy step) lower val loss, the ranking
    `select` and the table use. Accuracy alone is flat over most of a small val set, which gives TPE nothing to learn."""
    return accuracy - 1e-9 * (loss / (1.0 + loss) if math.isfinite(loss) else 1.0)


def _grid_size(space: dict[str, Dimension]) -> int:
    return math.prod(len(d.values) for d in space.values())  # type: ignore[union-attr]


def budget(space: dict[str, Dimension], sampler: str, trials: int | None) -> int:
    """The number of trials to run, after refusing a budget the sampler cannot use.

    Raises:
        ConfigError: an unknown sampler, a grid with ranges, no budget for a sampler that draws from ranges, a
            budget below 1 or above MAX_TRIALS, or a grid too large to list.
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"--sampler {sampler}: choose one of {', '.join(SAMPLERS)}")
    if trials is not None and not 1 <= trials <= MAX_TRIALS:
        raise ConfigError(f"--trials {trials}: give the number of trials, 1 to {MAX_TRIALS:,}")
    ranges = [k for k, d in space.items() if isinstance(d, Range)]
    if sampler == "grid" and ranges:
        raise ConfigError(f"the grid needs lists of values, and {', '.join(ranges)} "
                          f"{'is a range' if len(ranges) == 1 else 'are ranges'}; list the values (e.g. "
                          f"{ranges[0]}=[...]) or draw from the range with --sampler random or tpe and --trials N")
    if ranges and trials is None:
        raise ConfigError(f"--sampler {sampler} draws from a range ({', '.join(ranges)}) and has no end of its own: "
                          "give --trials N")
    if ranges:
        return trials  # type: ignore[return-value]
    total = _grid_size(space)
    if trials is None and total > MAX_TRIALS:
        raise ConfigError(f"the grid has {total:,} points, more than {MAX_TRIALS:,}; give fewer values, or fit a "
                          "sample of it with --sampler random --trials N")
    if trials is not None and trials > total:
        log.info("search: --trials %d is more than the grid's %d point(s): fitting all of them", trials, total)
    return total if trials is None else min(trials, total)


def _seeds(seed: int, number: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([seed, number])


class Study:
    """The trials of one search: propose the next, record it, replay them from the journal on a restart.

    Args:
        journal: the study's file (JSON lines: a header, then one line per finished trial).
        space: the keys searched and their values or ranges.
        sampler: one of SAMPLERS.
        seed: seeds every draw of `random` and `tpe` (the grid ignores it).
        header: what else identifies the search (the head, its base config, the features); a journal with another
            header is replaced, with a log line, and the search starts over.
    """

    def __init__(self, journal: Path, space: dict[str, Dimension], sampler: str, seed: int, header: dict) -> None:
        self.journal, self.space, self.sampler, self.seed = Path(journal), space, sampler, seed
        self.header = json.loads(json.dumps({**header, "sampler": sampler, "seed": seed if sampler != "grid" else None,
                                             "space": describe(space)}))
        self.trials: list[dict] = self._replay()
        self._optuna = None

    # --- the journal ---------------------------------------------------------------------------------------------

    def _replay(self) -> list[dict]:
        if not self.journal.exists():
            return []
        lines = self.journal.read_text().splitlines()
        try:
            old = json.loads(lines[0])["study"] if lines else None
        except (ValueError, KeyError, TypeError):
            old = None
        if old != self.header:
            log.info("search: %s held another search (%s); starting this one afresh", self.journal,
                     "unreadable" if old is None else ", ".join(
                         f"{k}: {json.dumps(v)} (now {json.dumps(self.header.get(k))})"
                         for k, v in old.items() if self.header.get(k) != v))
            self.journal.unlink()
            return []
        trials = []
        for i, line in enumerate(lines[1:], start=2):
            try:
                trials.append(json.loads(line))
            except ValueError:  # the line a kill cut short: that trial runs again
                log.warning("search: %s line %d is incomplete (a search cut off while writing); that trial runs "
                            "again", self.journal, i)
                break
        if trials:
            log.info("search: resuming the study in %s: %d trial(s) already done", self.journal, len(trials))
        return trials

    def record(self, point: dict, metrics: dict, seconds: float) -> dict:
        """Appends a finished trial to the journal (flushed to disk, so a kill loses at most the trial running)."""
        entry = {"trial": len(self.trials) + 1, "point": point, "metrics": metrics, "seconds": round(seconds, 2)}
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.journal.exists()
        with open(self.journal, "a") as f:
            if fresh:
                f.write(json.dumps({"study": self.header}) + "\n")
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.trials.append(entry)
        return entry

    def repeat_of(self, point: dict) -> dict | None:
        """The earlier trial at exactly this point (its fit is deterministic, so it is not fitted again)."""
        return next((t for t in self.trials if t["point"] == point), None)

    # --- proposals -----------------------------------------------------------------------------------------------

    def propose(self, number: int | None = None) -> dict:
        """The point of trial `number` (default: the next, len(trials) + 1) from the finished trials; a number further
        on proposes for a batch of trials run at once (each from its own seed, over the same finished trials)."""
        number = len(self.trials) + 1 if number is None else number
        if self.sampler == "grid":
            return self._grid_point(number - 1)
        if self.sampler == "random":
            return self._random_point(number)
        return self._tpe_point(number)

    def _grid_point(self, index: int) -> dict:
        keys = list(self.space)
        combo = next(itertools.islice(itertools.product(*(self.space[k].values for k in keys)), index, None))
        return dict(zip(keys, combo))

    def _random_point(self, number: int) -> dict:
        rng = np.random.default_rng(_seeds(self.seed, number))
        if has_ranges(self.space):
            return {k: _draw(d, rng) for k, d in self.space.items()}
        # lists only: a point not drawn before (the space is finite and a repeat is a wasted fit)
        keys, sizes = list(self.space), [len(self.space[k].values) for k in self.space]
        seen = {tuple(json.dumps(t["point"][k]) for k in keys) for t in self.trials}
        for _ in range(100 * max(1, len(seen) + 1)):
            combo = tuple(int(rng.integers(s)) for s in sizes)
            point = {k: self.space[k].values[i] for k, i in zip(keys, combo)}
            if tuple(json.dumps(point[k]) for k in keys) not in seen:
                return point
        return point  # practically unreachable below the budget's cap (the grid's size)

    def _tpe_point(self, number: int) -> dict:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        distributions = {k: _distribution(d) for k, d in self.space.items()}
        study = optuna.create_study(direction="maximize")
        for t in self.trials:
            study.add_trial(optuna.trial.create_trial(
                params={k: _encode(self.space[k], t["point"][k]) for k in self.space},
                distributions=distributions, value=objective(t["metrics"]["val_accuracy"], t["metrics"]["val_loss"])))
        seed = int(_seeds(self.seed, number).generate_state(1)[0])
        study.sampler = optuna.samplers.TPESampler(seed=seed)
        trial = study.ask(distributions)
        return {k: _decode(self.space[k], trial.params[k]) for k in self.space}


def _draw(dim: Dimension, rng: np.random.Generator) -> Any:
    if isinstance(dim, Choice):
        return dim.values[int(rng.integers(len(dim.values)))]
    if dim.integer:
        if dim.log:  # each integer with the share of the log axis from it to the next: floor of e^U(ln low, ln high+1)
            value = math.exp(rng.uniform(math.log(dim.low), math.log(dim.high + 1)))
            return int(min(math.floor(value), dim.high))
        return int(rng.integers(dim.low, dim.high + 1))
    if dim.log:
        return float(math.exp(rng.uniform(math.log(dim.low), math.log(dim.high))))
    return float(rng.uniform(dim.low, dim.high))


def _distribution(dim: Dimension) -> Any:
    import optuna.distributions as od

    if isinstance(dim, Choice):  # Optuna's choices must be scalars: a list value (hidden=[256,128]) goes as JSON
        return od.CategoricalDistribution([json.dumps(v) for v in dim.values])
    if dim.integer:
        return od.IntDistribution(int(dim.low), int(dim.high), log=dim.log)
    return od.FloatDistribution(dim.low, dim.high, log=dim.log)


def _encode(dim: Dimension, value: Any) -> Any:
    return json.dumps(value) if isinstance(dim, Choice) else value


def _decode(dim: Dimension, value: Any) -> Any:
    if isinstance(dim, Choice):
        return json.loads(value)
    return int(value) if dim.integer else float(value)


def write_trials(folder: Path, name: str, rows: list[dict], summary: dict) -> None:
    """`folder/table.csv` (one row per trial; list values as JSON) and `folder/<name>` (the summary and the rows)."""
    columns = list(dict.fromkeys(c for row in rows for c in row))
    write_csv(folder / "table.csv", columns, ([json.dumps(row.get(c)) if isinstance(row.get(c), list) else row.get(c)
                                               for c in columns] for row in rows))
    write_json(folder / name, {**summary, "rows": rows})
