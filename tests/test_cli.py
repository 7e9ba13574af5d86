"""CLI conventions: -h everywhere, one version, distinct exit codes, RAY_ADDRESS, -v/-q, --dry-run.

None of these needs a Ray instance: unreachable services are free ports, Ctrl-C is sent to a
command waiting on a socket that never answers.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

import segsearch
from segsearch.cli import main
from segsearch.data.demo import make_demo_dataset

SPACE = {
    "name": "cli-tiny",
    "trials": 4,
    "epochs": 1,
    "scheduler": {"kind": "none"},
    "sampler": {"kind": "random", "seed": 3},
    "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2},
    "space": {
        "model.arch": {"choice": ["fcn", "unet"]},
        "model.width": {"choice": [4, 8]},
        "optim.lr": {"float": [1e-3, 1e-2], "log": True},
    },
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run(*args: str, env: dict[str, str | None] | None = None):
    return CliRunner().invoke(main, list(args), env=env)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    root = tmp_path_factory.mktemp("cli") / "data"
    make_demo_dataset(str(root), n_train=16, n_val=8, size=(32, 32))
    return str(root)


@pytest.fixture
def space_file(tmp_path: Path) -> str:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(SPACE))
    return str(path)


def test_every_command_takes_h_and_names_the_exit_codes() -> None:
    for command in [[], *([name] for name in main.commands)]:
        result = run(*command, "-h")
        assert result.exit_code == 0, (command, result.output)
        assert result.output.startswith("Usage: ")
        assert "--verbose" in result.output and "--quiet" in result.output
        assert "3 a service did not answer" in " ".join(result.output.split())


def test_version_is_the_packages_one() -> None:
    for flag in ("--version", "-V"):
        result = run(flag)
        assert result.output == f"segsearch, version {segsearch.__version__}\n"


def _one_error_line(result, code: int, *names: str) -> None:
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for name in names:
        assert name in lines[0], (name, lines[0])


def test_an_unreachable_mlflow_server_exits_3_and_bad_input_2(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for command in (
        ["promote", "s", "--model-name", "m"],
        ["list"],
        ["best", "s"],
    ):
        _one_error_line(run(*command, "--tracking-uri", dead), 3, dead, "unreachable")
    missing = f"sqlite:///{tmp_path}/nothing.db"
    _one_error_line(run("list", "--tracking-uri", missing), 2, "no MLflow database")
    verbose = run("list", "-v", "--tracking-uri", missing)
    assert verbose.exit_code == 2 and verbose.stderr.startswith("Traceback")
    assert verbose.stderr.splitlines()[-1].startswith("error: no MLflow database")


def test_an_unreachable_s3_endpoint_exits_3(tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{free_port()}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_REGION": "us-east-1",
    }
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    result = run(
        "ingest", str(images), str(masks), "s3://somebucket/ds", "--classes", "a,b", env=env
    )
    _one_error_line(result, 3, endpoint, "somebucket", "cannot reach")
    result = run("predict", str(tmp_path), "s3://somebucket/in", str(tmp_path / "out"), env=env)
    _one_error_line(result, 3, endpoint, "cannot reach")


def test_job_commands_fall_back_to_ray_address_and_exit_3_when_it_is_down() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    env = {"RAY_API_SERVER_ADDRESS": None, "RAY_ADDRESS": dead}
    for command in (["status", "raysubmit_x"], ["logs", "raysubmit_x"], ["stop", "raysubmit_x"]):
        _one_error_line(run(*command, env=env), 3, f"cannot reach the Ray dashboard at {dead}")
    first = f"http://127.0.0.1:{free_port()}"
    result = run("status", "raysubmit_x", env={**env, "RAY_API_SERVER_ADDRESS": first})
    _one_error_line(result, 3, first)  # RAY_API_SERVER_ADDRESS first, as `ray job` reads them
    unset = run("status", "x", env={"RAY_API_SERVER_ADDRESS": None, "RAY_ADDRESS": None})
    assert unset.exit_code == 2 and "Missing option '--address'" in unset.stderr


def test_an_unreachable_ray_cluster_exits_3_in_seconds(space_file: str, dataset: str, tmp_path):
    address = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = run(
        "search",
        space_file,
        "--dataset",
        dataset,
        "--address",
        address,
        "--storage",
        str(tmp_path / "runs"),
        "--tracking-uri",
        f"sqlite:///{tmp_path}/mlflow.db",
    )
    _one_error_line(result, 3, f"cannot reach the Ray cluster at {address}")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists() and not (tmp_path / "mlflow.db").exists()


def test_ctrl_c_exits_130_with_one_line(tmp_path: Path) -> None:
    """`status` against a dashboard that accepts connections and never answers, then SIGINT."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        server.settimeout(180)
        env = {
            **os.environ,
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{server.getsockname()[1]}",
        }
        command = [sys.executable, "-m", "segsearch", "status", "raysubmit_x"]
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        held = [server.accept()[0] for _ in range(2)]  # the reachability probe, then the request
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
        for connection in held:
            connection.close()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["interrupted"]


def test_dry_run_checks_and_plans_without_ray_or_writing(
    space_file, dataset, tmp_path, monkeypatch
) -> None:
    import ray

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_was_up = ray.is_initialized()
    base = ["search", space_file, "--dataset", dataset, "--dry-run"]

    done = run(*base, "--json")
    assert done.exit_code == 0, done.output
    plan = json.loads(done.stdout)
    assert plan["trials"] == 4 and plan["cpus_per_trial"] == 1 and plan["gpus_per_trial"] == 0
    # a one-worker trial holds its worker's CPU only: (8 - 1 for data) // 1, at most its 4 trials
    assert plan["cluster_cpus"] == 8 and plan["trials_at_once"] == 4
    assert len(plan["samples"]) == 3
    assert all(set(s) == {"model.arch", "model.width", "optim.lr"} for s in plan["samples"])
    assert plan["splits"] == {"train": 16, "val": 8}
    text = run("-v", *base)
    assert "4 trial(s) at once" in text.stdout and "first 3 sampled configs:" in text.stdout
    debug_line = "search cli-tiny: 4 trials × 1 epochs on"
    assert debug_line in text.stdout  # -v adds segsearch's debug records
    assert debug_line not in run(*base).stdout
    assert list(tmp_path.iterdir()) == [Path(space_file)], "a dry run wrote something"
    assert ray.is_initialized() == ray_was_up, "a local dry run started Ray"
    unreachable = run(*base, "--tracking-uri", f"http://127.0.0.1:{free_port()}")
    assert unreachable.exit_code == 3, unreachable.output
    no_data = run("search", space_file, "--dataset", str(tmp_path / "none"), "--dry-run")
    _one_error_line(no_data, 2, "dataset.json")
