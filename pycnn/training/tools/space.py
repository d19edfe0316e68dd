"""The search space of ``pycnn search``: distributions over ``Config`` settings, read from a
TOML ``[space]`` table or ``--param`` flags, and how a stage's results narrow it for the next
stage (with the edge-of-range warning)."""
from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

from pycnn.training.config import Config, ConfigError

KINDS = ("log_uniform", "uniform", "choice")
_ALIASES = {"log": "log_uniform", "loguniform": "log_uniform", "log-uniform": "log_uniform", "lin": "uniform"}
NOT_SEARCHABLE = {"epochs": "the stage sets it (--epochs, --fine-epochs)", "fold": "set by the k-fold driver",
                  "folds": "a search validates on the held-out split"}
EDGE = 0.1   # a best value in the outer 10% of a range (in log space for log-uniform ones) is on its edge


class SearchError(ValueError):
    """A search cannot run as asked (a bad space, a folder in use); the message names the argument."""


@dataclasses.dataclass(frozen=True)
class Dist:
    key: str
    kind: str           # log_uniform | uniform | choice
    values: tuple       # (low, high), or the choices

    def sample(self, rng: np.random.Generator):
        if self.kind == "choice":
            value = self.values[int(rng.integers(len(self.values)))]
        else:
            low, high = self.values
            value = 10 ** rng.uniform(math.log10(low), math.log10(high)) if self.kind == "log_uniform" \
                else rng.uniform(low, high)
        return _typed(self.key, value)

    def position(self, value) -> float | None:
        """Where ``value`` lies in the range, 0 (low end) to 1 (high end); None for choices."""
        if self.kind == "choice":
            return None
        low, high = self.values
        f = math.log10 if self.kind == "log_uniform" else float
        return (f(value) - f(low)) / (f(high) - f(low)) if high > low else 0.5

    def describe(self) -> str:
        if self.kind == "choice":
            return f"{self.key} ~ choice({', '.join(map(_fmt, self.values))})"
        return f"{self.key} ~ {self.kind}({_fmt(self.values[0])}, {_fmt(self.values[1])})"

    def to_dict(self) -> dict:
        return {self.kind: [list(v) if isinstance(v, tuple) else v for v in self.values]}


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(list(v) if isinstance(v, tuple) else v)


def _typed(key: str, value):
    if key in Config.INTEGERS:
        return int(round(value))
    if isinstance(value, list):
        return tuple(value)
    return float(value) if isinstance(value, (float, np.floating)) else value


DEFAULT_SPACE = {"lr": Dist("lr", "log_uniform", (1e-3, 1.0)),
                 "weight_decay": Dist("weight_decay", "log_uniform", (1e-6, 1e-2))}


def make_dist(key: str, kind: str, values, where: str = "space") -> Dist:
    """A checked distribution: SearchError naming ``where`` and the key otherwise."""
    fields = {f.name for f in dataclasses.fields(Config)}
    if key not in fields:
        raise SearchError(f"{where}: {key!r} is not a setting of pycnn train (the keys are its flags with _ for -)")
    if key in NOT_SEARCHABLE:
        raise SearchError(f"{where}: {key} cannot be searched ({NOT_SEARCHABLE[key]})")
    kind = _ALIASES.get(kind, kind)
    if kind not in KINDS:
        raise SearchError(f"{where}: {key} has distribution {kind!r}; use one of {', '.join(KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise SearchError(f"{where}: {key} = {{{kind} = ...}} needs a list, got {values!r}")
    if kind == "choice":
        values = tuple(tuple(v) if isinstance(v, list) else v for v in values)
        if key in Config.INTEGERS:  # whole numbers only: 1.5 would be rounded, "a" cannot be
            wrong = [v for v in values if isinstance(v, bool) or not isinstance(v, (int, float, np.integer,
                                                                                    np.floating))
                     or not float(v).is_integer()]
            if wrong:
                raise SearchError(f"{where}: {key} = {{choice = [...]}} needs whole numbers, got {_fmt(wrong[0])}")
    else:
        if key not in Config.NUMBERS and key not in Config.INTEGERS:
            raise SearchError(f"{where}: {key} is not a number setting; search it with choice = [...]")
        if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            raise SearchError(f"{where}: {key} = {{{kind} = [low, high]}} needs two numbers, got {list(values)}")
        low, high = float(values[0]), float(values[1])
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SearchError(f"{where}: {key} needs low < high, got [{values[0]}, {values[1]}]")
        if kind == "log_uniform" and low <= 0:
            raise SearchError(f"{where}: {key} is log-uniform, so its range must be positive, got [{low:g}, {high:g}]")
        values = (low, high)
    dist = Dist(key, kind, values)
    for v in (values if kind == "choice" else values):  # every end of the range must be a valid setting
        try:
            Config(**{key: _typed(key, v)})
        except ConfigError as exc:
            raise SearchError(f"{where}: {key} = {_fmt(v)} is not a valid setting ({exc})") from None
    return dist


def parse_space(table: dict, where: str) -> dict:
    """The [space] table of a TOML file: ``key = {log_uniform = [a, b]}`` (or uniform, choice)."""
    if not isinstance(table, dict):
        raise SearchError(f"{where}: [space] must be a table of key = {{kind = [...]}}")
    space = {}
    for key, spec in table.items():
        if not isinstance(spec, dict) or len(spec) != 1:
            raise SearchError(f"{where}: {key} must be one distribution such as {{log_uniform = [1e-4, 1e-1]}}, "
                              f"got {spec!r}")
        (kind, values), = spec.items()
        space[key] = make_dist(key, kind, values, where)
    return space


_PARAM = re.compile(r"^\s*([a-z_]+)\s*=\s*([a-z_-]+)\s*:\s*(.+)$")


def parse_param(text: str) -> Dist:
    """``--param lr=log:1e-4,1e-1``, ``--param dropout=uniform:0,0.5``,
    ``--param batch_size=choice:32,64,128``, ``--param widths=choice:16/32,32/64``."""
    key_part, eq, rest_part = text.partition("=")
    match = _PARAM.match(key_part.replace("-", "_") + eq + rest_part)
    if not match:
        raise SearchError(f"--param: expected KEY=KIND:VALUES such as lr=log:1e-4,1e-1, got {text!r}")
    key, kind, rest = match.groups()

    def value(s):
        s = s.strip()
        if "/" in s:
            return [int(p) for p in s.split("/")]
        if s.lower() in ("true", "false"):
            return s.lower() == "true"
        for cast in (int, float):
            try:
                return cast(s)
            except ValueError:
                pass
        return s

    try:
        values = [value(s) for s in rest.split(",")]
    except ValueError:
        raise SearchError(f"--param: cannot read the values of {text!r}") from None
    return make_dist(key, kind, values, "--param")


# ------------------------------------------------------------------------- coarse to fine

def narrow(space: dict, scored: list, top: int) -> tuple[dict, list]:
    """(the next stage's space, warnings): each numeric range shrinks to the span of the
    ``top`` best trials plus a margin (at least an eighth of the old range), inside the old
    range, except past an edge where the best value lies; choices keep those the top trials used."""
    best = sorted(scored, key=lambda s: -s[1])[:max(1, top)]
    new, warnings = {}, edge_warnings(space, best[0][0].values) if best else []
    for key, dist in space.items():
        used = [spec.values[key] for spec, _ in best]
        if dist.kind == "choice":
            keep = tuple(v for v in dist.values if (list(v) if isinstance(v, tuple) else v) in used)
            new[key] = Dist(key, "choice", keep or dist.values)
            continue
        log = dist.kind == "log_uniform"
        f, inv = (math.log10, lambda u: 10 ** u) if log else (float, float)
        low, high = f(dist.values[0]), f(dist.values[1])
        us = [f(v) for v in used]
        margin = max(0.25 * (max(us) - min(us)), (high - low) / 8)
        lo, hi = max(min(us) - margin, low), min(max(us) + margin, high)
        p = dist.position(best[0][0].values[key])
        if p <= EDGE:
            lo = f(best[0][0].values[key]) - margin
        if p >= 1 - EDGE:
            hi = f(best[0][0].values[key]) + margin
        lo, hi = _within_config(key, inv(lo), inv(hi))
        new[key] = Dist(key, dist.kind, (lo, hi))
    return new, warnings


def _within_config(key, lo, hi):
    if key in Config.NUMBERS:
        low, high, low_in, high_in = Config.NUMBERS[key]
        eps = 1e-9 * max(1.0, abs(high) if math.isfinite(high) else 1.0)
        lo = max(lo, low if low_in else low + eps)
        hi = min(hi, high if high_in else high - eps)
    if key in Config.INTEGERS:
        lo = max(lo, Config.INTEGERS[key])
    return float(lo), float(max(hi, lo * (1 + 1e-9) + 1e-12))


def edge_warnings(space: dict, best_values: dict) -> list:
    out = []
    for key, dist in space.items():
        p = dist.position(best_values[key]) if key in best_values else None
        if p is None or EDGE < p < 1 - EDGE:
            continue
        side = "lower" if p <= EDGE else "upper"
        out.append(f"{key}: the best value {_fmt(best_values[key])} lies at the {side} edge of the searched range "
                   f"[{_fmt(dist.values[0])}, {_fmt(dist.values[1])}]: better values may lie beyond it")
    return out
