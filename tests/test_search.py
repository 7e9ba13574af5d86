"""End-to-end searches on CPU: real Ray Tune + Optuna + Ray Train, data on a real S3 endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import boto3
import numpy as np
import pytest
import ray
import yaml
from mlflow import MlflowClient
from PIL import Image

from segsearch.checkpoint import load_model
from segsearch.data.demo import make_demo_dataset
from segsearch.search.tuner import run_search
from segsearch.serve.predict import predict
from segsearch.serve.predictor import MaskPredictor, predict_masks
from segsearch.serve.promote import promote
from segsearch.space import parse_space
from tests.fixtures.mlflow_server import ARTIFACT_BUCKET

EPOCH_METRICS = {
    "epoch",
    "train_loss",
    "val_miou",
    "val_dice",
    "val_pixel_acc",
    "epoch_time_s",
    "images_per_s",
    "num_params",
}


@pytest.fixture(scope="module")
def tiny_dataset(s3_endpoint: str) -> str:
    """The demo dataset, tiny, on the S3 endpoint (shared by this module's searches)."""
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="search-data")
    uri = "s3://search-data/tiny"
    make_demo_dataset(uri, n_train=24, n_val=8, size=(32, 32), seed=1)
    return uri


def tiny_space(name: str, **overrides) -> dict:
    space = {
        "name": name,
        "trials": 3,
        "epochs": 2,
        "scheduler": {"kind": "none"},
        "sampler": {"kind": "tpe", "seed": 0},
        "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2},
        "space": {
            "model.arch": {"choice": ["fcn", "unet", "resunet"]},
            "model.width": {"choice": [4, 8]},
            "loss.kind": {"choice": ["ce", "dice"]},
            "optim.lr": {"float": [1e-3, 1e-2], "log": True},
        },
    }
    space.update(overrides)
    return space


def test_three_trial_search_tracked_in_mlflow_promoted_and_predicting(
    ray_cluster, tiny_dataset, mlflow_server, s3_endpoint, tmp_path
):
    """The product's path: search (S3 data) → MLflow server (S3 artifacts) → promote → predict."""
    spec = parse_space(tiny_space("three"))
    lines: list[str] = []
    result = run_search(
        spec,
        dataset=tiny_dataset,
        storage=str(tmp_path),
        tracking_uri=mlflow_server,
        echo=lines.append,
    )

    assert len(result.trials) == 3
    assert all(t["error"] is None and t["epochs"] == 2 for t in result.trials)
    assert sum("started" in line for line in lines) == 3
    assert sum(line.endswith("finished") for line in lines) == 3
    for rows in _result_rows(tmp_path / "three").values():
        assert [r["epoch"] for r in rows] == [1, 2]
        for row in rows:
            assert set(row) >= EPOCH_METRICS
            assert {f"val_iou_{c}" for c in ("background", "disc")} <= set(row)
            assert 0.0 <= row["val_miou"] <= 1.0
    runs = _trial_runs(mlflow_server, "three")
    assert set(runs) == {t["trial_id"] for t in result.trials}
    client = MlflowClient(mlflow_server)
    for run_id in runs.values():
        assert [m.step for m in client.get_metric_history(run_id, "val_miou")] == [1, 2]
        assert {"overlays.png", "confusion.png", "class_iou.csv"} <= {
            a.path for a in client.list_artifacts(run_id)
        }
        # Rank 0's node, per epoch; the pictures per epoch on the UI's image slider.
        cpu = client.get_metric_history(run_id, "system/cpu_utilization_percentage")
        assert [m.step for m in cpu] == [1, 2]
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        for key in ("overlays", "confusion"):
            assert sorted(p.split("+")[2] for p in images if p.startswith(f"images/{key}+")) == [
                "1",
                "1",
                "2",
                "2",
            ]  # full size .png and compressed .webp
    overlay_keys = boto3.client("s3", endpoint_url=s3_endpoint).list_objects_v2(
        Bucket=ARTIFACT_BUCKET
    )
    assert any(o["Key"].endswith("/overlays.png") for o in overlay_keys.get("Contents", []))

    promotion = promote("three", model_name="three-seg", tracking_uri=mlflow_server)
    assert promotion.run_id == runs[result.best_trial_id]
    images = tmp_path / "images"
    images.mkdir()
    picture = (np.random.default_rng(0).random((40, 52, 3)) * 255).astype(np.uint8)
    Image.fromarray(picture).save(images / "a.png")
    out = tmp_path / "out"
    count = predict("models:/three-seg@champion", str(images), str(out), tracking_uri=mlflow_server)
    assert count == 1
    mask = np.asarray(Image.open(out / "masks" / "a.png"))
    model, meta = load_model(result.best_checkpoint)
    expected = predict_masks(MaskPredictor(model, meta), [picture])[0]
    assert mask.shape == (40, 52)
    assert np.array_equal(mask, expected)


@pytest.mark.slow
def test_with_storage_on_s3_every_checkpoint_is_an_s3_uri_that_opens(
    ray_cluster, tiny_dataset, tmp_path
):
    """Tune reports checkpoint paths without the filesystem's scheme; the result (and the
    printed best checkpoint) must be URIs a user can pass to evaluate/predict."""
    result = run_search(
        parse_space(tiny_space("s3-storage", trials=1, epochs=1)),
        dataset=tiny_dataset,
        storage="s3://search-data/runs",
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        echo=lambda line: None,
    )
    assert result.best_checkpoint is not None
    assert result.best_checkpoint.startswith("s3://search-data/runs/"), result.best_checkpoint
    assert [t["checkpoint"] for t in result.trials] == [result.best_checkpoint]
    model, _ = load_model(result.best_checkpoint)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_trial_trains_with_two_ddp_workers(ray_cluster, tiny_dataset, tmp_path):
    """Multi-worker training inside a trial: DDP over gloo, data split across the workers."""
    space = tiny_space("ddp", trials=1, epochs=2, resources={"workers": 2, "cpus_per_worker": 1})
    result = run_search(
        parse_space(space),
        dataset=tiny_dataset,
        storage=str(tmp_path),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )
    (trial,) = result.trials
    assert trial["error"] is None and trial["epochs"] == 2
    assert [row["epoch"] for row in trial["history"]] == [1, 2]
    model, meta = load_model(result.best_checkpoint)
    assert meta["epoch"] == trial["best_epoch"] and not hasattr(model, "module")
    manifest = json.loads((Path(result.best_checkpoint) / "manifest.json").read_text())
    assert manifest["trial"] == meta["config"] and manifest["devices"]["workers"] == 2
    (run_id,) = _trial_runs(f"sqlite:///{tmp_path}/mlflow.db", "ddp").values()
    logged = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").list_artifacts(run_id)
    assert "manifest.json" in {artifact.path for artifact in logged}


def test_a_searched_image_size_is_decoded_once_and_trials_train_on_crops(
    ray_cluster, tiny_dataset, tmp_path
):
    space = tiny_space("scales", trials=2, epochs=1, max_concurrent=1)
    space["sampler"] = {"kind": "random", "seed": 0}
    space["fixed"] = {"batch_size": 8, "model.depth": 2, "aug.crop": "16x16"}
    space["space"] = {"image_size": {"choice": ["16x16", "32x32"]}}
    space["enqueue"] = [{"image_size": "32x32"}, {"image_size": "16x16"}]
    lines: list[str] = []
    result = run_search(
        parse_space(space),
        dataset=tiny_dataset,
        storage=str(tmp_path),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
        echo=lines.append,
    )
    assert any(line.startswith("data: decoded once at 16x16, 32x32") for line in lines), lines
    assert {t["config"]["image_size"] for t in result.trials} == {"16x16", "32x32"}
    for trial in result.trials:
        assert trial["error"] is None and trial["epochs"] == 1
        _, meta = load_model(trial["checkpoint"])
        side = int(trial["config"]["image_size"].partition("x")[0])
        assert meta["image_size"] == [side, side] and meta["config"]["aug"]["crop"] == [16, 16]


@pytest.mark.slow
def test_asha_stops_trials_that_cannot_learn(ray_cluster, tiny_dataset, tmp_path):
    # Random sampling with seed 6 draws lr 0.02, 0.02, 1e-12: the third cannot learn.
    space = tiny_space(
        "asha",
        trials=3,
        epochs=3,
        max_concurrent=1,
        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        sampler={"kind": "random", "seed": 6},
    )
    space["space"] = {
        "model.arch": {"choice": ["unet"]},
        "model.width": {"choice": [8]},
        "optim.lr": {"choice": [0.02, 1.0e-12]},
    }
    result = run_search(
        parse_space(space),
        dataset=tiny_dataset,
        storage=str(tmp_path),
        tracking_uri=f"sqlite:///{tmp_path}/mlflow.db",
    )

    by_lr = {}
    for trial in result.trials:
        by_lr.setdefault(trial["config"]["optim.lr"], []).append(trial["epochs"])
    groups = ray.util.placement_group_table().values()
    assert [g for g in groups if g["state"] == "CREATED"] == [], "a stopped trial kept its CPUs"
    assert 3 in by_lr[0.02], "a learning trial must run to the end"
    assert by_lr[1.0e-12] == [1], "ASHA must stop the trial that cannot learn at its first rung"
    assert len(result.trials) == 3  # trial N+1 started after trial N released its resources


@pytest.mark.slow
def test_resume_after_the_driver_is_killed_runs_exactly_the_requested_trials(
    ray_cluster, tiny_dataset, tmp_path
):
    space_file = tmp_path / "resume.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space("resume", trials=3, max_concurrent=1)))
    storage = tmp_path / "runs"
    command = [
        sys.executable,
        "-m",
        "segsearch",
        "search",
        str(space_file),
        "--dataset",
        tiny_dataset,
        "--storage",
        str(storage),
        "--address",
        ray_cluster,
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    finished = started = 0
    assert driver.stdout is not None
    for line in driver.stdout:
        finished += line.rstrip().endswith("finished")
        started += " started: " in line
        if started == 2:
            break  # trial 1 has finished, trial 2 has just started, trial 3 has not
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert (finished, started) == (1, 2)
    # Tune's own files reach the storage a second or so late; MLflow is written per epoch.
    before = _epoch_histories(tracking_uri, "resume")
    finished_before = [trial for trial, epochs in before.items() if len(epochs) == 2]
    assert len(finished_before) == 1

    resumed = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, env=env, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _epoch_histories(tracking_uri, "resume")
    assert len(after) == 3
    for trial, epochs in after.items():
        assert [epoch for epoch, _ in epochs] == [1, 2], f"trial {trial} logged an epoch twice"
    assert after[finished_before[0]] == before[finished_before[0]], "a finished trial trained again"
    for trial_dir, epochs in _trained(storage / "resume").items():
        assert [epoch for epoch, _ in epochs] == [1, 2], f"{trial_dir} trained an epoch twice"


@pytest.mark.slow
def test_dashboard_flag_starts_a_local_ray_whose_dashboard_answers_at_the_printed_url(
    tiny_dataset, tmp_path
):
    space_file = tmp_path / "dash.yaml"
    space_file.write_text(yaml.safe_dump(tiny_space("dash", trials=1, epochs=1)))
    command = [sys.executable, "-m", "segsearch", "search", str(space_file)]
    command += ["--dataset", tiny_dataset, "--storage", str(tmp_path / "runs")]
    command += ["--tracking-uri", f"sqlite:///{tmp_path}/mlflow.db", "--dashboard"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    assert driver.stdout is not None
    line = next((line for line in driver.stdout if line.startswith("Ray dashboard:")), "")
    url = line.split()[2]
    assert url.startswith("http://127.0.0.1:"), line
    ray_cli = Path(sys.executable).parent / "ray"
    token = subprocess.run([ray_cli, "get-auth-token"], capture_output=True, text=True).stdout
    request = urllib.request.Request(f"{url}/api/version")
    if token.strip():  # Ray 2.60 turns token auth on by default
        assert token.strip() not in line, "the dashboard line printed Ray's token"
        request.add_header("Authorization", f"Bearer {token.strip()}")
    with urllib.request.urlopen(request, timeout=30) as answer:
        assert json.load(answer)["ray_version"] == ray.__version__
    driver.stdout.read()
    assert driver.wait(timeout=300) == 0


def _epoch_histories(tracking_uri: str, search: str) -> dict[str, list[tuple[int, int]]]:
    """Trial id → its logged (epoch, timestamp_ms) of val_miou, as MLflow holds them."""
    client = MlflowClient(tracking_uri)
    return {
        trial: [(m.step, m.timestamp) for m in client.get_metric_history(run_id, "val_miou")]
        for trial, run_id in _trial_runs(tracking_uri, search).items()
    }


def _trial_runs(tracking_uri: str, search: str) -> dict[str, str]:
    """Trial id → MLflow child run id for a search; fails on a duplicate run per trial."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(search)
    runs = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'trial'")
    trial_ids = [run.data.tags["segsearch.trial_id"] for run in runs]
    assert len(trial_ids) == len(set(trial_ids)), "a trial has two MLflow runs"
    return {run.data.tags["segsearch.trial_id"]: run.info.run_id for run in runs}


def _trained(experiment: Path) -> dict[str, list[tuple[int, float]]]:
    """Each trial's distinct trained epochs as (epoch, epoch_time_s).

    A trial whose Train run had finished when the driver died reports that result again on
    resume (same epoch, same time); an epoch trained twice would have its own time.
    """
    rows = _result_rows(experiment)
    return {
        trial: sorted({(r["epoch"], r["epoch_time_s"]) for r in trial_rows})
        for trial, trial_rows in rows.items()
        if trial_rows
    }


def _result_rows(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reported rows, from Tune's result.json files."""
    rows = {}
    for result_file in experiment.glob("*/result.json"):
        lines = result_file.read_text().splitlines()
        rows[result_file.parent.name] = [json.loads(line) for line in lines if line.strip()]
    return rows


@pytest.mark.slow
def test_search_keeps_a_persistent_optuna_study_that_resume_continues_and_warm_start_reads(
    ray_cluster, tiny_dataset, tmp_path
):
    """The study, opened with Optuna's own loader, holds every epoch and the ASHA-stopped trial
    as PRUNED; --resume adds no trial; the next search warm-starts from its best config."""
    import optuna

    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = tiny_space(
        "studied",
        trials=2,
        epochs=2,
        max_concurrent=1,
        scheduler={"kind": "asha", "grace_period": 1, "reduction_factor": 2},
        sampler={"kind": "random", "seed": 0},  # draws lr 0.02, then 1e-12
    )
    space["space"] = {
        "model.arch": {"choice": ["unet"]},
        "model.width": {"choice": [8]},
        "optim.lr": {"choice": [1.0e-12, 0.02]},
    }
    options = {"dataset": tiny_dataset, "storage": str(tmp_path), "tracking_uri": tracking_uri}
    run_search(parse_space(space), **options)

    url = f"sqlite:///{tmp_path}/optuna.db"  # beside the MLflow store
    study = optuna.load_study(study_name="studied", storage=url)
    good, stopped = study.get_trials()
    assert good.params["optim.lr"] == 0.02 and stopped.params["optim.lr"] == 1.0e-12
    assert good.state == optuna.trial.TrialState.COMPLETE
    assert sorted(good.intermediate_values) == [1, 2] and good.value == good.intermediate_values[2]
    assert stopped.state == optuna.trial.TrialState.PRUNED
    assert sorted(stopped.intermediate_values) == [1]
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("studied")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'search'")
    assert {
        "optimization_history.png",
        "parallel_coordinates.png",
        "intermediate_values.png",
    } <= {a.path for a in client.list_artifacts(parent.info.run_id)}

    run_search(parse_space(space), resume=True, **options)
    assert len(optuna.load_study(study_name="studied", storage=url).get_trials()) == 2

    warm = tiny_space("warmed", trials=1, epochs=1, warm_start="studied")
    warm["space"] = {**space["space"], "optim.lr": {"float": [1.0e-3, 5.0e-2], "log": True}}
    result = run_search(parse_space(warm), **options)
    assert result.trials[0]["config"]["optim.lr"] == 0.02
