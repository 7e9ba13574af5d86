"""Which epoch of a trial counts: the one with the best score, not the last one.

Train keeps that epoch's checkpoint (trial.py `checkpoint_config`), so the model a trial offers is
the one that earned its score.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from segsearch.search.progress import result_epoch
from segsearch.values import is_number


def score_of(row: Mapping[str, Any], metric: str) -> float | None:
    """A result's `metric` as a float, or None when it has none (or NaN)."""
    value = row.get(metric)
    if not is_number(value) or math.isnan(value):
        return None
    return float(value)


def best_row(
    history: Sequence[Mapping[str, Any]], *, metric: str, mode: str
) -> Mapping[str, Any] | None:
    """The epoch with the best `metric`, the latest of equal ones (the one Train keeps); None
    when no epoch has it."""
    scored = [row for row in history if score_of(row, metric) is not None]
    if not scored:
        return None
    sign = 1.0 if mode == "max" else -1.0
    return max(reversed(scored), key=lambda row: sign * score_of(row, metric))


def trial_rows(grid: Any, *, metric: str, mode: str, held_out: bool = True) -> list[dict[str, Any]]:
    """A row per trial of a Tune ResultGrid, best first: its score and checkpoint are its best
    epoch's (`metric`, `best_epoch`, `checkpoint`), beside its last score (`last`).

    Without a held-out split (`held_out=False`: trained on val too) no epoch can be chosen:
    the score is None and the checkpoint the last epoch's.
    """
    from segsearch.errors import last_line

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        frame = result.metrics_dataframe
        history = _once_per_epoch([] if frame is None else frame.to_dict("records"))
        best = best_row(history or [metrics], metric=metric, mode=mode) if held_out else None
        checkpoint = (best or {}).get("checkpoint_path")
        rows.append(
            {
                "trial_id": metrics.get("trial_id", "?"),
                metric: None if best is None else score_of(best, metric),
                "last": score_of(metrics, metric) if held_out else None,
                "best_epoch": None if best is None else _epoch(best),
                "epochs": result_epoch(metrics),
                "config": result.config or {},
                "checkpoint": checkpoint
                if isinstance(checkpoint, str)
                else metrics.get("checkpoint_path"),
                "error": last_line(result.error) if result.error else None,
                "history": history,
            }
        )
    sign = -1 if mode == "max" else 1
    rows.sort(key=lambda r: math.inf if r[metric] is None else sign * r[metric])
    return rows


def _epoch(row: Mapping[str, Any]) -> int | None:
    value = row.get("epoch", row.get("training_iteration"))
    return int(value) if is_number(value) and not math.isnan(value) else None


def _once_per_epoch(history: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """A trial's reports, each epoch once: a resumed trial reports its restored epoch again
    (train.py), which Tune's history then holds twice."""
    seen: set[int | None] = set()
    once = []
    for row in history:
        epoch = _epoch(row)
        if epoch is None or epoch not in seen:
            once.append(row)
        seen.add(epoch)
    return once
