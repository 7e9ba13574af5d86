"""End-to-end searches on CPU: real Ray Tune + Optuna + Ray Train, data on a real S3 endpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from segsearch.checkpoint import load_model
from segsearch.data.demo import make_demo_dataset
from segsearch.search import run_search
from segsearch.space import parse_space

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
    import boto3

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


def test_three_trial_search_reports_every_metric_and_the_best_checkpoint_predicts(
    ray_cluster, tiny_dataset, tmp_path
):
    spec = parse_space(tiny_space("three"))
    lines: list[str] = []
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_search(
        spec, dataset=tiny_dataset, storage=str(tmp_path), tracking_uri=tracking, echo=lines.append
    )

    assert len(result.trials) == 3
    assert all(t["error"] is None and t["epochs"] == 2 for t in result.trials)
    assert sum("started" in line for line in lines) == 3
    assert sum(line.endswith("finished") for line in lines) == 3
    grid_state = _result_rows(tmp_path / "three")
    for rows in grid_state.values():
        assert [r["epoch"] for r in rows] == [1, 2]
        for row in rows:
            assert set(row) >= EPOCH_METRICS
            assert {f"val_iou_{c}" for c in ("background", "disc")} <= set(row)
            assert 0.0 <= row["val_miou"] <= 1.0
    assert _trial_runs(tracking, "three") == {t["trial_id"] for t in result.trials}
    model, meta = load_model(result.best_checkpoint)
    assert meta["classes"][0] == "background"
    logits = model.eval()(torch.rand(2, meta["in_channels"], 32, 32))
    assert logits.shape == (2, meta["num_classes"], 32, 32)


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
    driver = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    finished = 0
    deadline = time.monotonic() + 400
    assert driver.stdout is not None
    for line in driver.stdout:
        finished += line.rstrip().endswith("finished")
        if finished == 1 or time.monotonic() > deadline:
            break
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert finished == 1
    before = _result_rows(storage / "resume")

    resumed = subprocess.run(
        [*command, "--resume"], capture_output=True, text=True, env=env, timeout=600
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = _result_rows(storage / "resume")
    assert len(after) == 3
    for trial_dir, rows in after.items():
        assert [r["epoch"] for r in rows] == [1, 2], f"{trial_dir} trained an epoch twice"
    finished_before = {d for d, rows in before.items() if len(rows) == 2}
    assert len(finished_before) == 1
    for trial_dir in finished_before:
        assert after[trial_dir] == before[trial_dir], "a finished trial ran again"
    assert len(_trial_runs(f"sqlite:///{tmp_path}/mlflow.db", "resume")) == 3


def _trial_runs(tracking_uri: str, search: str) -> set[str]:
    """Trial ids of the MLflow child runs of a search; fails on a duplicate run per trial."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(search)
    runs = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'trial'")
    trial_ids = [run.data.tags["segsearch.trial_id"] for run in runs]
    assert len(trial_ids) == len(set(trial_ids)), "a trial has two MLflow runs"
    return set(trial_ids)


def _result_rows(experiment: Path) -> dict[str, list[dict]]:
    """Each trial's reported rows, from Tune's result.json files."""
    rows = {}
    for result_file in experiment.glob("*/result.json"):
        lines = result_file.read_text().splitlines()
        rows[result_file.parent.name] = [json.loads(line) for line in lines if line.strip()]
    return rows
