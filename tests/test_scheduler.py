"""ASHA as a search runs it: rungs from the search's epochs, trials ranked as the search ranks
them. Driven through Tune's scheduler interface with the results a trial reports."""

from __future__ import annotations

import math
from types import SimpleNamespace

from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from segsearch.search.scheduler import trial_scheduler
from segsearch.space import parse_space

CONTINUE, STOP = TrialScheduler.CONTINUE, TrialScheduler.STOP


def spec(**overrides):
    raw = {
        "name": "s",
        "trials": 6,
        "epochs": 6,
        "scheduler": {"grace_period": 2},
        "space": {"optim.lr": {"float": [1e-3, 1e-1], "log": True}},
    }
    return parse_space({**raw, **overrides})


def started(scheduler: TrialScheduler, *names: str) -> list[SimpleNamespace]:
    scheduler.set_search_properties("val_miou", "max")  # as Tune does from TuneConfig
    trials = [SimpleNamespace(trial_id=name) for name in names]
    for trial in trials:
        scheduler.on_trial_add(None, trial)
    return trials


def report(scheduler: TrialScheduler, trial, *scores: float) -> list[str]:
    return [
        scheduler.on_trial_result(None, trial, {"epoch": epoch, "val_miou": score})
        for epoch, score in enumerate(scores, start=1)
    ]


def test_asha_ranks_a_trial_at_its_rung_by_its_best_epoch_so_far():
    """A trial's score is its best epoch's (search/epochs.py). On ISBI, ASHA compared one
    epoch's noisy score: a trial at 0.597 then 0.518 was stopped at its rung against one at
    0.548 then 0.533, and the stopped configuration was the better one at 12 epochs."""
    scheduler = trial_scheduler(spec())
    leader, dipped, weak = started(scheduler, "leader", "dipped", "weak")
    assert report(scheduler, leader, 0.548, 0.533) == [CONTINUE, CONTINUE]
    assert report(scheduler, dipped, 0.597, 0.518) == [CONTINUE, CONTINUE]
    assert report(scheduler, weak, 0.30, 0.40) == [CONTINUE, STOP]


def test_an_epoch_without_a_score_or_a_nan_one_keeps_the_trials_best_and_none_stops_nothing():
    scheduler = trial_scheduler(spec())
    first, diverged, later = started(scheduler, "first", "diverged", "later")
    assert scheduler.on_trial_result(None, first, {"epoch": 1}) == CONTINUE
    assert report(scheduler, first, 0.5, 0.5) == [CONTINUE, CONTINUE]
    assert report(scheduler, diverged, 0.6, math.nan) == [CONTINUE, CONTINUE]
    # The rung holds `diverged` at 0.6, not NaN, so 0.55 is below the top third of 0.5 and 0.6.
    assert report(scheduler, later, 0.55, 0.55) == [CONTINUE, STOP]
    assert isinstance(trial_scheduler(spec(scheduler={"kind": "none"})), FIFOScheduler)
