"""Processes killed mid-search: the process training a trial (one worker: the Tune trial's own;
two: a Train worker; the trial resumes from its checkpoint) and the driver with its local Ray
(`--resume` on a fresh Ray finishes exactly the requested trials)."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from segsearch.data.demo import make_demo_dataset
from segsearch.search.tuner import run_search
from segsearch.space import parse_space
from tests.faults import searchproc
from tests.test_search import tiny_space

EVENT = re.compile(r"^trial (\S+) (started|epoch (\d+)/\d+|finished)")
RESUME_TIMEOUT_S = 900
#: Two searches, each starting its own Ray: minutes alone, far longer on a machine shared with
#: other Ray tests.
SHARED_MACHINE_TIMEOUT_S = 2400
#: A row of the final table: trial id, score, epochs.
TABLE_ROW = re.compile(r"^([0-9a-f]{8}(?:_\d+)?)\s+(nan|\d\.\d{4})\s+\d+\s", re.MULTILINE)


@pytest.fixture(scope="module")
def local_dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Images large enough that an epoch lasts a moment, so a kill lands inside one."""
    root = tmp_path_factory.mktemp("data") / "tiny"
    make_demo_dataset(str(root), n_train=64, n_val=8, size=(64, 64), seed=1)
    return str(root)


@pytest.fixture(scope="module")
def s3_dataset(s3_endpoint: str) -> str:
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="fault-resume-data")
    uri = "s3://fault-resume-data/tiny"
    make_demo_dataset(uri, n_train=24, n_val=8, size=(32, 32), seed=1)
    return uri


#: The process that trains, by the Ray title it runs under: a one-worker trial trains in its
#: Tune trial's own process, a two-worker trial in Ray Train's workers.
TRAINING_PROCESS = {1: "ImplicitFunc", 2: "RayTrainWorker"}


@pytest.mark.parametrize("workers", [1, 2])
def test_a_killed_train_worker_resumes_from_its_last_checkpoint(
    ray_cluster, local_dataset, tmp_path, workers
):
    """SIGKILL a process that trains the trial after epoch 2: the trial starts again from the
    epoch-2 checkpoint (not epoch 0) in a new process, and its MLflow run holds each epoch
    exactly once."""
    epochs = 4
    space = tiny_space(
        "worker-kill",
        trials=1,
        epochs=epochs,
        fixed={"batch_size": 8, "image_size": [64, 64], "model.depth": 2},
        resources={"workers": workers, "cpus_per_worker": 1},
    )
    space["space"] = {"model.arch": {"choice": ["unet"]}, "model.width": {"choice": [8]}}
    title = TRAINING_PROCESS[workers]
    killed: list[int] = []
    later_workers: list[int] = []

    def echo(line: str) -> None:
        event = EVENT.match(line)
        epoch = int(event.group(3)) if event and event.group(3) else 0
        if epoch == 2 and not killed:
            trainers = _processes(title)
            assert len(trainers) == workers, f"{title} processes: {trainers}"
            os.kill(trainers[0], signal.SIGKILL)
            killed.append(trainers[0])
        elif epoch > 2:
            later_workers.extend(_processes(title))

    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    result = run_search(
        parse_space(space),
        dataset=local_dataset,
        storage=str(tmp_path / "runs"),
        tracking_uri=tracking,
        echo=echo,
    )

    (trial,) = result.trials
    assert killed, "the training process was never killed"
    assert later_workers and killed[0] not in later_workers, "no new process trained the trial"
    assert trial["error"] is None
    assert [row["epoch"] for row in trial["history"]] == list(range(1, epochs + 1))
    client = MlflowClient(tracking)
    run_id = _trial_runs(tracking, "worker-kill")[trial["trial_id"]]
    for metric in ("epoch", "val_miou", "train_loss"):
        steps = [m.step for m in client.get_metric_history(run_id, metric)]
        assert sorted(steps) == list(range(1, epochs + 1)), f"{metric} history {steps}"
    epoch_values = sorted(m.value for m in client.get_metric_history(run_id, "epoch"))
    assert epoch_values == list(range(1, epochs + 1))


def _processes(title: str) -> list[int]:
    """This test session's Ray processes whose title (ray::<class>...) names `title`."""
    return [
        pid for pid in searchproc.descendants(os.getpid()) if title in searchproc.command_line(pid)
    ]


@pytest.mark.timeout(SHARED_MACHINE_TIMEOUT_S)
def test_a_killed_driver_resumes_on_a_fresh_ray_with_s3_storage(s3_dataset, s3_bucket, tmp_path):
    """Kill the CLI and its local Ray as a trial finishes and the next one starts (two in flight);
    `--resume` on a new local Ray runs exactly the requested trials, no epoch twice, with
    Optuna's history and the MLflow parent run kept."""
    name, trials, epochs = "driver-kill", 4, 2
    space_file = tmp_path / "space.yaml"
    space = tiny_space(name, trials=trials, epochs=epochs, max_concurrent=2)
    space_file.write_text(yaml.safe_dump(space))
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    storage = f"s3://{s3_bucket}/runs"
    command = searchproc.search_command(
        space_file, "--dataset", s3_dataset, "--storage", storage, "--tracking-uri", tracking
    )

    first = searchproc.start(command, tag="first")
    try:
        progress = _run_until_two_in_flight(first)
    finally:
        searchproc.kill_all(first, "first")
    assert progress["finished"] and len(progress["in_flight"]) == 2, progress

    resumed = searchproc.start([*command, "--resume"], tag="resumed")
    try:
        output, _ = resumed.communicate(timeout=RESUME_TIMEOUT_S)
    finally:
        searchproc.kill_all(resumed, "resumed")
    assert resumed.returncode == 0, output[-3000:]
    assert "resuming search" in output

    table = dict(TABLE_ROW.findall(output))
    assert len(table) == trials, output[-3000:]
    assert set(table) >= progress["finished"]
    runs = _trial_runs(tracking, name)
    client = MlflowClient(tracking)
    lost = _lost_runs(client, runs, table)
    assert set(runs) == set(table) | set(lost), "MLflow child runs differ from the search's trials"
    # An in-flight trial is resumed (in the table) or ended as lost; one killed before Tune saved
    # it and before its run was opened left no run (checked just above) and no study trial but
    # a FAIL one (_assert_optuna_knows).
    assert progress["in_flight"] & (set(table) | set(lost)), progress
    if lost:
        assert f"tracking: trial run(s) {', '.join(sorted(lost))} ended as lost" in output
    runs = {trial_id: run_id for trial_id, run_id in runs.items() if trial_id in table}
    for trial_id, run_id in runs.items():
        steps = [m.step for m in client.get_metric_history(run_id, "epoch")]
        assert sorted(steps) == list(range(1, epochs + 1)), f"trial {trial_id} epochs {steps}"
    assert len(_search_runs(tracking, name)) == 1, "the resumed search opened a new parent run"
    history = _tune_history(s3_bucket, f"runs/{name}")
    assert set(history) == set(table)
    for trial_id, trained in history.items():
        # No epoch trained twice, and every trial reached its last epoch. Tune's own result file
        # of a trial killed before Tune uploaded it starts at the epoch it resumed from (reported
        # again from its checkpoint); MLflow has every epoch once (checked above).
        trained_epochs = [epoch for epoch, _ in trained]
        assert len(trained_epochs) == len(set(trained_epochs)), f"{trial_id} trained twice"
        assert trained_epochs and trained_epochs[-1] == epochs, f"{trial_id} history {trained}"
    scores = {
        trial_id: max(m.value for m in client.get_metric_history(run_id, "val_miou"))
        for trial_id, run_id in runs.items()
    }
    study = f"sqlite:///{tmp_path}/optuna.db"
    _assert_optuna_knows(study, name, s3_bucket, tmp_path / "searcher", scores)


def _run_until_two_in_flight(run: subprocess.Popen) -> dict[str, set[str]]:
    """Read the CLI's progress lines until a trial has finished and two others have started;
    the search's output when it ends first."""
    started: set[str] = set()
    finished: set[str] = set()
    seen: list[str] = []
    assert run.stdout is not None
    for line in run.stdout:
        seen.append(line)
        event = EVENT.match(line)
        if not event:
            continue
        if event.group(2) == "started":
            started.add(event.group(1))
        elif event.group(2) == "finished":
            finished.add(event.group(1))
        if finished and len(started - finished) == 2:
            return {"finished": finished, "in_flight": started - finished}
    raise AssertionError(f"the search ended before two trials were in flight:\n{''.join(seen)}")


def _assert_optuna_knows(url: str, name: str, bucket: str, folder: Path, scores: dict) -> None:
    """The search's study holds every trial once, finished with its best epoch's score (the
    history the next suggestions are drawn from), as the searcher state Tune saved last maps
    them; a study trial lost with the killed driver is FAIL, never left RUNNING."""
    import optuna

    s3 = boto3.client("s3")
    folder.mkdir()
    states = sorted(
        key
        for key in _keys(bucket, f"runs/{name}")
        if re.fullmatch(rf"runs/{name}/searcher-state-[^/]+\.pkl", key)
    )
    s3.download_file(bucket, states[-1], str(folder / "searcher.pkl"))
    known = pickle.loads((folder / "searcher.pkl").read_bytes())["_ot_trials"]
    assert set(known) == set(scores)
    trials = {t._trial_id: t for t in optuna.load_study(study_name=name, storage=url).get_trials()}
    for trial_id, number in known.items():
        assert trials[number].state == optuna.trial.TrialState.COMPLETE
        assert trials[number].value == pytest.approx(scores[trial_id]), trial_id
    others = {t.state for key, t in trials.items() if key not in set(known.values())}
    assert others <= {optuna.trial.TrialState.FAIL}


def _keys(bucket: str, prefix: str) -> list[str]:
    pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return [
        o["Key"] for page in pages for o in page.get("Contents", []) if o["Key"].startswith(prefix)
    ]


def _tune_history(bucket: str, prefix: str) -> dict[str, list[tuple[int, float]]]:
    """Trial id → its distinct epochs as (epoch, epoch_time_s), from Tune's result.json files on
    S3. A trial finished before the kill reports its last result again on resume (same time);
    an epoch trained twice would have a time of its own."""
    s3 = boto3.client("s3")
    history = {}
    for key in _keys(bucket, prefix):
        if re.fullmatch(rf"{prefix}/[^/]+/result\.json", key):
            body = s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
            rows = [json.loads(line) for line in body.splitlines() if line.strip()]
            if rows:
                history[rows[0]["trial_id"]] = sorted(
                    {(r["epoch"], r["epoch_time_s"]) for r in rows}
                )
    return history


def _trial_runs(tracking_uri: str, search: str) -> dict[str, str]:
    """Trial id → MLflow child run id; fails on a second run for one trial."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(search)
    runs = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'trial'")
    trial_ids = [run.data.tags["segsearch.trial_id"] for run in runs]
    assert len(trial_ids) == len(set(trial_ids)), f"a trial has two MLflow runs: {trial_ids}"
    return {run.data.tags["segsearch.trial_id"]: run.info.run_id for run in runs}


def _lost_runs(client: MlflowClient, runs: dict[str, str], table: dict) -> dict[str, str]:
    """The runs of trials not in the resumed search: each must be ended KILLED and tagged lost
    (started after Tune's last saved state, gone with the driver)."""
    lost = {trial_id: run_id for trial_id, run_id in runs.items() if trial_id not in table}
    for trial_id, run_id in lost.items():
        run = client.get_run(run_id)
        assert run.info.status == "KILLED", trial_id
        assert run.data.tags["segsearch.status"] == "lost", trial_id
    return lost


def _search_runs(tracking_uri: str, search: str) -> list[str]:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(search)
    runs = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'search'")
    return [run.info.run_id for run in runs]
