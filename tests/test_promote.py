"""Promote and predict against a real `mlflow server` (artifacts in moto S3) and embedded SQLite.

Each search is an MLflow experiment shaped like the tracker's: a parent run (role "search",
param `dataset`) and child trial runs (role "trial", `mlflow.parentRunId`, per-epoch val_miou),
with a really trained checkpoint logged by `log_model` on some of them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from segsearch.checkpoint import load_model
from segsearch.data.demo import make_demo_dataset
from segsearch.data.fingerprint import dataset_fingerprint
from segsearch.data.format import read_dataset_info
from segsearch.data.images import read_image_file
from segsearch.mlflow_uri import resolve_tracking_uri
from segsearch.serve.mlflow_model import load_logged_model, log_model
from segsearch.serve.predictor import MaskPredictor
from segsearch.serve.promote import promote
from segsearch.tracking import SearchTracker
from tests.fixtures.mlflow_server import ARTIFACT_BUCKET
from tests.test_checkpoint import (
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    toy_batch,
    train_tiny_checkpoint,
)
from tests.test_predict import expected_mask, image_folder, read_png, run_cli

DATASET = "s3://toy-bucket/squares"


@dataclass(frozen=True)
class Trial:
    trial_id: str
    miou: tuple[float, ...]
    checkpoint: Path | None = None
    status: str = "FINISHED"


@contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """log_model logs through MLflow's fluent API: point it at `uri`, then unset it."""
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)


def make_search(uri: str, name: str, trials: list[Trial], *, dataset: str = DATASET) -> dict:
    """Experiment `name` with a parent run and one child run per trial; trial id → run id."""
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(name)
    parent = client.create_run(
        experiment_id, run_name=name, tags={"segsearch.role": "search", "segsearch.search": name}
    ).info.run_id
    client.log_param(parent, "dataset", dataset)
    runs = add_trials(uri, experiment_id, parent, trials)
    client.set_terminated(parent)
    return runs


def add_trials(uri: str, experiment_id: str, parent: str, trials: list[Trial]) -> dict:
    """One child run per trial under `parent`, shaped like the tracker's; trial id → run id."""
    client = MlflowClient(uri)
    runs = {}
    for trial in trials:
        tags = {
            "mlflow.parentRunId": parent,
            "segsearch.role": "trial",
            "segsearch.trial_id": trial.trial_id,
        }
        run_id = client.create_run(experiment_id, run_name=trial.trial_id, tags=tags).info.run_id
        for epoch, value in enumerate(trial.miou, start=1):
            client.log_metric(run_id, "val_miou", value, step=epoch)
            client.log_metric(run_id, "train_loss", 1.0 - value, step=epoch)
        if trial.checkpoint is not None:
            with fluent_tracking_uri(uri):
                log_model(str(trial.checkpoint), run_id=run_id)
        client.set_terminated(run_id, trial.status)
        runs[trial.trial_id] = run_id
    return runs


def tracked_search(uri: str, name: str, dataset: str, trials: list[Trial]) -> None:
    """A search whose parent run is opened as `segsearch search` opens it (SearchTracker.start)
    from the current directory, with trial runs as in make_search."""
    info = read_dataset_info(dataset)
    tracker = SearchTracker.start(
        tracking_uri=uri,
        search_name=name,
        space_path=None,
        dataset_uri=dataset,
        dataset_info=info,
        dataset_fingerprint=dataset_fingerprint(dataset, info.splits),
        settings={},
        epochs=2,
        echo=lambda line: None,
    )
    add_trials(uri, tracker.experiment_id, tracker.parent_run_id, trials)
    MlflowClient(uri).set_terminated(tracker.parent_run_id)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[Path]:
    folders = [tmp_path_factory.mktemp(f"checkpoint{seed}") for seed in (0, 1)]
    for seed, folder in enumerate(folders):
        train_tiny_checkpoint(folder, seed=seed)
    return folders


@pytest.fixture(scope="module")
def searches(mlflow_server, checkpoints) -> dict[str, dict]:
    """pets-v1: best finished trial with a model is t2 (0.8); pets-v2: one worse trial (0.7)."""
    first, second = checkpoints
    v1 = [
        Trial("t1", (0.3, 0.6), first),
        Trial("t2", (0.5, 0.8), second),
        Trial("t3", (0.9,)),  # best metric, but no model was logged
        Trial("t4", (0.95,), first, status="FAILED"),
    ]
    return {
        "pets-v1": make_search(mlflow_server, "pets-v1", v1),
        "pets-v2": make_search(mlflow_server, "pets-v2", [Trial("u1", (0.7,), first)]),
    }


def promote_cli(uri: str, search: str, model: str, *extra: str):
    return run_cli("promote", search, "--model-name", model, "--tracking-uri", uri, *extra)


def test_promote_registers_the_best_finished_trial_once(mlflow_server, searches):
    result = promote_cli(mlflow_server, "pets-v1", "pets-seg")
    assert result.exit_code == 0, result.output
    assert "registered pets-seg version 1 (trial t2, val_miou=0.8000)" in result.output

    client = MlflowClient(mlflow_server)
    version = client.get_model_version_by_alias("pets-seg", "champion")
    assert version.version == "1"
    assert version.run_id == searches["pets-v1"]["t2"]
    assert {k: v for k, v in version.tags.items() if k.startswith("segsearch.")} == {
        "segsearch.search": "pets-v1",
        "segsearch.trial": "t2",
        "segsearch.metric": "val_miou",
        "segsearch.metric_value": "0.8",
        "segsearch.mode": "max",
        "segsearch.dataset": DATASET,
    }

    again = promote_cli(mlflow_server, "pets-v1", "pets-seg")
    assert again.exit_code == 0, again.output
    assert "nothing changed" in again.output
    assert len(client.search_model_versions("name = 'pets-seg'")) == 1

    keys = [
        item["Key"]
        for page in boto3.client("s3")
        .get_paginator("list_objects_v2")
        .paginate(Bucket=ARTIFACT_BUCKET, Prefix="mlartifacts/")
        for item in page.get("Contents", [])
    ]
    for name in ("MLmodel", "data/model.pt2", "extra_files/model.pt", "extra_files/trial.json"):
        assert any(key.endswith(f"/artifacts/{name}") for key in keys), name


def test_predict_from_the_registry_matches_the_checkpoint(
    mlflow_server, searches, checkpoints, tmp_path
):
    assert promote_cli(mlflow_server, "pets-v1", "pets-predict").exit_code == 0
    files = image_folder(tmp_path / "in")
    uri = "models:/pets-predict@champion"
    out = tmp_path / "out"
    result = run_cli(
        "predict", uri, str(tmp_path / "in"), str(out), "--overlay", "--tracking-uri", mlflow_server
    )
    assert result.exit_code == 0, result.output
    best = checkpoints[1]
    for name, path in files.items():
        image = read_image_file(path)
        np.testing.assert_array_equal(
            read_png(out / "masks" / f"{name}.png"), expected_mask(best, image)
        )
        assert (out / "overlays" / f"{name}.png").is_file()

    net, meta = load_logged_model("models:/pets-predict/1", tracking_uri=mlflow_server)
    assert meta == load_model(best)[1]
    run_uri = f"runs:/{searches['pets-v1']['t2']}/model"
    assert load_logged_model(run_uri, tracking_uri=mlflow_server)[1] == meta
    predictor = MaskPredictor(net, meta).eval()
    images = toy_batch(3, 50, seed=8)[0]
    with fluent_tracking_uri(mlflow_server):
        served = mlflow.pyfunc.load_model(uri).predict(images)
    with torch.no_grad():
        np.testing.assert_array_equal(served, predictor(torch.from_numpy(images)).numpy())


def test_gate_refuses_a_worse_model_unless_forced(mlflow_server, searches):
    assert promote_cli(mlflow_server, "pets-v1", "pets-gate").exit_code == 0
    refused = promote_cli(mlflow_server, "pets-v2", "pets-gate")
    assert refused.exit_code == 2
    assert "pets-gate@champion is version 1 with val_miou=0.8000" in refused.stderr
    assert "(val_miou=0.7000); pass --force" in refused.stderr
    client = MlflowClient(mlflow_server)
    assert client.get_model_version_by_alias("pets-gate", "champion").version == "1"

    forced = promote_cli(mlflow_server, "pets-v2", "pets-gate", "--force")
    assert forced.exit_code == 0, forced.output
    assert "pets-gate@champion → 2, was version 1" in forced.output
    assert client.get_model_version_by_alias("pets-gate", "champion").version == "2"

    lower_is_better = promote_cli(
        mlflow_server, "pets-v1", "pets-loss", "--metric", "train_loss", "--mode", "min"
    )
    assert lower_is_better.exit_code == 0, lower_is_better.output
    assert "(trial t2, train_loss=0.2000)" in lower_is_better.output


def test_gate_holds_for_one_dataset_searched_from_two_directories(
    tmp_path, monkeypatch, checkpoints
):
    """The same dataset, searched from its own folder and from another one, is the same dataset:
    the worse search's model must not take the alias without --force."""
    dataset = tmp_path / "data" / "ds"
    make_demo_dataset(str(dataset), n_train=4, n_val=2, size=(16, 16), seed=0)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    searches = (
        (dataset.parent, "pets-a", str(dataset), 0.8),
        (tmp_path, "pets-b", "data/ds", 0.6),  # the same folder, by another path
    )
    for folder, name, given, miou in searches:
        monkeypatch.chdir(folder)
        monkeypatch.setenv("PWD", str(folder))
        tracked_search(uri, name, given, [Trial("t1", (miou,), checkpoints[0])])

    assert promote_cli(uri, "pets-a", "pets-dirs").exit_code == 0
    client = MlflowClient(uri)
    tags = client.get_model_version_by_alias("pets-dirs", "champion").tags
    assert tags["segsearch.dataset"] == str(dataset)  # in full, no *** for the directory
    assert tags["segsearch.dataset_fingerprint"].startswith("sha256:")
    refused = promote_cli(uri, "pets-b", "pets-dirs")
    assert refused.exit_code == 2, refused.output
    assert "with val_miou=0.8000" in refused.stderr and "pass --force" in refused.stderr
    assert str(client.get_model_version_by_alias("pets-dirs", "champion").version) == "1"


def test_promote_errors_are_one_line(mlflow_server, searches):
    cases = [
        (("no-such-search", "m"), "no search 'no-such-search'"),
        (
            ("pets-v1", "m", "--metric", "val_dice"),
            "choose --metric from ['train_loss', 'val_miou']",
        ),
    ]
    for args, message in cases:
        result = promote_cli(mlflow_server, *args)
        assert result.exit_code == 2, result.output
        assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_model_exits_2_and_unreachable_server_3(mlflow_server, tmp_path):
    image_folder(tmp_path / "in")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
    cases = [
        (
            ("predict", "models:/no-such-model@champion", str(tmp_path / "in"), str(tmp_path)),
            mlflow_server,
            "cannot load model models:/no-such-model@champion",
            2,
        ),
        (
            ("predict", "models:/pets-seg@champion", str(tmp_path / "in"), str(tmp_path)),
            dead,
            f"MLflow tracking server {dead} is unreachable",
            3,
        ),
        (("promote", "pets-v1", "--model-name", "m"), dead, "is unreachable", 3),
    ]
    for args, uri, message, code in cases:
        result = run_cli(*args, "--tracking-uri", uri)
        assert result.exit_code == code, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_embedded_sqlite_default(tmp_path, monkeypatch, checkpoints):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(None) == "sqlite:///mlflow.db"
    assert resolve_tracking_uri("http://elsewhere:5000") == "http://elsewhere:5000"
    missing = run_cli("promote", "toy", "--model-name", "toy-seg")
    assert missing.exit_code == 2 and "no MLflow database at mlflow.db" in missing.stderr
    assert not (tmp_path / "mlflow.db").exists()
    make_search("sqlite:///mlflow.db", "toy", [Trial("t1", (0.4, 0.5), checkpoints[0])])

    result = run_cli("promote", "toy", "--model-name", "toy-seg")
    assert result.exit_code == 0, result.output
    assert "registered toy-seg version 1" in result.output
    assert (tmp_path / "mlflow.db").is_file()

    files = image_folder(tmp_path / "in")
    result = run_cli("predict", "models:/toy-seg@champion", "in", "out")
    assert result.exit_code == 0, result.output
    image = read_image_file(files["a"])
    np.testing.assert_array_equal(
        read_png(tmp_path / "out" / "masks" / "a.png"), expected_mask(checkpoints[0], image)
    )


def test_promote_to_a_sqlite_store_outside_the_working_directory(
    tmp_path, monkeypatch, checkpoints
):
    """MLflow's SQLite registry resolves a `models:/m-…` source through the global tracking URI:
    promote must register into the store it was given, and create no ./mlflow.db beside it."""
    store = tmp_path / "store" / "other.db"
    store.parent.mkdir()
    uri = f"sqlite:///{store}"
    make_search(uri, "toy", [Trial("t1", (0.4, 0.5), checkpoints[0])])
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

    result = promote_cli(uri, "toy", "toy-seg")
    assert result.exit_code == 0, result.output
    assert "registered toy-seg version 1" in result.output
    assert str(MlflowClient(uri).get_model_version_by_alias("toy-seg", "champion").version) == "1"
    assert not (tmp_path / "mlflow.db").exists()


def _log_best(uri: str, run_id: str, value: float, epoch: int) -> None:
    """What the tracker logs on a trial's run when the search ends: its best epoch's score."""
    client = MlflowClient(uri)
    client.log_metric(run_id, "best_val_miou", value)
    client.log_metric(run_id, "best_epoch", epoch)


def _add_refit(uri: str, search: str, trial: Trial, tags: dict, metrics: dict) -> str:
    """A finished refit run under the search's parent run, with a logged model."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(search)
    (parent,) = client.search_runs(
        [experiment.experiment_id], filter_string="tags.`segsearch.role` = 'search'"
    )
    (run_id,) = add_trials(uri, experiment.experiment_id, parent.info.run_id, [trial]).values()
    client.set_tag(run_id, "segsearch.role", "refit")
    for key, value in tags.items():
        client.set_tag(run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    return run_id


def test_promote_ranks_by_the_best_epoch_and_takes_the_refit(tmp_path, checkpoints):
    """t1 scored 0.6 at its best epoch and 0.5 at its last, t2 0.55 at both: t1 is the better
    trial. Once the search has a refit, promote takes the refit's model, by its own score."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    runs = make_search(
        uri,
        "refitted",
        [Trial("t1", (0.6, 0.5), checkpoints[0]), Trial("t2", (0.55, 0.55), checkpoints[1])],
    )
    _log_best(uri, runs["t1"], 0.6, 1)
    _log_best(uri, runs["t2"], 0.55, 2)
    done = promote("refitted", model_name="by-best-epoch", tracking_uri=uri)
    assert (done.run_id, done.value) == (runs["t1"], 0.6)

    on_train = {"segsearch.refit_on": "train", "segsearch.refit_of": "t1"}
    worse = _add_refit(
        uri, "refitted", Trial("r2", (0.4,), checkpoints[1]), on_train, {"best_val_miou": 0.4}
    )
    better = _add_refit(
        uri, "refitted", Trial("r1", (0.7, 0.65), checkpoints[0]), on_train, {"best_val_miou": 0.7}
    )
    done = promote("refitted", model_name="refit-seg", tracking_uri=uri)
    assert (done.run_id, done.metric, done.value) == (better, "val_miou", 0.7)
    assert done.run_id != worse and "(trial r1, refit of t1, val_miou=0.7000)" in done.describe()


def test_a_refit_on_train_and_val_is_gated_by_its_test_score_only_against_test_scores(
    tmp_path, checkpoints
):
    """A refit that trained on val has no val score to compare with a champion's val_miou: it
    is registered by its test_miou, and takes a val-scored alias only with --force."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    make_search(uri, "held", [Trial("t1", (0.6,), checkpoints[0])])
    assert promote_cli(uri, "held", "gated").exit_code == 0
    make_search(uri, "trainval", [Trial("u1", (0.5,), checkpoints[1])])
    all_data = {"segsearch.refit_on": "train+val", "segsearch.refit_of": "u1"}
    second = _add_refit(
        uri,
        "trainval",
        Trial("v2", (), checkpoints[1]),
        {**all_data, "segsearch.refit_rank": 2},
        {"test_miou": 0.95},
    )
    first = _add_refit(
        uri,
        "trainval",
        Trial("v1", (), checkpoints[0]),
        {**all_data, "segsearch.refit_rank": 1},
        {"test_miou": 0.9, "search_val_miou": 0.5},
    )

    refused = promote_cli(uri, "trainval", "gated")
    assert refused.exit_code == 2, refused.output
    assert "scored by val_miou" in refused.stderr and "scored by test_miou" in refused.stderr
    assert "does not compare with it; pass --force" in refused.stderr
    forced = promote_cli(uri, "trainval", "gated", "--force")
    assert forced.exit_code == 0, forced.output
    version = MlflowClient(uri).get_model_version_by_alias("gated", "champion")
    assert version.run_id == first != second  # rank 1, not the higher test score
    assert version.tags["segsearch.metric"] == "test_miou"
    assert float(version.tags["segsearch.metric_value"]) == 0.9
