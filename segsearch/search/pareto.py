"""A multi-objective search's Pareto front, and `--pick` constraints that choose from it.

The front is of the trials' rows as the search reports them (`epochs.trial_rows`): each trial's
objectives at its best epoch by the first objective, the epoch whose model promote registers.
A trial that ASHA stopped early is on it too when nothing beats it: its model is as real.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from segsearch.errors import UserError
from segsearch.values import is_number

_COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    "<=": operator.le,
    ">=": operator.ge,
    "<": operator.lt,
    ">": operator.gt,
}
_CONSTRAINT = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|<|>)\s*(\S+)\s*$")


def values_of(row: Mapping[str, Any], names: Sequence[str]) -> list[float] | None:
    """The row's objective values in order, or None when one is missing (or NaN)."""
    values = [row.get(name) for name in names]
    if not all(is_number(v) and v == v for v in values):
        return None
    return [float(v) for v in values]


def dominates(a: Sequence[float], b: Sequence[float], modes: Sequence[str]) -> bool:
    """Whether `a` is at least as good as `b` in every objective and better in one."""
    better = False
    for x, y, mode in zip(a, b, modes, strict=True):
        if mode == "min":
            x, y = -x, -y
        if x < y:
            return False
        better = better or x > y
    return better


def pareto_front(
    rows: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]
) -> list[Mapping[str, Any]]:
    """The rows with every objective that no other such row dominates, best first objective
    first (a row whose values equal another front row's stays: neither dominates)."""
    names, modes = list(objectives), list(objectives.values())
    scored = [(row, values_of(row, names)) for row in rows]
    scored = [(row, values) for row, values in scored if values is not None]
    front = [
        (row, values)
        for row, values in scored
        if not any(dominates(other, values, modes) for _, other in scored)
    ]
    sign = -1.0 if modes[0] == "max" else 1.0
    front.sort(key=lambda pair: sign * pair[1][0])
    return [row for row, _ in front]


@dataclass(frozen=True)
class Constraint:
    """One `--pick` condition, e.g. `latency_ms<=20`."""

    name: str
    op: str
    bound: float

    def holds(self, row: Mapping[str, Any]) -> bool:
        value = row.get(self.name)
        return is_number(value) and _COMPARISONS[self.op](float(value), self.bound)

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.bound:g}"


def parse_pick(text: str, names: Sequence[str]) -> list[Constraint]:
    """`--pick` as constraints: NAME OP NUMBER, comma-separated, OP one of <= < >= >, NAME one of
    `names` (the search's objectives); UserError naming the constraint otherwise."""
    constraints = []
    for part in text.split(","):
        found = _CONSTRAINT.match(part)
        if not found:
            raise UserError(
                f"--pick {part.strip()!r}: expected NAME<=NUMBER (or <, >=, >), "
                "several separated by commas, e.g. latency_ms<=20,num_params<1e6"
            )
        name, op, bound = found.groups()
        if name not in names:
            raise UserError(
                f"--pick {part.strip()!r}: {name} is not an objective of the search; "
                f"use one of {list(names)}"
            )
        try:
            number = float(bound)
        except ValueError:
            raise UserError(f"--pick {part.strip()!r}: {bound!r} is not a number") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise UserError(f"--pick {part.strip()!r}: the bound must be a finite number")
        constraints.append(Constraint(name, op, number))
    return constraints


def pick(
    front: Sequence[Mapping[str, Any]], constraints: Sequence[Constraint], first: str, mode: str
) -> Mapping[str, Any] | None:
    """The front member best in the `first` objective among those meeting every constraint."""
    meeting = [row for row in front if all(c.holds(row) for c in constraints)]
    meeting = [row for row in meeting if is_number(row.get(first))]
    if not meeting:
        return None
    best = max if mode == "max" else min
    return best(meeting, key=lambda row: float(row[first]))


@dataclass(frozen=True)
class ParetoFront:
    """A multi-objective search's objectives (name → max|min, in order), every trial's row and
    the rows of those on the front (`pareto_front`), best first objective first."""

    objectives: dict[str, str]
    trials: list[dict[str, Any]]
    members: list[dict[str, Any]]

    @classmethod
    def of(cls, rows: Sequence[dict[str, Any]], objectives: Mapping[str, str]) -> ParetoFront:
        return cls(dict(objectives), list(rows), list(pareto_front(rows, objectives)))

    def describe(self) -> str:
        """The front as the search's summary prints it."""
        head = f"Pareto front ({len(self.members)} of {len(self.trials)} trials):\n"
        return head + front_table(self.members, self.objectives)

    def to_dict(self) -> dict[str, Any]:
        return {"objectives": self.objectives, "front": [m["trial_id"] for m in self.members]}


def front_table(front: Sequence[Mapping[str, Any]], objectives: Mapping[str, str]) -> str:
    """The front as aligned text: a row per member, a column per objective."""
    header = ["trial", *(f"{name} ({mode})" for name, mode in objectives.items())]
    lines = [header] + [
        [str(row.get("trial_id", "?")), *(_shown(row.get(name)) for name in objectives)]
        for row in front
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() for line in lines
    )


def _shown(value: Any) -> str:
    if not is_number(value):
        return "-"
    return f"{value:.4g}" if abs(value) >= 1 or value == 0 else f"{value:.4f}"
