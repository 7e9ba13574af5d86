"""A budget given on `--resume`: the resumed search runs under it, or is refused before anything
is written when it cannot apply (another kind, or a search started without a budget)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient

from segsearch.data.demo import make_demo_dataset
from segsearch.errors import UserError
from segsearch.search.budget import resumed_budget
from segsearch.search.tuner import run_search
from segsearch.space import BudgetSpec, parse_space

TRIALS = 3
SPACE = {
    "trials": TRIALS,
    "epochs": 1,
    "max_concurrent": 1,
    "scheduler": {"kind": "none"},
    "sampler": {"kind": "random", "seed": 0},
    "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2, "model.arch": "fcn"},
    "space": {"model.width": {"choice": [4, 8]}},
}
#: Less than any trial costs: the first trial runs (nothing is known before it), then no other.
TINY = {"cpu_hours": 0.1 / 3600}
LARGE = {"cpu_hours": 1.0}


def test_a_resumed_search_keeps_its_budget_unless_given_one_of_the_same_kind():
    started = BudgetSpec(cpu_hours=0.5)
    assert resumed_budget("s", started, None) is started
    assert resumed_budget("s", started, BudgetSpec(cpu_hours=2)) == BudgetSpec(cpu_hours=2)
    assert resumed_budget("s", None, None) is None


def test_a_budget_that_cannot_apply_on_resume_is_one_line():
    with pytest.raises(UserError) as err:
        resumed_budget("s", BudgetSpec(cpu_hours=0.5), BudgetSpec(wall="6h"))
    assert str(err.value) == (
        "budget wall=6h: search 's' has budget cpu_hours=0.5 and resumes with a budget of that "
        "kind only; give --budget cpu_hours=AMOUNT"
    )
    with pytest.raises(UserError) as err:
        resumed_budget("s", None, BudgetSpec(wall="6h"))
    assert str(err.value) == (
        "budget wall=6h: search 's' has no budget and resumes without one; start a new search "
        "(another --name) to search within a budget"
    )


def _written(tmp_path: Path, name: str, tracking: str) -> tuple:
    """What a refused resume must leave as it was: the search's Tune files, its parent run,
    its study's trials."""
    runs = tmp_path / "runs" / name
    files = sorted((str(p), p.stat().st_mtime_ns) for p in runs.rglob("*") if p.is_file())
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name(name).experiment_id
    mlflow_runs = sorted(
        (r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())))
        for r in client.search_runs([experiment])
    )
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path}/optuna.db")
    trials = [(t.number, t.state, t.datetime_complete) for t in study.get_trials()]
    return files, mlflow_runs, trials


@pytest.mark.slow
def test_a_resumed_search_runs_under_the_budget_given_or_refuses_one_that_cannot_apply(
    ray_cluster, tmp_path: Path
):
    """A search its budget stopped, resumed with a larger budget, runs its remaining trials and
    reports the budget it ran under; a budget of another kind, or one for a search started
    without a budget, is refused before anything is written."""
    data = tmp_path / "data"
    make_demo_dataset(str(data), n_train=16, n_val=8, size=(32, 32), seed=3)
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    options = {"dataset": str(data), "storage": str(tmp_path / "runs"), "tracking_uri": tracking}
    lines: list[str] = []

    def search(name: str, budget: dict | None, *, resume: bool = False, trials: int = TRIALS):
        space = {"name": name, **SPACE, "trials": trials, **({"budget": budget} if budget else {})}
        return run_search(parse_space(space), resume=resume, echo=lines.append, **options)

    first = search("rebudgeted", TINY)
    assert first.budget.stopped and first.budget.trials_ran == 1

    before = _written(tmp_path, "rebudgeted", tracking)
    with pytest.raises(UserError, match=r"^budget wall=6h: search 'rebudgeted' has budget cpu_"):
        search("rebudgeted", {"wall": "6h"}, resume=True)
    assert _written(tmp_path, "rebudgeted", tracking) == before

    lines.clear()
    resumed = search("rebudgeted", LARGE, resume=True)
    assert f"budget: cpu_hours=1 from now on (was cpu_hours={TINY['cpu_hours']:g})" in lines
    assert resumed.budget.budget == BudgetSpec(**LARGE) and not resumed.budget.stopped
    assert resumed.budget.trials_ran == len(resumed.trials) == TRIALS
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("rebudgeted").experiment_id
    (parent,) = client.search_runs([experiment], "tags.`segsearch.role` = 'search'")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["segsearch.budget"] == resumed.budget.describe()
    assert "cpu_hours=1)" in parent.data.tags["segsearch.budget"]
    again = search("rebudgeted", None, resume=True)  # keeps the budget it last resumed with
    assert again.budget.budget == BudgetSpec(**LARGE) and len(again.trials) == TRIALS

    search("unbudgeted", None, trials=1)
    before = _written(tmp_path, "unbudgeted", tracking)
    with pytest.raises(UserError, match=r"^budget cpu_hours=1: search 'unbudgeted' has no budget"):
        search("unbudgeted", LARGE, resume=True, trials=1)
    assert _written(tmp_path, "unbudgeted", tracking) == before


def test_a_restored_generator_reopens_a_search_its_budget_stopped_only_with_room_left():
    """Tune saves that its generator finished; restored, it suggests no trial unless reopened."""
    from ray.tune.search import Searcher

    from segsearch.search.budget import Ledger, budgeted
    from segsearch.search.refit import FixedConfigs
    from segsearch.space import ResourcesSpec

    ledger = Ledger("reopened", BudgetSpec(cpu_hours=10 / 3600), ResourcesSpec(), epochs=1)
    generator = budgeted(FixedConfigs([{}, {}]), ledger, concurrency=1)
    ledger.started("a")
    ledger.record("a", 12, 1)
    ledger.ended("a")
    assert generator.searcher.suggest("b") == Searcher.FINISHED and ledger.stopped
    generator.set_finished()
    saved = {**generator.get_state(), "total_samples": 2}  # Tune's num_samples: 1 more to go

    generator.set_state(saved)  # the same budget: still spent
    assert generator.is_finished() and ledger.stopped
    ledger.apply(BudgetSpec(cpu_hours=60 / 3600))
    generator.set_state(saved)
    assert not generator.is_finished() and not ledger.stopped


def test_the_stopper_in_tunes_experiment_state_counts_on_the_restored_tuners_ledger():
    """A resumed controller takes its stopper from Tune's experiment state, pickled apart from
    tuner.pkl: its ledger must be the one the searcher and the costs callback use."""
    import ray.cloudpickle

    from segsearch.search.budget import BudgetSearch, BudgetStopper, Ledger, forget_ledger
    from segsearch.search.refit import FixedConfigs
    from segsearch.space import ResourcesSpec

    ledger = Ledger("split", BudgetSpec(cpu_hours=10 / 3600), ResourcesSpec(), epochs=1)
    tuner_pkl = ray.cloudpickle.dumps(BudgetSearch(FixedConfigs([{}]), ledger))
    experiment_state = ray.cloudpickle.dumps(BudgetStopper(ledger))

    forget_ledger("split")
    search = ray.cloudpickle.loads(tuner_pkl)
    search.ledger.apply(BudgetSpec(cpu_hours=60 / 3600))
    stopper = ray.cloudpickle.loads(experiment_state)
    assert stopper.ledger is search.ledger and stopper.ledger.limit_s == 60


def test_the_trials_the_hard_limit_stops_end_in_the_searcher_with_their_latest_result():
    """Tune stops every trial at the hard limit without telling the searcher; the generator
    tells it, so the concurrency limit and the ledger hold no trial a resume would wait on."""
    from segsearch.search.budget import Ledger, budgeted
    from segsearch.search.refit import FixedConfigs
    from segsearch.space import ResourcesSpec

    ledger = Ledger("halted", BudgetSpec(cpu_hours=10 / 3600), ResourcesSpec(), epochs=2)
    generator = budgeted(FixedConfigs([{}, {}]), ledger, concurrency=1)
    limiter = generator.searcher
    assert limiter.suggest("a") == {}
    limiter.on_trial_result("a", {"epoch": 1})
    ledger.record("a", 12, 1)
    generator.set_finished()
    assert generator.is_finished() and not limiter.live_trials and not ledger.live
    assert ledger.finished == {"a"}
