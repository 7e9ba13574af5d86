"""The persistent Optuna study: storage resolution, the searcher Tune drives, warm start and the
parent run's pictures, each on a real SQLite study opened again with Optuna's own loader."""

from __future__ import annotations

import pickle
from pathlib import Path

import matplotlib
import optuna
import pytest

from segsearch.errors import UserError
from segsearch.search.study import (
    LOST_REASON,
    StudySearch,
    check_new_study,
    open_storage,
    registered,
    resolve_study_storage,
    sampler_for,
)
from segsearch.search.warm_start import warm_start_points
from segsearch.space import parse_space
from segsearch.tracking._pictures import PICTURES, study_pictures

COMPLETE, PRUNED = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED


def space(name: str = "s", **overrides) -> dict:
    raw = {
        "name": name,
        "trials": 6,
        "epochs": 3,
        "space": {
            "model.arch": {"choice": ["fcn", "unet"]},
            "model.fcn_skips": {"choice": ["16s", "8s"], "when": {"model.arch": "fcn"}},
            "optim.lr": {"float": [1e-3, 1e-1], "log": True},
        },
    }
    raw.update(overrides)
    return raw


def result(epoch: int, miou: float) -> dict:
    return {"val_miou": miou, "epoch": epoch, "training_iteration": epoch}


def test_default_storage_is_beside_a_local_mlflow_store_else_in_the_search_storage(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("SEGSEARCH_OPTUNA_STORAGE", raising=False)
    local = str(tmp_path / "runs")
    beside = resolve_study_storage(
        None, tracking_uri=f"sqlite:///{tmp_path}/m/mlflow.db", storage=local
    )
    assert beside == f"sqlite:///{tmp_path}/m/optuna.db"
    served = resolve_study_storage(None, tracking_uri="http://mlflow:5000", storage=local)
    assert served == f"sqlite:///{tmp_path}/runs/optuna.db"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    remote = resolve_study_storage(None, tracking_uri="http://mlflow:5000", storage="s3://b/p")
    assert remote == f"sqlite:///{tmp_path}/home/.segsearch/optuna.db"
    monkeypatch.setenv("SEGSEARCH_OPTUNA_STORAGE", "postgresql://u:pw@db/optuna")
    assert resolve_study_storage(None, tracking_uri="x", storage=local).startswith("postgres")
    assert resolve_study_storage("sqlite:///a.db", tracking_uri="x", storage=local) == (
        "sqlite:///a.db"
    )


def test_tpe_is_multivariate_grouped_with_a_constant_liar_and_few_random_trials():
    sampler = sampler_for(parse_space(space()))
    assert isinstance(sampler, optuna.samplers.TPESampler)
    assert sampler._multivariate and sampler._group and sampler._constant_liar
    assert sampler._n_startup_trials == 2
    random = sampler_for(parse_space(space(sampler={"kind": "random"})))
    assert isinstance(random, optuna.samplers.RandomSampler)


def test_asha_grace_period_defaults_to_a_third_of_the_epochs_and_not_before_epoch_2():
    spec = parse_space(space())
    assert [spec.scheduler.grace_for(e) for e in (1, 2, 4, 10, 30)] == [1, 2, 2, 4, 10]
    given = parse_space(space(scheduler={"grace_period": 5}))
    assert given.scheduler.grace_for(30) == 5 and given.scheduler.grace_for(3) == 3


def _searcher(url: str, **overrides) -> StudySearch:
    return StudySearch(spec=parse_space(space(**overrides)), url=url)


def test_searcher_reports_each_epoch_and_tells_asha_stopped_trials_pruned(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher(url)
    for trial_id in ("a", "b", "c"):
        assert searcher.suggest(trial_id)["optim.lr"] > 0
    for epoch in (1, 2):
        searcher.on_trial_result("a", result(epoch, 0.1 * epoch))
    searcher.on_trial_result("a", result(2, 0.2))  # a resumed trial repeats its last result
    searcher.on_trial_complete("a", result=result(3, 0.3))  # ran every epoch
    searcher.on_trial_complete("b", result=result(1, 0.05))  # ASHA stopped it at epoch 1
    searcher.on_trial_complete("c", error=True)

    study = optuna.load_study(study_name="s", storage=url)
    a, b, c = study.get_trials()
    assert (a.state, a.value, a.intermediate_values) == (COMPLETE, 0.3, {1: 0.1, 2: 0.2, 3: 0.3})
    assert (b.state, b.value, b.intermediate_values) == (PRUNED, 0.05, {1: 0.05})
    assert c.state == optuna.trial.TrialState.FAIL


def test_a_restored_searcher_continues_the_same_trials_and_never_pickles_the_url(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher(url)
    searcher.suggest("a")
    searcher.on_trial_result("a", result(1, 0.2))
    saved = tmp_path / "searcher-state.pkl"
    searcher.save(str(saved))
    searcher.suggest("lost")  # asked after the save, then lost with the driver
    for state in (pickle.loads(saved.read_bytes()), searcher.__getstate__()):
        assert not {"_url", "_storage", "_ot_study"} & set(state)  # only the URL as shown
    assert b"RDBStorage" not in saved.read_bytes() + pickle.dumps(searcher)

    with pytest.raises(UserError, match="not open in this process"):
        pickle.loads(pickle.dumps(searcher))
    with registered("s", url):
        restored = pickle.loads(pickle.dumps(searcher))
        restored.restore(str(saved))
    restored.on_trial_result("a", result(2, 0.4))
    restored.on_trial_complete("a", result=result(3, 0.5))
    restored.suggest("b")

    trials = optuna.load_study(study_name="s", storage=url).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    first, lost, second = trials
    assert first.state == COMPLETE and first.intermediate_values == {1: 0.2, 2: 0.4, 3: 0.5}
    assert lost.state == optuna.trial.TrialState.FAIL
    assert lost.system_attrs["fail_reason"] == LOST_REASON
    assert second.state == optuna.trial.TrialState.RUNNING


def test_a_new_search_refuses_a_study_of_its_name_that_has_trials(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    check_new_study("s", url)
    optuna.create_study(study_name="s", storage=url)
    check_new_study("s", url)  # created, never asked: still free
    _searcher(url).suggest("a")
    with pytest.raises(UserError, match=r"study named 's' with 1 trial\(s\).*optuna delete-study"):
        check_new_study("s", url)


def _earlier_study(url: str) -> None:
    study = optuna.create_study(study_name="earlier", storage=url, direction="maximize")
    dists = {
        "model.arch": optuna.distributions.CategoricalDistribution(["fcn", "unet", "densenet"]),
        "model.fcn_skips": optuna.distributions.CategoricalDistribution(["16s", "8s"]),
        "optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True),
    }
    trials = [
        ({"model.arch": "densenet", "optim.lr": 0.01}, 0.9, COMPLETE),
        ({"model.arch": "fcn", "model.fcn_skips": "8s", "optim.lr": 0.02}, 0.8, COMPLETE),
        ({"model.arch": "unet", "optim.lr": 0.003}, 0.7, COMPLETE),
        ({"model.arch": "unet", "optim.lr": 0.05}, 0.95, PRUNED),
        ({"model.arch": "unet", "optim.lr": 0.03}, 0.1, COMPLETE),
    ]
    for params, value, state in trials:
        used = {k: dists[k] for k in params}
        study.add_trial(
            optuna.trial.create_trial(params=params, distributions=used, value=value, state=state)
        )


def test_warm_start_takes_the_best_complete_trials_that_fit_the_space(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    _earlier_study(url)
    spec = parse_space(space(warm_start={"search": "earlier", "top_k": 3}))
    lines: list[str] = []
    points = warm_start_points(
        spec, url, tracking_uri=f"sqlite:///{tmp_path}/m.db", echo=lines.append
    )
    assert points == [
        {"model.arch": "fcn", "model.fcn_skips": "8s", "optim.lr": 0.02},
        {"model.arch": "unet", "optim.lr": 0.003},
    ]
    assert lines == [
        f"warm start: 2 of the best 3 trial(s) of 'earlier' in {url} go first; skipped trial 0 "
        "(model.arch='densenet' is outside this space)"
    ]
    missing = parse_space(space(warm_start="nowhere"))
    with pytest.raises(UserError, match="no search named 'nowhere': neither an Optuna study"):
        warm_start_points(missing, url, tracking_uri=f"sqlite:///{tmp_path}/m.db", echo=print)


def test_warm_start_configurations_are_the_first_trials_asked(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    _earlier_study(url)
    spec = parse_space(space(warm_start="earlier"))
    points = warm_start_points(spec, url, tracking_uri="unused", echo=lambda line: None)
    searcher = StudySearch(spec=spec, url=url, points_to_evaluate=points)
    first, second = searcher.suggest("a"), searcher.suggest("b")
    assert first == {"model.arch": "fcn", "model.fcn_skips": "8s", "optim.lr": 0.02}
    assert second == {"model.arch": "unet", "optim.lr": 0.003}


def test_pictures_come_from_the_study_and_leave_matplotlib_as_it_was(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    searcher = _searcher(url)
    style = dict(matplotlib.rcParams)
    empty = optuna.load_study(study_name="s", storage=url)
    assert study_pictures(empty, tmp_path, metric="val_miou")[0] == []

    searcher.suggest("a")
    searcher.on_trial_complete("a", result=result(3, 0.4))
    files, missing = study_pictures(empty, tmp_path, metric="val_miou")
    assert missing == ["param_importances.png: fewer than 2 complete trials"]
    for trial_id, miou in (("b", 0.1), ("c", 0.6), ("d", 0.3)):
        searcher.suggest(trial_id)
        searcher.on_trial_result(trial_id, result(1, miou / 2))
        searcher.on_trial_complete(trial_id, result=result(3 if miou > 0.2 else 1, miou))
    files, missing = study_pictures(empty, tmp_path, metric="val_miou")
    assert missing == []
    assert [f.name for f in files] == list(PICTURES)
    for path in files:
        assert Path(path).read_bytes()[:4] == b"\x89PNG"
    assert dict(matplotlib.rcParams) == style
    from matplotlib import pyplot

    assert pyplot.get_fignums() == []


@pytest.mark.parametrize(
    "url", ["postgresql://seg:hunter2-pw@127.0.0.1:1/optuna", "nodb://seg:hunter2-pw@host/x"]
)
def test_a_storage_that_cannot_open_is_one_line_without_its_password(url):
    with pytest.raises(UserError) as caught:
        open_storage(url)
    message = str(caught.value)
    assert message.startswith("Optuna storage ") and "seg:***@" in message
    assert "hunter2-pw" not in message and "\n" not in message


def test_warm_start_reads_the_mlflow_runs_of_a_search_without_a_study(tmp_path):
    """An older search (no study in this storage): its completed trial runs, best first, with
    MLflow's text params read back as the space's values."""
    from mlflow import MlflowClient

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri)
    experiment = client.create_experiment("older")
    runs = [
        ({"model.arch": "unet", "optim.lr": "0.004", "batch_size": "8"}, 0.6, "completed"),
        ({"model.arch": "fcn", "model.fcn_skips": "16s", "optim.lr": "0.01"}, 0.7, "completed"),
        ({"model.arch": "unet", "optim.lr": "0.09"}, 0.9, "stopped_early"),
        ({"model.arch": "fcn", "optim.lr": "0.02"}, 0.5, "completed"),
    ]
    for params, miou, status in runs:
        tags = {"segsearch.role": "trial", "segsearch.status": status}
        run = client.create_run(experiment, tags=tags)
        for key, value in params.items():
            client.log_param(run.info.run_id, key, value)
        client.log_metric(run.info.run_id, "val_miou", miou, step=3)
        client.set_terminated(run.info.run_id)
    spec = parse_space(space(warm_start="older"))
    lines: list[str] = []
    points = warm_start_points(
        spec, f"sqlite:///{tmp_path}/optuna.db", tracking_uri=tracking_uri, echo=lines.append
    )
    assert points == [
        {"model.arch": "fcn", "model.fcn_skips": "16s", "optim.lr": 0.01},
        {"model.arch": "unet", "optim.lr": 0.004},
    ]
    assert lines[0].startswith("warm start: 2 of the best 3 trial(s) of MLflow experiment 'older'")
    assert lines[0].endswith("(no value for model.fcn_skips)")
