"""Credentials never leave the environment: a local search and a submitted job, each run with a
marker value in every credential variable, leave no marker in Ray's session folders, the Jobs API,
MLflow's database and artifacts, Tune's state or anything printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
import yaml
from mlflow import MlflowClient

from segsearch.data.demo import make_demo_dataset
from tests.fixtures.ray_head import client_environ

CREDENTIALS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",  # moto takes any key, so the search still reads S3 with it
    "AWS_SESSION_TOKEN",
    # Not MLFLOW_TRACKING_USERNAME: a name, not a secret, which MLflow records as its runs' user.
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
SPACE = {
    "name": "secrets",
    "trials": 1,
    "epochs": 1,
    "max_concurrent": 1,
    "scheduler": {"kind": "none"},
    "sampler": {"kind": "random", "seed": 0},
    "resources": {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1},
    "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2, "model.width": 4},
    "space": {"model.arch": {"choice": ["fcn"]}, "optim.lr": {"float": [1e-3, 1e-2]}},
}


@pytest.fixture
def markers() -> dict[str, str]:
    """A distinct, greppable value per credential variable."""
    run = uuid.uuid4().hex[:10]
    return {name: f"MARKER{run}{name.lower().replace('_', '')}" for name in CREDENTIALS}


@pytest.fixture
def ray_tmpdir() -> Iterator[Path]:
    """Where the local search's Ray keeps its session folder (short: Ray's sockets live there)."""
    folder = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def tiny_data(s3_endpoint: str) -> str:
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    make_demo_dataset(f"s3://{bucket}/ds", n_train=8, n_val=4, size=(32, 32), seed=0)
    return f"s3://{bucket}/ds"


def leaks_in_files(root: Path, markers: dict[str, str]) -> list[str]:
    """'path: VARIABLE' for every file under `root` that holds a marker."""
    found = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: {name}" for name, value in markers.items() if value.encode() in data]
    return found


def leaks_in_text(what: str, text: str, markers: dict[str, str]) -> list[str]:
    return [f"{what}: {name}" for name, value in markers.items() if value in text]


def jobs_api(address: str, token_path: Path, path: str) -> str:
    token = token_path.read_text().strip()
    request = urllib.request.Request(
        f"{address}/api/jobs/{path}", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return response.read().decode()


def test_a_local_search_writes_no_credential_anywhere(markers, ray_tmpdir, tiny_data, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(markers, RAY_TMPDIR=str(ray_tmpdir), PYTHONUNBUFFERED="1")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segsearch",
            "search",
            str(space),
            "--dataset",
            tiny_data,
            "--storage",
            str(tmp_path / "runs"),
            "--tracking-uri",
            f"sqlite:///{tmp_path}/mlflow.db",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "best trial" in out.stdout  # the trial read S3 with the marker credentials
    assert list(ray_tmpdir.glob("ray/session_*/logs/runtime_env_agent.log"))
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "runs" / "secrets").is_dir()
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    experiment = client.get_experiment_by_name("secrets")
    [parent] = client.search_runs([experiment.experiment_id], "tags.`segsearch.role` = 'search'")
    assert parent.data.params["dataset"] == tiny_data
    assert parent.data.tags["segsearch.dataset_fingerprint"].startswith("sha256:")
    leaks = leaks_in_files(ray_tmpdir, markers) + leaks_in_files(tmp_path, markers)
    leaks += leaks_in_text("output", out.stdout + out.stderr, markers)
    assert not leaks, "\n".join(leaks)


def test_local_ray_workers_inherit_credentials_that_no_runtime_env_carries(markers, ray_tmpdir):
    """What lets a local search forward nothing: Ray's processes inherit the driver's variables."""
    script = (
        "import os, ray\n"
        "from segsearch.ray_setup import init_ray\n"
        "init_ray()\n"
        "seen = ray.get(ray.remote(lambda: os.environ.get('AWS_SECRET_ACCESS_KEY')).remote())\n"
        "print('worker sees', seen == os.environ['AWS_SECRET_ACCESS_KEY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(markers, RAY_TMPDIR=str(ray_tmpdir))
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "worker sees True" in out.stdout
    assert not leaks_in_files(ray_tmpdir, markers)


def test_a_submitted_job_shows_no_credential(markers, ray_head_cluster, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    env = client_environ(ray_head_cluster.client_env, **markers)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "segsearch",
            "submit",
            str(space),
            "--address",
            ray_head_cluster.address,
            "--dataset",
            "s3://secrets-bucket/ds",
            "--storage",
            "s3://secrets-bucket/runs",
            "--tracking-uri",
            "http://mlflow.invalid:5000",
            "--wait",
            "--",
            "--help",  # the shipped CLI runs on the cluster; no data needed
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.splitlines()[0].removeprefix("job: ")
    info = jobs_api(ray_head_cluster.address, ray_head_cluster.token_path, job_id)
    assert json.loads(info)["status"] == "SUCCEEDED"
    listed = jobs_api(ray_head_cluster.address, ray_head_cluster.token_path, "")
    assert job_id in listed
    leaks = leaks_in_text("job info", info, markers) + leaks_in_text("job list", listed, markers)
    leaks += leaks_in_text("output", out.stdout + out.stderr, markers)
    leaks += leaks_in_files(ray_head_cluster.token_path.parent / "ray", markers)
    assert not leaks, "\n".join(leaks)
