"""Compute budgets: the space's `budget:` and `--budget`, a search that stops at its budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from mlflow import MlflowClient
from ray.tune.search import Searcher

from segsearch.cli import main
from segsearch.data.demo import make_demo_dataset
from segsearch.errors import UserError
from segsearch.search.budget import Ledger
from segsearch.search.progress import format_table
from segsearch.space import BudgetSpec, ResourcesSpec, parse_budget, parse_space

#: Trials the end-to-end search asks for: more than the budget buys on an idle machine, where a
#: warm trial of this size holds its 2 CPUs well under a second, as on a loaded one (about 10 s).
TRIALS = 100
SPACE = {
    "name": "budgeted",
    "trials": TRIALS,
    "epochs": 2,
    "max_concurrent": 1,
    "resources": {"cpus_per_worker": 2},  # a trial costs twice its time
    "scheduler": {"kind": "none"},
    "sampler": {"kind": "random", "seed": 0},
    "fixed": {"batch_size": 8, "image_size": [64, 64], "model.depth": 2, "model.arch": "fcn"},
    "space": {
        "model.width": {"choice": [4, 8]},
        "optim.lr": {"float": [1e-3, 1e-2], "log": True},
    },
}
#: The budget of the end-to-end search, in CPU-seconds: a few tiny trials' worth.
BUDGET_CPU_S = 24.0


@pytest.mark.parametrize(
    ("budget", "seconds"),
    [
        ({"gpu_hours": 40}, 144000),
        ({"cpu_hours": 0.5}, 1800),
        ({"wall": "6h"}, 21600),
        ({"wall": "90m"}, 5400),
        ({"wall": "45s"}, 45),
        ({"wall": 45}, 45),
    ],
)
def test_a_budget_is_read_in_seconds(budget, seconds):
    space = {"name": "b", "budget": budget, "resources": {"gpus_per_worker": 1}}
    assert parse_space(space).budget.limit_s == seconds


@pytest.mark.parametrize(
    ("budget", "message"),
    [
        ({}, "budget: give exactly one of gpu_hours, cpu_hours, wall (got none)"),
        ({"cpu_hours": 1, "wall": "1h"}, "budget: give exactly one of"),
        ({"wall": "6x"}, "budget.wall: '6x' is not a positive duration; give e.g. 45s, 90m"),
        ({"wall": "-5m"}, "budget.wall: '-5m' is not a positive duration"),
        ({"cpu_hours": 0}, "budget.cpu_hours: Input should be greater than 0"),
        ({"cpu_hours": "lots"}, "budget.cpu_hours: Input should be a valid number"),
        ({"gpu_minutes": 3}, "budget.gpu_minutes: Extra inputs are not permitted"),
        ({"gpu_hours": 2}, "budget.gpu_hours: the trials hold no GPU"),
    ],
)
def test_a_bad_budget_is_one_line_naming_the_field(budget, message):
    with pytest.raises(UserError) as caught:
        parse_space({"name": "b", "budget": budget}, source="s.yaml")
    assert str(caught.value).startswith(f"s.yaml: {message}")
    assert "\n" not in str(caught.value)


def test_the_budget_option_reads_kind_equals_amount():
    assert parse_budget("cpu_hours=0.5") == BudgetSpec(cpu_hours=0.5)
    assert parse_budget("wall=10m").limit_s == 600
    for text, message in [
        ("wall", "give KIND=AMOUNT"),
        ("hours=3", "give KIND=AMOUNT with KIND one of gpu_hours, cpu_hours, wall"),
        ("wall=soon", "'soon' is not a positive duration"),
        ("gpu_hours=-1", "Input should be greater than 0"),
    ]:
        with pytest.raises(UserError, match=f"^--budget {text!r}: {message}"):
            parse_budget(text)


def test_a_bad_budget_option_exits_2_before_anything_runs(tmp_path: Path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    for budget, message in [
        ("wall:6h", "error: --budget 'wall:6h': give KIND=AMOUNT"),
        ("gpu_hours=1", "error: budget.gpu_hours: the trials hold no GPU"),
    ]:
        out = CliRunner().invoke(
            main, ["search", str(space), "--dataset", "nowhere", "--budget", budget]
        )
        assert out.exit_code == 2 and out.stderr.strip() == out.stderr.strip().splitlines()[0]
        assert out.stderr.startswith(message), out.stderr


def test_the_trials_table_shows_each_trials_cost():
    rows = [
        {"trial_id": "a", "val_miou": 0.5, "epochs": 2, "config": {}, "cost_cpu_s": 12.4},
        {"trial_id": "b", "val_miou": None, "epochs": 1, "config": {}, "cost_cpu_s": 3.0},
    ]
    lines = format_table(rows, metric="val_miou").splitlines()
    assert lines[0].split()[-2:] == ["CPU-s", "params"]
    assert [line.split()[-1] for line in lines[1:]] == ["12", "3"]
    gpu = [{**row, "cost_gpu_s": 6.0} for row in rows]
    assert format_table(gpu, metric="val_miou").splitlines()[0].split()[-2] == "GPU-s"


def _finished(ledger: Ledger, trial: str, seconds: float, epochs: int) -> None:
    ledger.started(trial)
    ledger.record(trial, seconds, epochs)
    ledger.ended(trial)


def test_the_ledger_starts_a_trial_only_while_its_estimate_fits():
    two_cpus = ResourcesSpec(cpus_per_worker=2)
    ledger = Ledger("l", BudgetSpec(cpu_hours=70 / 3600), two_cpus, epochs=4)
    assert ledger.may_start() is True  # nothing known yet
    ledger.started("a")
    ledger.record("a", 5, 1)  # 10 CPU-s per epoch, 40 for all 4
    assert ledger.estimate_s() == 40
    assert ledger.may_start() is None  # a at its estimate (40) + one more (40) > 70: wait
    ledger.ended("a")  # a stopped early after one epoch: 10 spent
    assert ledger.estimate_s() == 10 and ledger.may_start() is True
    _finished(ledger, "b", 20, 4)  # 40 CPU-s, the most a finished trial cost
    assert ledger.estimate_s() == 40 and ledger.spent_s() == 50
    assert ledger.may_start() is False  # 50 + 40 > 70, and spending only grows
    wall = Ledger("w", BudgetSpec(wall=60), two_cpus, epochs=4)
    _finished(wall, "a", 30, 4)  # a wall budget counts the search's own time, not the trials'
    assert wall.estimate_s() == 30 and wall.may_start() is True


@pytest.mark.slow
def test_a_budget_stops_the_search_within_one_trial_and_says_so(ray_cluster, tmp_path: Path):
    """Through the CLI: `--budget` overrides the space's; the search ends well (exit 0) with
    fewer trials than asked, each with its cost in the table and MLflow."""
    data = tmp_path / "data"
    make_demo_dataset(str(data), n_train=32, n_val=8, size=(64, 64), seed=2)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({**SPACE, "budget": {"wall": "6h"}}))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    args = ["search", str(space), "--dataset", str(data), "--storage", str(tmp_path / "runs")]
    args += ["--tracking-uri", tracking, "--budget", f"cpu_hours={BUDGET_CPU_S / 3600}"]
    out = CliRunner().invoke(main, [*args, "--json"])
    assert out.exit_code == 0, out.output
    result = yaml.safe_load(out.stdout[out.stdout.index("{") :])
    budget, trials = result["budget"], result["trials"]
    assert budget["budget"] == f"cpu_hours={BUDGET_CPU_S / 3600:g}"
    assert budget["stopped"] and budget["trials_requested"] == TRIALS
    assert 1 <= budget["trials_ran"] == len(trials) < TRIALS
    costs = [t["cost_cpu_s"] for t in trials]
    assert all(cost > 0 for cost in costs) and all(t["cost_gpu_s"] == 0 for t in trials)
    assert budget["spent_s"] == pytest.approx(sum(costs))
    assert abs(budget["spent_s"] - BUDGET_CPU_S) <= max(costs)
    assert f"budget spent: {len(trials)} of {TRIALS} trials ran" in out.output

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("budgeted").experiment_id
    parent = client.search_runs([experiment], "tags.`segsearch.role` = 'search'")[0]
    assert parent.info.status == "FINISHED"
    spent_line = f"budget spent: {len(trials)} of {TRIALS}"
    assert parent.data.tags["segsearch.budget"].startswith(spent_line)
    assert parent.data.metrics["budget_spent_s"] == pytest.approx(budget["spent_s"])
    assert parent.data.metrics["cost_cpu_s"] == pytest.approx(sum(costs))
    runs = client.search_runs([experiment], "tags.`segsearch.role` = 'trial'")
    logged = {r.data.tags["segsearch.trial_id"]: r.data.metrics["cost_cpu_s"] for r in runs}
    assert logged == pytest.approx({t["trial_id"]: t["cost_cpu_s"] for t in trials})


def test_a_budget_spent_before_any_trial_says_so():
    from segsearch.cli import _print_result
    from segsearch.search.budget import BudgetReport
    from segsearch.search.tuner import SearchResult

    report = BudgetReport(BudgetSpec(wall=40), 46.0, 0, 8, stopped=True)
    result = SearchResult("s", "val_miou", "max", None, None, {}, None, [], "x", budget=report)
    with pytest.raises(
        UserError,
        match=r"budget spent: 0 of 8 trials ran; 46 of 40 wall-s .*raise the budget: --resume "
        r"--budget wall=MORE\)$",
    ):
        _print_result(result)


def test_a_restored_tuner_shares_one_ledger_that_knows_what_was_spent():
    """Tune pickles the searcher, stopper and callbacks together (tuner.pkl, at the start) and
    restores the searcher's saved state into them: all three must then see that state."""
    import ray.cloudpickle

    from segsearch.search.budget import (
        BudgetSearch,
        BudgetStopper,
        TrialCosts,
        forget_ledger,
        ledger_of,
    )
    from segsearch.search.refit import FixedConfigs

    resources = ResourcesSpec()
    ledger = Ledger("resumed", BudgetSpec(cpu_hours=20 / 3600), resources, epochs=2)
    parts = (BudgetSearch(FixedConfigs([{}]), ledger), BudgetStopper(ledger))
    pickled = ray.cloudpickle.dumps((*parts, TrialCosts(resources, ledger)))
    _finished(ledger, "a", 12, 2)
    saved = parts[0].get_state()  # what Tune saves as the search goes

    forget_ledger("resumed")  # as _tuner does before Tuner.restore
    search, stopper, costs = ray.cloudpickle.loads(pickled)
    assert search.ledger is stopper.ledger is costs.ledger is ledger_of("resumed")
    assert not stopper.stop_all()
    search.set_state(saved)
    assert stopper.ledger.spent_s() == 12 and search.suggest("b") == Searcher.FINISHED
    assert stopper.ledger.stopped
