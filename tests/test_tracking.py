"""MLflow tracking of real Tune searches, on the embedded SQLite store and on a real mlflow server.

The trainable is a small function that reports the CONTRACTS.md metrics every epoch and writes a
real checkpoint (model.pt + trial.json of a tiny U-Net, overlays.png, confusion.png, class_iou.csv)
where Ray Train would, and names it in `checkpoint_path` as TuneReportCallback does.
"""

from __future__ import annotations

import contextlib
import json
import socket
import tempfile
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mlflow import MlflowClient

from segsearch.errors import UserError
from segsearch.tracking import SearchTracker
from segsearch.tracking._clean import MASK, clean, mask

CLASSES = ("background", "disc")
SIZE = 16
EPOCHS = 3
GOOD_LR, BAD_LR, FAILING_LR = 0.01, 1e-12, 0.005
PLANTED_SECRET = "planted-password-value"
METRICS_PER_EPOCH = {
    "epoch",
    "train_loss",
    "val_miou",
    "val_dice",
    "val_pixel_acc",
    "val_iou_background",
    "val_iou_disc",
    "epoch_time_s",
    "images_per_s",
    "num_params",
}


def tiny_trial(
    config: dict[str, Any],
    *,
    root: str,
    filesystem: Any = None,
    fail_flag: str | None = None,
    signals: str | None = None,
) -> None:
    """Report EPOCHS epochs; resume after the last checkpoint it finds.

    With FAILING_LR it raises at epoch 2 while the file `fail_flag` exists. With `signals`, it
    announces each epoch there and waits until the test has acted on it.
    """
    import ray.tune

    from segsearch.search.system_metrics import SystemSampler

    trial_id = ray.tune.get_context().get_trial_id()
    done = _checkpoints(root, filesystem, trial_id)
    system = SystemSampler()
    for epoch in range(len(done) + 1, EPOCHS + 1):
        if signals:
            _signal(signals, trial_id, epoch)
        failing = config["optim.lr"] == FAILING_LR and fail_flag and Path(fail_flag).exists()
        if failing and epoch == 2:
            raise RuntimeError(f"loss diverged at epoch {epoch}")
        started = time.perf_counter()
        miou = (0.5 if config["optim.lr"] >= 1e-3 else 0.05) + 0.1 * epoch
        path = _write_checkpoint(root, filesystem, trial_id, epoch, config, miou)
        ray.tune.report(
            {
                "epoch": epoch,
                "train_loss": 1.0 / epoch,
                "val_miou": miou,
                "val_dice": miou + 0.05,
                "val_pixel_acc": 0.9,
                "val_iou_background": 0.9,
                "val_iou_disc": miou,
                "epoch_time_s": time.perf_counter() - started,
                "images_per_s": 123.0,
                "num_params": 4321,
                "checkpoint_path": path,
                **system.take(),
            }
        )


def _checkpoints(root: str, filesystem: Any, trial_id: str) -> list[str]:
    import pyarrow.fs as pafs

    fs = filesystem or pafs.LocalFileSystem()
    selector = pafs.FileSelector(f"{root}/{trial_id}", allow_not_found=True)
    return sorted(info.path for info in fs.get_file_info(selector))


def _write_checkpoint(
    root: str, filesystem: Any, trial_id: str, epoch: int, config: dict, miou: float
) -> str:
    """A checkpoint dir as train.py writes it; copied to `filesystem` when one is given."""
    import pyarrow.fs as pafs
    from PIL import Image

    from segsearch.checkpoint import save_model
    from segsearch.models import build_model
    from segsearch.visualize import plot_confusion, render_overlays, write_class_iou_csv

    path = f"{root}/{trial_id}/epoch_{epoch:03d}"
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) if filesystem else Path(path)
        model_cfg = {"arch": "unet", "depth": 2, "width": 4}
        meta = {
            "model": model_cfg,
            "in_channels": 3,
            "num_classes": len(CLASSES),
            "classes": list(CLASSES),
            "ignore_index": 255,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "image_size": [SIZE, SIZE],
            "dataset": "memory://tiny",
            "config": {k: v for k, v in config.items() if isinstance(v, int | float | str)},
            "epoch": epoch,
        }
        save_model(local, build_model(model_cfg, in_channels=3, num_classes=2), meta)
        rng = np.random.default_rng(epoch)
        images = rng.integers(0, 256, (2, SIZE, SIZE, 3), dtype=np.uint8)
        masks = (images[..., 0] > 127).astype(np.uint8)
        picture = render_overlays(images, masks, 1 - masks, classes=CLASSES)
        Image.fromarray(picture).save(local / "overlays.png")
        plot_confusion(np.array([[10, 2], [3, 9]]), CLASSES, local / "confusion.png")
        write_class_iou_csv([0.9, miou], CLASSES, local / "class_iou.csv")
        (local / "train_state.pt").write_bytes(b"optimizer state")
        if filesystem:
            pafs.copy_files(str(local), path, destination_filesystem=filesystem)
    return path


def _signal(folder: str, trial_id: str, epoch: int) -> None:
    """Tell the test which epoch starts (it injects faults on these), then wait for it."""
    Path(folder, f"{trial_id}-epoch{epoch}").touch()
    deadline = time.monotonic() + 360  # the test may restart an MLflow server meanwhile
    while not Path(folder, f"{trial_id}-epoch{epoch}.ack").exists():
        if time.monotonic() > deadline:
            raise TimeoutError("the test did not acknowledge the epoch")
        time.sleep(0.05)


def run_search(
    name: str,
    *,
    storage: str,
    callbacks: list,
    root: str,
    lrs: list[float],
    notes: str = "",
    filesystem: Any = None,
    fail_flag: str | None = None,
    signals: str | None = None,
    asha: bool = True,
) -> Any:
    """A real Tune run: one trial per learning rate, in order, ASHA stopping the weak ones."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    trainable = ray.tune.with_parameters(
        tiny_trial, root=root, filesystem=filesystem, fail_flag=fail_flag, signals=signals
    )
    scheduler = (
        ASHAScheduler(max_t=EPOCHS, grace_period=1, reduction_factor=2) if asha else FIFOScheduler()
    )
    tuner = ray.tune.Tuner(
        trainable,
        param_space=_space(lrs, notes),
        tune_config=ray.tune.TuneConfig(
            metric="val_miou",
            mode="max",
            scheduler=scheduler,
            max_concurrent_trials=1,
            reuse_actors=True,
        ),
        run_config=ray.tune.RunConfig(
            name=name,
            storage_path=storage,
            storage_filesystem=filesystem,
            callbacks=callbacks,
            verbose=0,
        ),
    )
    return tuner.fit()


def _space(lrs: list[float], notes: str) -> dict[str, Any]:
    import ray.tune

    return {
        "optim.lr": ray.tune.grid_search(lrs),
        "model.arch": "unet",
        "model.width": 4,
        "batch_size": 8,
        "image_size": [SIZE, SIZE],
        "db.password": PLANTED_SECRET,
        "data.mirror": f"https://reader:{PLANTED_SECRET}@mirror.example/tiny",
        "notes": notes,
    }


def start_tracker(uri: str, name: str, tmp_path: Path, lines: list[str], **options) -> Any:
    space = tmp_path / "space.yaml"
    space.write_text("name: tiny\nspace:\n  optim.lr: {float: [1.0e-12, 1.0e-2], log: true}\n")
    return SearchTracker.start(
        tracking_uri=uri,
        search_name=name,
        space_path=space,
        dataset_uri="s3://data-bucket/tiny",
        dataset_info={"classes": list(CLASSES), "splits": {"train": 8, "val": 4}},
        settings={
            "sampler": {"kind": "grid"},
            "scheduler": {"kind": "asha", "grace_period": 1, "reduction_factor": 2},
            "trials": 3,
            "credentials": {"api_key": PLANTED_SECRET},
        },
        epochs=EPOCHS,
        echo=lines.append,
        **options,
    )


def runs_of(client: MlflowClient, name: str) -> tuple[Any, list[Any]]:
    """The search's parent run and its child runs."""
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get("segsearch.role") == "search"]
    assert len(parents) == 1, "one parent run per search"
    children = [r for r in runs if r.data.tags.get("segsearch.role") == "trial"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    trial_ids = [r.data.tags["segsearch.trial_id"] for r in children]
    assert len(trial_ids) == len(set(trial_ids)), "one run per trial"
    return parents[0], children


def by_lr(children: list[Any]) -> dict[float, Any]:
    return {float(r.data.params["optim.lr"]): r for r in children}


def steps(client: MlflowClient, run_id: str, key: str = "val_miou") -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    return {a.path for a in client.list_artifacts(run_id, path)}


def image_steps(client: MlflowClient, run_id: str) -> dict[str, list[int]]:
    """Steps of each key's full-size images, as the MLflow UI's image slider reads them from
    `images/<key>+step+<step>+timestamp+<ms>+<uuid>.png` (a compressed .webp beside each)."""
    found: dict[str, list[int]] = {}
    for path in artifacts(client, run_id, "images"):
        if path.endswith(".png"):
            key, _, step, *_ = path.removeprefix("images/").split("+")
            found.setdefault(key, []).append(int(step))
    return {key: sorted(values) for key, values in found.items()}


def assert_no_secrets(client: MlflowClient, runs: list[Any], secrets: list[str]) -> None:
    for run in runs:
        fresh = client.get_run(run.info.run_id)
        logged = {**fresh.data.params, **fresh.data.tags}
        for key, value in logged.items():
            for secret in secrets:
                assert secret not in key and secret not in value, (key, value)


@pytest.fixture(scope="module")
def sqlite_uri(ray_cluster, tmp_path_factory) -> Iterator[str]:
    """One embedded store for the module (creating one takes seconds); artifacts in ./mlruns.

    Ray starts first: its workers import this module relative to the directory Ray started in.
    """
    folder = tmp_path_factory.mktemp("mlflow-sqlite")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        yield f"sqlite:///{folder}/mlflow.db"


def test_clean_masks_credentials_in_keys_and_values(monkeypatch):
    monkeypatch.setenv("SOME_SERVICE_TOKEN", "env-token-123456")
    cleaned = clean(
        {
            "aws": {"secret_access_key": "abc"},
            "db.password": "hunter2",
            "auth_token": "t",
            "note": "key env-token-123456 in text",
            "uri": "https://user:pw123@host/x?X-Amz-Signature=abcdef&y=1",
            "id": "AKIAABCDEFGHIJKLMNOP",
            "model.arch": "unet",
            "tokenizer": "bpe",
        }
    )
    assert cleaned["aws.secret_access_key"] == MASK
    assert cleaned["db.password"] == MASK
    assert cleaned["auth_token"] == MASK
    assert cleaned["note"] == f"key {MASK} in text"
    assert cleaned["uri"] == f"https://{MASK}@host/x?X-Amz-Signature={MASK}&y=1"
    assert cleaned["id"] == MASK
    assert cleaned["model.arch"] == "unet"
    assert cleaned["tokenizer"] == "bpe"
    assert mask("Bearer abc.def") == f"Bearer {MASK}"


def test_clean_masks_real_secrets_by_value_but_never_paths(monkeypatch, tmp_path):
    home = tmp_path / "home"
    work = home / "work"
    work.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("PWD", str(work))
    monkeypatch.setenv("OLDPWD", str(home))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / ".aws" / "credentials"))
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / ".ray" / "auth_token"))
    monkeypatch.setenv("MYSQL_PWD", "real-password-123")
    cleaned = clean(
        {"dataset": f"{work}/ds", "storage": f"{home}/runs", "note": "pw real-password-123"}
    )
    assert cleaned == {
        "dataset": f"{work}/ds",
        "storage": f"{home}/runs",
        "note": f"pw {MASK}",
    }
    assert mask(f"checkpoint {work}/runs/x") == f"checkpoint {work}/runs/x"


def test_unreachable_server_fails_before_any_trial(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    with pytest.raises(UserError, match=uri):
        start_tracker(uri, "nowhere", tmp_path, [])
    assert time.monotonic() - started < 15
    not_a_folder = Path(_touch(tmp_path / "a-file"))
    with pytest.raises(UserError, match="sqlite:///"):
        start_tracker(f"sqlite:///{not_a_folder}/mlflow.db", "nowhere", tmp_path, [])


def test_dataset_json_is_logged_as_given(sqlite_uri, tmp_path):
    tracker = start_tracker(sqlite_uri, "no-trials", tmp_path, [])
    client = MlflowClient(tracking_uri=sqlite_uri)
    local = client.download_artifacts(tracker.parent_run_id, "dataset.json", str(tmp_path))
    assert json.loads(Path(local).read_text())["classes"] == list(CLASSES)


def test_search_on_embedded_sqlite_is_one_parent_with_a_child_run_per_trial(
    ray_cluster, sqlite_uri, s3_endpoint, tmp_path, monkeypatch
):
    import os

    monkeypatch.setenv("SOME_SERVICE_TOKEN", "env-token-that-must-not-leak")
    s3_secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    uri = sqlite_uri
    lines: list[str] = []
    tracker = start_tracker(uri, "tiny-sqlite", tmp_path, lines)
    results = run_search(
        "tiny-sqlite",
        storage=str(tmp_path / "runs"),
        callbacks=[tracker.tune_callback()],
        root=str(tmp_path / "checkpoints"),
        lrs=[GOOD_LR, BAD_LR, FAILING_LR],
        notes=f"synced with secret {s3_secret} and env-token-that-must-not-leak",
        fail_flag=_touch(tmp_path / "fail"),
    )
    summary = tracker.finish(results, metric="val_miou", mode="max", study=_study())

    assert summary.unlogged == ()
    client = MlflowClient(tracking_uri=uri)
    parent, children = runs_of(client, "tiny-sqlite")
    assert parent.info.run_id == summary.parent_run_id
    assert len(children) == 3
    runs = by_lr(children)
    good, bad, failing = runs[GOOD_LR], runs[BAD_LR], runs[FAILING_LR]

    assert good.info.status == "FINISHED" and good.data.tags["segsearch.status"] == "completed"
    assert bad.info.status == "FINISHED" and bad.data.tags["segsearch.status"] == "stopped_early"
    assert failing.info.status == "FAILED" and failing.data.tags["segsearch.status"] == "error"
    assert failing.data.tags["segsearch.error"] == "RuntimeError: loss diverged at epoch 2"
    assert "error.txt" in artifacts(client, failing.info.run_id)
    assert steps(client, good.info.run_id) == [1, 2, 3]
    assert steps(client, bad.info.run_id) == [1]
    assert steps(client, failing.info.run_id) == [1]
    assert set(good.data.metrics) >= METRICS_PER_EPOCH
    assert good.data.metrics["val_miou"] == pytest.approx(0.8)
    assert good.data.params["model.arch"] == "unet"
    assert good.data.params["image_size"] == f"[{SIZE}, {SIZE}]"
    assert good.data.params["epochs"] == str(EPOCHS)
    assert {"overlays.png", "confusion.png", "class_iou.csv"} <= artifacts(client, good.info.run_id)
    assert image_steps(client, good.info.run_id) == {"overlays": [1, 2, 3], "confusion": [1, 2, 3]}
    assert image_steps(client, bad.info.run_id) == {"overlays": [1], "confusion": [1]}
    assert good.data.tags["mlflow.loggedImages"] == "True"  # MLflow writes str(True)
    assert steps(client, good.info.run_id, "system/cpu_utilization_percentage") == [1, 2, 3]
    assert good.data.metrics["system/system_memory_usage_megabytes"] > 0

    assert parent.info.status == "FINISHED"
    assert parent.data.params["dataset"] == "s3://data-bucket/tiny"
    assert parent.data.params["scheduler.kind"] == "asha"
    assert parent.data.tags["segsearch.best_trial_id"] == good.data.tags["segsearch.trial_id"]
    assert parent.data.metrics["best_val_miou"] == pytest.approx(0.8)
    assert {
        "space.yaml",
        "dataset.json",
        "best_config.json",
        "trials.csv",
        "param_importances.png",
        "optimization_history.png",
        "parallel_coordinates.png",
        "intermediate_values.png",
    } <= artifacts(client, parent.info.run_id)
    assert summary.best_run_id == good.info.run_id
    assert good.data.tags["segsearch.best"] == "true"
    assert summary.model_uri and good.data.tags["segsearch.model_uri"] == summary.model_uri
    table = Path(client.download_artifacts(parent.info.run_id, "trials.csv", str(tmp_path)))
    assert good.info.run_id in table.read_text()

    assert_no_secrets(
        client,
        [parent, *children],
        [PLANTED_SECRET, "env-token-that-must-not-leak", s3_secret],
    )
    assert good.data.params["db.password"] == MASK
    assert good.data.params["notes"] == f"synced with secret {MASK} and {MASK}"


def test_resumed_search_reuses_its_parent_and_trial_runs(ray_cluster, sqlite_uri, tmp_path):
    import ray.tune

    uri = sqlite_uri
    root, storage = str(tmp_path / "checkpoints"), str(tmp_path / "runs")
    fail_flag = _touch(tmp_path / "fail")
    lines: list[str] = []
    first = start_tracker(uri, "tiny-resume", tmp_path, lines)
    results = run_search(
        "tiny-resume",
        storage=storage,
        callbacks=[first.tune_callback()],
        root=root,
        lrs=[GOOD_LR, FAILING_LR],
        fail_flag=fail_flag,
        asha=False,
    )
    first.finish(results, metric="val_miou", mode="max")
    client = MlflowClient(tracking_uri=uri)
    parent, children = runs_of(client, "tiny-resume")
    failing = by_lr(children)[FAILING_LR]
    assert failing.info.status == "FAILED"

    Path(fail_flag).unlink()
    second = start_tracker(uri, "tiny-resume", tmp_path, lines)
    assert second.parent_run_id == parent.info.run_id
    assert any("continuing MLflow run" in line for line in lines)
    trainable = ray.tune.with_parameters(tiny_trial, root=root, fail_flag=fail_flag)
    tuner = ray.tune.Tuner.restore(f"{storage}/tiny-resume", trainable, resume_errored=True)
    summary = second.finish(tuner.fit(), metric="val_miou", mode="max")

    assert summary.unlogged == ()
    parent, children = runs_of(client, "tiny-resume")
    assert len(children) == 2
    resumed = client.get_run(failing.info.run_id)
    assert resumed.info.status == "FINISHED"
    assert resumed.data.tags["segsearch.status"] == "completed"
    assert "segsearch.error" not in resumed.data.tags
    assert steps(client, failing.info.run_id) == [1, 2, 3]
    assert image_steps(client, failing.info.run_id) == {
        "overlays": [1, 2, 3],
        "confusion": [1, 2, 3],
    }
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
def test_search_on_mlflow_server_puts_overlays_in_s3_and_no_secret_in_params(
    mlflow_server, s3_bucket, ray_cluster, tmp_path
):
    import os

    import boto3

    from segsearch.data.storage import filesystem_for

    filesystem, prefix = filesystem_for(f"s3://{s3_bucket}/search")
    lines: list[str] = []
    tracker = start_tracker(mlflow_server, "tiny-server", tmp_path, lines)
    results = run_search(
        "tiny-server",
        storage=f"{prefix}/tune",
        filesystem=filesystem,
        callbacks=[tracker.tune_callback()],
        root=f"{prefix}/checkpoints",
        lrs=[GOOD_LR, BAD_LR],
    )
    summary = tracker.finish(results, metric="val_miou", mode="max")

    assert summary.unlogged == ()
    client = MlflowClient(tracking_uri=mlflow_server)
    parent, children = runs_of(client, "tiny-server")
    assert len(children) == 2
    s3 = boto3.client("s3")
    keys = [
        obj["Key"]
        for bucket in s3.list_buckets()["Buckets"]
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"])
        for obj in page.get("Contents", [])
    ]
    for child in children:
        run_id = child.info.run_id
        assert any(run_id in k and k.endswith("/overlays.png") for k in keys), run_id
        assert any(run_id in k and "/images/overlays+step+1+" in k for k in keys), run_id
    assert any(parent.info.run_id in k and k.endswith("/trials.csv") for k in keys)
    assert summary.model_uri
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"]]
    assert_no_secrets(client, [parent, *children], [PLANTED_SECRET, *secrets])


def _study() -> Any:
    """A small Optuna study, as a search's StudySearch leaves it, for the parent run's pictures."""
    import optuna

    study = optuna.create_study(direction="maximize")
    lr = optuna.distributions.FloatDistribution(1e-12, 1e-2, log=True)
    complete, pruned = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED
    for rate, value, state in ((GOOD_LR, 0.8, complete), (BAD_LR, 0.15, pruned)):
        trial = optuna.trial.create_trial(
            params={"optim.lr": rate},
            distributions={"optim.lr": lr},
            value=value if state == complete else None,
            intermediate_values={1: value},
            state=state,
        )
        study.add_trial(trial)
    study.add_trial(
        optuna.trial.create_trial(
            params={"optim.lr": FAILING_LR}, distributions={"optim.lr": lr}, value=0.7
        )
    )
    return study


def _touch(path: Path) -> str:
    path.touch()
    return str(path)


class HangingServer:
    """A TCP server that accepts every connection and never answers: a hanging tracking server."""

    def __init__(self) -> None:
        self._socket = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._held: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self._held.append(self._socket.accept()[0])

    def close(self) -> None:
        for connection in [self._socket, *self._held]:
            connection.close()


def test_tune_events_return_at_once_while_the_store_hangs(tmp_path):
    """The callback only queues: events return at once though every MLflow call hangs, and
    finish gives up after `wait_s`, listing what was not logged."""
    from segsearch.tracking._writer import Writer

    server = HangingServer()
    lines: list[str] = []
    writer = Writer(server.uri, echo=lines.append, retry_every_s=60)
    tracker, callback, trial = _one_trial_tracked(writer, "hanging", tmp_path, filesystem=None)
    try:
        started = time.monotonic()
        callback.on_trial_start(0, [], trial)
        callback.on_trial_result(0, [], trial, {"epoch": 1, "val_miou": 0.5})
        callback.on_trial_complete(0, [], trial)
        assert time.monotonic() - started < 0.1
        started = time.monotonic()
        summary = tracker.finish([], metric="val_miou", mode="max", wait_s=1.0)
        assert time.monotonic() - started < 3
    finally:
        server.close()
    assert "trial t_00000: metrics of epoch 1" in summary.unlogged
    assert any("not logged" in line for line in lines)


def test_a_result_returns_at_once_while_its_checkpoint_storage_hangs(tmp_path):
    """Copying an epoch's pictures out of its checkpoint (on S3, say) is not done on Tune's
    event loop: the result event returns at once though the store never answers."""
    import pyarrow.fs as pafs

    from segsearch.tracking._writer import Writer

    storage, tracking = HangingServer(), HangingServer()
    filesystem = pafs.S3FileSystem(
        endpoint_override=storage.uri,
        access_key="test",
        secret_key="test",
        region="us-east-1",
        connect_timeout=3,
        request_timeout=3,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    writer = Writer(tracking.uri, echo=lambda line: None, retry_every_s=60)
    tracker, callback, trial = _one_trial_tracked(writer, "slow-storage", tmp_path, filesystem)
    try:
        callback.on_trial_start(0, [], trial)
        started = time.monotonic()
        result = {"epoch": 1, "val_miou": 0.5, "checkpoint_path": "bucket/trial/epoch_001"}
        callback.on_trial_result(0, [], trial, result)
        assert time.monotonic() - started < 0.5
        tracker.finish([], metric="val_miou", mode="max", wait_s=1.0)
    finally:
        storage.close()
        tracking.close()


def _one_trial_tracked(
    writer: Any, search_name: str, staging: Path, filesystem: Any
) -> tuple[SearchTracker, Any, types.SimpleNamespace]:
    """A SearchTracker on `writer`, its Tune callback, and a stand-in for Tune's Trial whose
    checkpoints live on `filesystem` (None: local)."""
    from segsearch.tracking._callback import TrackingCallback

    tracker = SearchTracker(
        writer,
        search_name=search_name,
        experiment_id="0",
        parent_run_id="parent",
        children={},
        epochs=EPOCHS,
        staging=staging,
    )
    trial = types.SimpleNamespace(
        trial_id="t_00000",
        config={"optim.lr": GOOD_LR},
        storage=types.SimpleNamespace(storage_filesystem=filesystem),
        last_result={"epoch": 1},
    )
    return tracker, TrackingCallback(tracker), trial


def test_a_reopened_trial_run_never_logs_an_epoch_twice(tmp_path, monkeypatch):
    """A trial whose Train run had finished reports its last result again on resume: the
    reopened run goes on from its last logged epoch, so each step is in its history once."""
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    first = start_tracker(uri, "no-twice", tmp_path, lines)
    first.trial_started("t_00000", {"optim.lr": GOOD_LR})
    for epoch in (1, 2):
        first.trial_result("t_00000", {"epoch": epoch, "val_miou": 0.1 * epoch}, None)
    first.interrupted()
    second = start_tracker(uri, "no-twice", tmp_path, lines)
    second.trial_started("t_00000", {"optim.lr": GOOD_LR})
    for epoch in (2, 3):
        second.trial_result("t_00000", {"epoch": epoch, "val_miou": 0.1 * epoch}, None)
    second.trial_ended("t_00000", {"epoch": 3, "val_miou": 0.3}, None)
    second.finish([], metric="val_miou", mode="max", wait_s=10.0)
    client = MlflowClient(uri)
    _, children = runs_of(client, "no-twice")
    history = client.get_metric_history(children[0].info.run_id, "val_miou")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_a_trial_run_lost_with_the_killed_driver_is_ended_as_lost_on_resume(tmp_path, monkeypatch):
    """A trial started after Tune's last saved state is not in the restored search: its run,
    left RUNNING by the killed driver, ends KILLED and tagged lost; the restored trials' runs
    are left for the search to reopen."""
    from segsearch.tracking._callback import TrackingCallback

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    lines: list[str] = []
    killed = start_tracker(uri, "lost", tmp_path, lines)
    for trial_id in ("kept_001", "lost_002"):
        killed.trial_started(trial_id, {"optim.lr": GOOD_LR})
    assert killed.drain(10.0)
    killed.writer.close()  # the driver dies: nothing ends the runs
    resumed = start_tracker(uri, "lost", tmp_path, lines)
    TrackingCallback(resumed).on_step_begin(0, [types.SimpleNamespace(trial_id="kept_001")])
    assert resumed.drain(10.0)
    client = MlflowClient(uri)
    _, children = runs_of(client, "lost")
    runs = {r.data.tags["segsearch.trial_id"]: client.get_run(r.info.run_id) for r in children}
    assert runs["kept_001"].info.status == "RUNNING"
    assert runs["lost_002"].info.status == "KILLED"
    assert runs["lost_002"].data.tags["segsearch.status"] == "lost"
    assert "not resumed" in runs["lost_002"].data.tags["segsearch.reason"]
    assert [line for line in lines if "lost_002" in line] == [
        "tracking: trial run(s) lost_002 ended as lost: lost with the driver before its "
        "state was saved; not resumed"
    ]
    resumed.interrupted()
