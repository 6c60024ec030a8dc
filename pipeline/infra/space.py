"""A search space from `KEY=VALUES` strings: lists of values, and ranges for samplers that draw from them.

    dropout=[0.2,0.35,0.5]     three values (any YAML list; one value alone is a list of one)
    hidden=[256,512,1024]      for a list-valued key each value is wrapped: [256], [512], [1024]
    dropout=(0.0,0.6)          uniform between the bounds (random and TPE samplers only)
    lr=log(1e-4,1e-2)          log-uniform between the bounds (random and TPE samplers only)
    epochs=(5,40)              integers from 5 to 40 when the key is an integer (log(...) too)

Values are read as params.yaml is (pipeline/infra/config.py ParamsLoader): `3e-4` and `1E5` are numbers, as DVC's `-S`
reads them. A spec that does not parse is one error naming it and saying what
would; the keys and their value types come from the section's typed config (`base`), so a misspelt key or a bound
params.yaml would refuse stops a search before anything runs.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

import yaml

from pipeline.infra.config import ConfigError, ParamsLoader, build, to_dict

_RANGE = re.compile(r"^\s*(log)?\s*\((.*)\)\s*$", re.DOTALL)


def load_value(text: str) -> Any:
    """YAML text as a command line means it (YAML 1.2 floats)."""
    return yaml.load(text, Loader=ParamsLoader)


@dataclass(frozen=True)
class Choice:
    """A key that takes one of `values` (the grid's only kind)."""

    values: tuple

    def describe(self) -> str:
        return json.dumps(list(self.values))


@dataclass(frozen=True)
class Range:
    """A key drawn between `low` and `high` (both included), uniformly or on a log scale, as integers or floats."""

    low: float
    high: float
    log: bool
    integer: bool

    def describe(self) -> str:
        bounds = f"({_text(self.low)},{_text(self.high)})"
        return f"log{bounds}" if self.log else bounds


Dimension = Choice | Range


def _text(value: float) -> str:
    return str(int(value)) if isinstance(value, int) else repr(float(value))


def has_ranges(space: dict[str, Dimension]) -> bool:
    return any(isinstance(d, Range) for d in space.values())


def describe(space: dict[str, Dimension]) -> dict[str, str]:
    """{key: the dimension as text}, a canonical form for the study's header and the results file."""
    return {key: dim.describe() for key, dim in space.items()}


def parse_space(specs: list[str], base: Any, prefix: str, flag: str = "--grid") -> dict[str, Dimension]:
    """`key=VALUES` strings to {key: Choice | Range}, in the order given.

    Args:
        specs: the strings as typed, e.g. ``["lr=log(1e-4,1e-2)", "hidden=[256,512]"]``.
        base: the section's typed config: its keys are the keys allowed, its values' types decide how a range is
            drawn (an integer key draws integers).
        prefix: the section's name in params.yaml (``heads.mlp``), for messages.
        flag: the command-line flag the specs came from, for messages.

    Raises:
        ConfigError: no spec at all, a spec that does not parse, an unknown or repeated key, no values, a value listed
            twice, a range for a key that is not a number, or bounds out of order (log: not above 0).
    """
    defaults = to_dict(base)
    if not specs:
        raise ConfigError(f"no {flag} given: nothing to search; give at least one {flag} KEY=VALUES, e.g. {flag} "
                          f"'{next(iter(defaults))}=[...]' (keys of {prefix}: {', '.join(defaults)})")
    space: dict[str, Dimension] = {}
    for spec in specs:
        key, sep, text = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"{flag} '{spec}': expected KEY=VALUES, e.g. dropout=[0.2,0.5] or lr=log(1e-4,1e-2)")
        if key not in defaults:
            raise ConfigError(f"{flag}: unknown key '{prefix}.{key}'; allowed keys: {', '.join(defaults)}")
        if key in space:
            raise ConfigError(f"{flag}: '{key}' given twice")
        match = _RANGE.match(text)
        space[key] = (_range(spec, key, match, defaults[key], prefix, flag) if match
                      else _choice(spec, text, defaults[key], flag))
    return space


def _choice(spec: str, text: str, default: Any, flag: str) -> Choice:
    try:
        values = load_value(text)
    except yaml.YAMLError:
        raise ConfigError(f"{flag} '{spec}': the values are neither a YAML list like [0.2,0.5] nor a range like "
                          "(0.0,0.6) or log(1e-4,1e-2)") from None
    values = values if isinstance(values, list) else [values]
    if isinstance(default, list):
        values = [v if isinstance(v, list) else [v] for v in values]
    if not values:
        raise ConfigError(f"{flag} '{spec}': no values")
    for i, value in enumerate(values):
        if value in values[:i]:
            raise ConfigError(f"{flag} '{spec}': {json.dumps(value)} is listed twice; list each value once")
    return Choice(tuple(values))


def _range(spec: str, key: str, match: re.Match, default: Any, prefix: str, flag: str) -> Range:
    log, inner = bool(match.group(1)), match.group(2)
    example = "log(1e-4,1e-2)" if log else "(0.0,0.6)"
    if isinstance(default, bool) or not isinstance(default, (int, float)):
        raise ConfigError(f"{flag} '{spec}': {prefix}.{key} is not a number, so it has no range; list its values, "
                          f"e.g. {key}=[...]")
    parts = inner.split(",")
    try:
        bounds = [load_value(p) for p in parts]
    except yaml.YAMLError:
        bounds = []
    if len(bounds) != 2 or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bounds):
        raise ConfigError(f"{flag} '{spec}': a range is two numbers, LOW,HIGH, e.g. {key}={example}")
    low, high = bounds
    if not all(math.isfinite(b) for b in bounds):
        raise ConfigError(f"{flag} '{spec}': the bounds must be finite numbers")
    integer = isinstance(default, int)
    if integer and not all(isinstance(b, int) for b in bounds):
        raise ConfigError(f"{flag} '{spec}': {prefix}.{key} is an integer; give integer bounds, e.g. {key}=(1,10)")
    if not low < high:
        raise ConfigError(f"{flag} '{spec}': LOW must be below HIGH (got {low} and {high}); for one value write "
                          f"{key}=[{low}]")
    if log and low <= 0:
        raise ConfigError(f"{flag} '{spec}': a log range needs LOW above 0 (got {low})")
    return Range(low if integer else float(low), high if integer else float(high), log, integer)


def check_space(base: Any, space: dict[str, Dimension], prefix: str) -> None:
    """Refuses, before any trial, a value params.yaml would refuse: every listed value, and both ends of a range (the
    config's limits are intervals, so a range whose ends pass lies inside them)."""
    for key, dim in space.items():
        for value in (dim.values if isinstance(dim, Choice) else (dim.low, dim.high)):
            build(type(base), {**to_dict(base), key: value}, prefix)


def yaml_text(value: Any) -> str:
    """`value` as YAML text that any YAML reader takes for the same value (a `-S` value, a params.yaml entry): a
    float always with a decimal point and a signed exponent (1.0e-05: YAML 1.1 readers take 1e-05 for a string); the
    rest as JSON, a subset of YAML."""
    if isinstance(value, float):
        mantissa, e, exponent = repr(value).partition("e")  # repr's exponent is always signed: 1e-05, 1e+16
        return (mantissa if "." in mantissa else f"{mantissa}.0") + e + exponent
    if isinstance(value, list):
        return "[" + ", ".join(yaml_text(v) for v in value) + "]"
    return json.dumps(value)
