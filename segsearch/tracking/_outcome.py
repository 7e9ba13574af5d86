"""How one trial ended, read from a Tune Result: what the tracker and the pictures need of it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from segsearch.values import is_number

COMPLETED, STOPPED_EARLY, ERROR, RUNNING = "completed", "stopped_early", "error", "running"


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    status: str
    error: str | None = None  # the failure's text, when it failed
    checkpoint: str | None = None
    filesystem: Any = field(default=None, compare=False)

    def value(self, metric: str) -> float | None:
        """The trial's last reported `metric`, or None when it has none (or NaN)."""
        score = self.metrics.get(metric)
        if not is_number(score) or math.isnan(score):
            return None
        return float(score)


def epoch_of(metrics: dict[str, Any]) -> int:
    """The epoch a result is about: `epoch` from training, else Tune's iteration count."""
    epoch = metrics.get("epoch")
    if epoch is None:
        epoch = metrics.get("training_iteration") or 0
    return int(epoch)


def end_status(metrics: dict[str, Any], *, epochs: int, failed: bool) -> str:
    """error, completed (ran every epoch) or stopped_early (ASHA stopped it before the last)."""
    if failed:
        return ERROR
    return COMPLETED if epoch_of(metrics) >= epochs else STOPPED_EARLY


def outcome_of(result: Any, *, epochs: int) -> TrialOutcome:
    """A Tune Result as a TrialOutcome (the trial id comes from the reported metrics)."""
    metrics = dict(result.metrics or {})
    error = str(result.error) if result.error else None
    return TrialOutcome(
        trial_id=str(metrics.get("trial_id", "")),
        config=dict(result.config or {}),
        metrics=metrics,
        status=end_status(metrics, epochs=epochs, failed=result.error is not None),
        error=error,
        checkpoint=metrics.get("checkpoint_path"),
        filesystem=result.filesystem,
    )


def error_text(text: str) -> str:
    """The last non-empty line of a traceback: the exception and its message."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "error"


def best_of(outcomes: list[TrialOutcome], *, metric: str, mode: str) -> TrialOutcome | None:
    """The trial with the best last `metric` among those that did not fail."""
    scored = [o for o in outcomes if o.status != ERROR and o.value(metric) is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda o: o.value(metric))
