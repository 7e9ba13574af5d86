"""Tune's trial scheduler for a search: ASHA early stopping, or none."""

from __future__ import annotations

from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from segsearch.space import SearchSpec


def trial_scheduler(spec: SearchSpec) -> TrialScheduler:
    """ASHA over the search's epochs (rungs from `grace_for`), or every trial run to its end."""
    if spec.scheduler.kind != "asha":
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",  # a trial Tune restarted counts its iterations from 1 again
        max_t=spec.epochs,
        grace_period=spec.scheduler.grace_for(spec.epochs),
        reduction_factor=spec.scheduler.reduction_factor,
    )
