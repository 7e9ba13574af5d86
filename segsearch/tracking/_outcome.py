"""How one trial ended, read from a Tune Result: what the tracker and the pictures need of it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from segsearch.search.epochs import best_row, score_of

COMPLETED, STOPPED_EARLY, ERROR, RUNNING = "completed", "stopped_early", "error", "running"


@dataclass(frozen=True)
class TrialOutcome:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]  # the last result
    status: str
    error: str | None = None  # the failure's text, when it failed
    checkpoint: str | None = None  # the best epoch's
    filesystem: Any = field(default=None, compare=False)
    best: dict[str, Any] | None = None  # the best epoch's result; None: the last one counts

    def value(self, metric: str) -> float | None:
        """The trial's score: `metric` of its best epoch, or None when it has none (or NaN)."""
        return score_of(self.best if self.best is not None else self.metrics, metric)

    @property
    def best_epoch(self) -> int:
        return epoch_of(self.best if self.best is not None else self.metrics)


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


def outcome_of(
    result: Any, *, epochs: int, metric: str | None = None, mode: str = "max"
) -> TrialOutcome:
    """A Tune Result as a TrialOutcome (the trial id comes from the reported metrics); with a
    `metric`, its score and checkpoint are those of its best epoch."""
    metrics = dict(result.metrics or {})
    error = str(result.error) if result.error else None
    best = _best_result(result, metric=metric, mode=mode)
    checkpoint = (best or {}).get("checkpoint_path")
    if not isinstance(checkpoint, str) or not checkpoint:
        checkpoint = metrics.get("checkpoint_path")
    return TrialOutcome(
        trial_id=str(metrics.get("trial_id", "")),
        config=dict(result.config or {}),
        metrics=metrics,
        status=end_status(metrics, epochs=epochs, failed=result.error is not None),
        error=error,
        checkpoint=checkpoint,
        filesystem=result.filesystem,
        best=best,
    )


def _best_result(result: Any, *, metric: str | None, mode: str) -> dict[str, Any] | None:
    """The best epoch's row of a Result's history (the last result when it has no history)."""
    if metric is None:
        return None
    history = getattr(result, "metrics_dataframe", None)
    rows = [] if history is None else history.to_dict("records")
    best = best_row(rows or [dict(result.metrics or {})], metric=metric, mode=mode)
    return None if best is None else dict(best)


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
