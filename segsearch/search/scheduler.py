"""Tune's trial scheduler for a search: ASHA early stopping, or none."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from segsearch.search.epochs import score_of
from segsearch.space import SearchSpec
from segsearch.values import is_number


class BestEpochASHA(ASHAScheduler):
    """ASHA that ranks a trial at each rung by its best epoch so far, as the search scores
    trials (search/epochs.py), not by the rung epoch's score alone: one epoch's val score is
    noisy early in training, and a trial that dipped at its rung could be stopped against one
    it had beaten the epoch before."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._best: dict[str, float] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return super().on_trial_result(tune_controller, trial, self._so_far(trial, result))

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        super().on_trial_complete(tune_controller, trial, self._so_far(trial, result))
        self._best.pop(trial.trial_id, None)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        super().on_trial_remove(tune_controller, trial)
        self._best.pop(trial.trial_id, None)

    def _so_far(self, trial: Any, result: dict) -> dict:
        """`result` with its metric replaced by the trial's best score up to this epoch."""
        if not is_number(result.get(self._metric)):
            return result
        score = score_of(result, self._metric)  # None for NaN
        earlier = self._best.get(trial.trial_id)
        if earlier is not None and (score is None or self._metric_op * (score - earlier) < 0):
            score = earlier  # a worse epoch, or a NaN one, does not lower the trial's best
        if score is None:
            return result
        self._best[trial.trial_id] = score
        return {**result, self._metric: score}


def trial_scheduler(spec: SearchSpec) -> TrialScheduler:
    """ASHA over the search's epochs (rungs from `grace_for`), or every trial run to its end."""
    if spec.scheduler.kind != "asha":
        return FIFOScheduler()
    return BestEpochASHA(
        time_attr="epoch",  # a trial Tune restarted counts its iterations from 1 again
        max_t=spec.epochs,
        grace_period=spec.scheduler.grace_for(spec.epochs),
        reduction_factor=spec.scheduler.reduction_factor,
    )
