"""Multi-objective search: objectives in the space, cost measured per trial, the Pareto front
(checked here from every trial's logged values, not with segsearch's own code) and promote --pick.
Real Tune + Optuna + Train + MLflow (SQLite), tiny local data."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
import torch
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from segsearch.config import TrialConfig
from segsearch.data.demo import make_demo_dataset
from segsearch.errors import UserError
from segsearch.models import build_model
from segsearch.search.cost import measure_cost
from segsearch.search.pareto import pareto_front, parse_pick, pick
from segsearch.search.plan import plan_search
from segsearch.search.tuner import run_search
from segsearch.space import parse_space
from tests.test_checkpoint import one_torch_thread  # noqa: F401 (an autouse fixture)
from tests.test_predict import run_cli

OBJECTIVES = {"val_miou": "max", "latency_ms": "min"}


def _space(name: str, **overrides) -> dict:
    space = {
        "name": name,
        "objectives": OBJECTIVES,
        "trials": 4,
        "epochs": 1,
        "scheduler": {"kind": "none"},
        "sampler": {"kind": "tpe", "seed": 0},
        "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2},
        "space": {
            "model.arch": {"choice": ["fcn", "unet"]},
            "model.width": {"choice": [4, 16]},
            "optim.lr": {"float": [1e-3, 1e-2], "log": True},
        },
    }
    space.update(overrides)
    return space


@pytest.fixture(scope="module")
def tiny_local_dataset(tmp_path_factory) -> str:
    uri = str(tmp_path_factory.mktemp("data") / "tiny")
    make_demo_dataset(uri, n_train=16, n_val=4, size=(32, 32), seed=1)
    return uri


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"objectives": {"val_miou": "max", "latency": "min"}}, "objectives.latency: unknown"),
        ({"objectives": {"val_miou": "max", "latency_ms": "less"}}, "objectives.latency_ms:"),
        ({"objectives": {"val_miou": "max"}}, "objectives: give two or more"),
        ({"metric": "val_dice"}, "metric: 'val_dice' differs from the first objective"),
        ({"mode": "min"}, "mode: 'min' differs from the first objective"),
        ({"objectives": ["val_miou", "latency_ms"]}, "objectives: Input should be a valid"),
    ],
)
def test_bad_objectives_are_one_line_errors_naming_the_field(change, message):
    with pytest.raises(UserError) as caught:
        parse_space({**_space("bad"), **change}, source="space.yaml")
    assert str(caught.value).startswith(f"space.yaml: {message}")
    assert "\n" not in str(caught.value)


def test_the_first_objective_is_the_metric_and_single_objective_spaces_are_unchanged():
    multi = parse_space(_space("multi", metric="val_miou"))
    assert (multi.metric, multi.mode, multi.multi_objective) == ("val_miou", "max", True)
    assert multi.objective_modes == ["max", "min"] and multi.measures_cost
    by_cost = parse_space(_space("cost", objectives={"num_params": "min", "val_dice": "max"}))
    assert (by_cost.metric, by_cost.mode, by_cost.measures_cost) == ("num_params", "min", False)
    single = parse_space({k: v for k, v in _space("one").items() if k != "objectives"})
    assert (single.metric, single.mode, single.objectives) == ("val_miou", "max", None)
    assert single.objective_names == ["val_miou"] and not single.measures_cost


def test_front_keeps_exactly_the_rows_nothing_dominates():
    rows = [
        {"trial_id": "a", "val_miou": 0.8, "latency_ms": 30.0},
        {"trial_id": "b", "val_miou": 0.6, "latency_ms": 10.0},
        {"trial_id": "c", "val_miou": 0.6, "latency_ms": 20.0},  # dominated by b
        {"trial_id": "d", "val_miou": 0.8, "latency_ms": 30.0},  # equal to a: both stay
        {"trial_id": "e", "val_miou": 0.9, "latency_ms": None},  # incomplete: never on it
        {"trial_id": "f", "val_miou": 0.7, "latency_ms": 15.0},
    ]
    front = pareto_front(rows, OBJECTIVES)
    assert [row["trial_id"] for row in front] == ["a", "d", "f", "b"]
    latency = parse_pick("latency_ms<=15", list(OBJECTIVES))
    assert pick(front, latency, "val_miou", "max")["trial_id"] == "f"
    both = parse_pick("latency_ms < 15, val_miou>=0.5", list(OBJECTIVES))
    assert pick(front, both, "val_miou", "max")["trial_id"] == "b"
    assert pick(front, parse_pick("latency_ms<5", list(OBJECTIVES)), "val_miou", "max") is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("latency_ms=20", "--pick 'latency_ms=20': expected NAME<=NUMBER"),
        ("latency<=20", "--pick 'latency<=20': latency is not an objective"),
        ("latency_ms<=fast", "--pick 'latency_ms<=fast': 'fast' is not a number"),
        ("val_miou>0.5,", "--pick '': expected NAME<=NUMBER"),
        ("latency_ms<=nan", "--pick 'latency_ms<=nan': the bound must be a finite number"),
    ],
)
def test_bad_pick_expressions_name_the_constraint(text, message):
    with pytest.raises(UserError) as caught:
        parse_pick(text, list(OBJECTIVES))
    assert str(caught.value).startswith(message)


def test_cost_grows_with_the_image_and_leaves_the_model_in_its_mode():
    model = TrialConfig.from_dict({"model": {"arch": "unet", "width": 4, "depth": 2}}).model
    net = build_model(model, in_channels=3, num_classes=2)
    cpu = torch.device("cpu")
    small = measure_cost(net, channels=3, image_size=(16, 16), device=cpu)
    large = measure_cost(net, channels=3, image_size=(64, 64), device=cpu)
    assert net.training
    assert set(small) == {"latency_ms", "peak_memory_mb"}
    assert small["latency_ms"] > 0
    weights_mb = sum(p.numel() * 4 for p in net.parameters()) / 2**20
    # 16× the pixels: the activations held at once grow with them; the weights stay.
    assert weights_mb < small["peak_memory_mb"] < large["peak_memory_mb"]
    assert large["peak_memory_mb"] - weights_mb > 8 * (small["peak_memory_mb"] - weights_mb)


def test_dry_run_shows_the_objectives(tiny_local_dataset, tmp_path):
    spec = parse_space(_space("planned", sampler={"kind": "nsga2", "seed": 0}))
    plan = plan_search(spec, dataset=tiny_local_dataset, tracking_uri=f"sqlite:///{tmp_path}/m.db")
    text = plan.describe()
    assert "objectives val_miou (max), latency_ms (min), sampler nsga2" in text
    assert "ASHA, each trial's best epoch and refit go by the first (val_miou)" in text
    assert plan.to_dict()["objectives"] == OBJECTIVES
    assert len(plan.samples) == 3


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """val_miou up, latency_ms down: written out here, apart from segsearch's own."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_objective_search_front_is_non_dominated_and_promote_picks_from_it(
    ray_cluster, tiny_local_dataset, tmp_path
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    result = run_search(
        parse_space(_space("front")),
        dataset=tiny_local_dataset,
        storage=str(tmp_path / "runs"),
        tracking_uri=uri,
        echo=lines.append,
    )

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("front")
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["segsearch.role"] == "search"]
    trials = {
        r.data.tags["segsearch.trial_id"]: r
        for r in runs
        if r.data.tags["segsearch.role"] == "trial"
    }
    assert len(trials) == 4
    values = {
        tid: (run.data.metrics["best_val_miou"], run.data.metrics["latency_ms"])
        for tid, run in trials.items()
    }
    assert all(latency > 0 for _, latency in values.values())
    expected = {
        tid for tid, v in values.items() if not any(_dominates(w, v) for w in values.values())
    }
    front_file = download_artifacts(
        run_id=parent.info.run_id, artifact_path="pareto_front.json", tracking_uri=uri
    )
    logged = json.loads(Path(front_file).read_text())
    front = {member["trial_id"] for member in logged["front"]}
    assert front == expected == {row["trial_id"] for row in result.pareto.members}
    for tid in values.keys() - front:
        assert any(_dominates(values[f], values[tid]) for f in front)
    for a in front:
        assert not any(_dominates(values[b], values[a]) for b in front)
    for member in logged["front"]:
        assert member["run_id"] == trials[member["trial_id"]].info.run_id
        assert (member["val_miou"], member["latency_ms"]) == pytest.approx(
            values[member["trial_id"]]
        )
        assert "segsearch.model_uri" in trials[member["trial_id"]].data.tags
    assert logged["objectives"] == OBJECTIVES
    assert parent.data.tags["segsearch.objectives"] == "val_miou:max,latency_ms:min"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"pareto_front.json", "pareto_front.csv", "pareto_front.png"} <= artifacts
    assert "Pareto front (" in result.table()

    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.load_study(study_name="front", storage=storage)
    assert len(study.directions) == 2
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 4 and all(len(t.values) == 2 for t in complete)

    by_latency = sorted(front, key=lambda tid: values[tid][1])
    bound = values[by_latency[min(1, len(by_latency) - 1)]][1]
    meeting = [tid for tid in front if values[tid][1] <= bound]
    chosen = max(meeting, key=lambda tid: values[tid][0])
    done = run_cli(
        "promote", "front", "--model-name", "front-seg", "--tracking-uri", uri,
        "--pick", f"latency_ms<={bound!r}", "--json",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    assert json.loads(done.output)["run_id"] == trials[chosen].info.run_id

    fastest = values[by_latency[0]][1]
    none = run_cli(
        "promote", "front", "--model-name", "front-seg", "--tracking-uri", uri,
        "--pick", f"latency_ms<{fastest / 2!r}",
    )  # fmt: skip
    assert none.exit_code == 1
    assert none.output.count("\n") == 1 and "no member of the Pareto front" in none.output
    bad = run_cli(
        "promote", "front", "--model-name", "front-seg", "--tracking-uri", uri,
        "--pick", "latency<=20",
    )  # fmt: skip
    assert bad.exit_code == 2 and bad.output.count("\n") == 1
    assert "latency is not an objective" in bad.output


def _epoch_result(epoch: int, miou: float, latency: float | None) -> dict:
    found = {"val_miou": miou, "epoch": epoch, "training_iteration": epoch}
    return found if latency is None else {**found, "latency_ms": latency}


@pytest.mark.parametrize("sampler", ["tpe", "nsga2"])
def test_the_searcher_tells_a_multi_objective_study_the_last_values(tmp_path, sampler):
    """No intermediate values (Optuna refuses them for several objectives); a trial without one
    objective's value fails; ASHA's stopped trials are pruned; the pictures use the first."""
    from segsearch.search.study import StudySearch
    from segsearch.tracking._pictures import study_pictures

    url = f"sqlite:///{tmp_path}/optuna.db"
    spec = parse_space(_space("multi", epochs=2, sampler={"kind": sampler, "seed": 0}))
    searcher = StudySearch(spec=spec, url=url)
    for trial_id in ("a", "b", "c", "d"):
        assert searcher.suggest(trial_id)["optim.lr"] > 0
    searcher.on_trial_result("a", _epoch_result(1, 0.2, 5.0))
    searcher.on_trial_complete("a", result=_epoch_result(2, 0.4, 5.0))
    searcher.on_trial_complete("b", result=_epoch_result(2, 0.5, None))
    searcher.on_trial_complete("c", result=_epoch_result(1, 0.1, 3.0))  # ASHA stopped it
    searcher.on_trial_complete("d", result=_epoch_result(2, 0.3, 2.0))

    study = optuna.load_study(study_name="multi", storage=url)
    a, b, c, d = study.get_trials()
    assert study.directions == [
        optuna.study.StudyDirection.MAXIMIZE,
        optuna.study.StudyDirection.MINIMIZE,
    ]
    assert (a.state, a.values, a.intermediate_values) == (
        optuna.trial.TrialState.COMPLETE,
        [0.4, 5.0],
        {},
    )
    assert b.state == optuna.trial.TrialState.FAIL
    assert c.state == optuna.trial.TrialState.PRUNED
    assert {t.number for t in study.best_trials} == {a.number, d.number}
    drawn, _ = study_pictures(study, tmp_path, metric="val_miou")
    assert {p.name for p in drawn} >= {"optimization_history.png", "parallel_coordinates.png"}


def test_warm_start_reads_the_best_first_objective_of_a_multi_objective_study(tmp_path):
    from segsearch.search.warm_start import warm_start_points

    url = f"sqlite:///{tmp_path}/optuna.db"
    earlier = optuna.create_study(
        study_name="earlier", storage=url, directions=["maximize", "minimize"]
    )
    dists = {
        "model.arch": optuna.distributions.CategoricalDistribution(["fcn", "unet"]),
        "model.width": optuna.distributions.CategoricalDistribution([4, 16]),
        "optim.lr": optuna.distributions.FloatDistribution(1e-3, 1e-2, log=True),
    }
    for arch, value, latency in (("fcn", 0.5, 1.0), ("unet", 0.7, 9.0)):
        params = {"model.arch": arch, "model.width": 4, "optim.lr": 0.005}
        earlier.add_trial(
            optuna.trial.create_trial(params=params, distributions=dists, values=[value, latency])
        )
    spec = parse_space(_space("later", warm_start={"search": "earlier", "top_k": 1}))
    points = warm_start_points(spec, url, tracking_uri="unused", echo=lambda line: None)
    assert [p["model.arch"] for p in points] == ["unet"]
