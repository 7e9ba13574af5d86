"""`segsearch submit/status/logs/stop` against a real `ray start --head` with token auth on."""

from __future__ import annotations

import hashlib
import json
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from segsearch import jobs
from segsearch.cli import main
from segsearch.errors import UserError
from segsearch.ray_setup import SECRET_ENV
from tests.fixtures.ray_head import client_environ

SECRET_KEY = "SEGSEARCH_TEST_SECRET"
SECRET_VALUE = "s3cr3t-value-never-printed"


def segsearch_cli(*args: str, env: dict[str, str], timeout: float = 240):
    """Run the real CLI in a fresh process (Ray reads its auth settings once per process)."""
    return subprocess.run(
        [sys.executable, "-m", "segsearch", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def submit_code(code: str, *, address: str, env: dict[str, str], job_env: dict[str, str]) -> str:
    """Submit `python -c CODE` with segsearch's runtime_env through jobs.submit_entrypoint."""
    driver = (
        "from segsearch import jobs\n"
        f"runtime_env = {{**jobs.code_runtime_env(), 'env_vars': {job_env!r}}}\n"
        f"print(jobs.submit_entrypoint({shlex.join(['python', '-c', code])!r}, "
        f"address={address!r}, runtime_env=runtime_env))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", driver], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def wait_for_status(job_id: str, wanted: str, *, address: str, auth: dict[str, str]) -> None:
    """Poll the Jobs API over plain HTTP (a CLI process per poll costs seconds of imports)."""
    token = Path(auth["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    request = urllib.request.Request(
        f"{address}/api/jobs/{job_id}", headers={"Authorization": f"Bearer {token}"}
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with urllib.request.urlopen(request, timeout=10) as response:
            current = json.load(response)["status"]
        if current == wanted:
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} is {current}, never reached {wanted}")


def write_space(path: Path, **overrides) -> Path:
    space = {
        "name": "jobs-tiny",
        "trials": 2,
        "epochs": 1,
        "max_concurrent": 1,
        "scheduler": {"kind": "none"},
        "sampler": {"kind": "random", "seed": 0},
        "resources": {"workers": 1, "gpus_per_worker": 0, "cpus_per_worker": 1},
        "fixed": {"batch_size": 8, "image_size": [32, 32], "model.depth": 2},
        "space": {
            "model.arch": {"choice": ["fcn", "unet"]},
            "model.width": {"choice": [4, 8]},
            "optim.lr": {"float": [1e-3, 1e-2], "log": True},
        },
    }
    space.update(overrides)
    path.write_text(yaml.safe_dump(space))
    return path


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# --- without a cluster -------------------------------------------------------------------------


def test_job_env_forwards_settings_and_credentials_only_on_request():
    environ = {
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "session",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://s3.local:9000",
        "AWS_PROFILE": "laptop-only",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "MLFLOW_S3_ENDPOINT_URL": "http://s3.local:9000",
        "HOME": "/home/me",
    }
    settings = {
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://s3.local:9000",
        "MLFLOW_S3_ENDPOINT_URL": "http://s3.local:9000",
    }
    assert jobs.job_env(environ=environ) == settings
    env = jobs.job_env(
        ["EXTRA=1", "AWS_ACCESS_KEY_ID=override", "EMPTY="], forward_secrets=True, environ=environ
    )
    assert env == {
        **settings,
        "AWS_ACCESS_KEY_ID": "override",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_SESSION_TOKEN": "session",
        "MLFLOW_TRACKING_PASSWORD": "pw",
        "EXTRA": "1",
        "EMPTY": "",
    }
    assert jobs.job_env(["A=b"], forward=False, environ=environ) == {"A": "b"}
    for bad in ("NOVALUE", "=x", "1ABC=x", "A-B=x"):
        with pytest.raises(UserError, match="KEY=VALUE"):
            jobs.job_env([bad], environ={})


def test_code_runtime_env_ships_the_imported_package_without_caches():
    runtime_env = jobs.code_runtime_env()
    [shipped] = runtime_env["py_modules"]
    assert Path(shipped) == Path(jobs.__file__).parent
    assert (Path(shipped) / "cli.py").is_file()
    assert "__pycache__" in runtime_env["excludes"]
    assert jobs.is_source_checkout()  # the tests run from the repository


def test_entrypoint_is_quoted_for_the_shell():
    command = jobs.segsearch_entrypoint(["search", "my space.yaml", "--name", "a;rm -rf x"])
    assert shlex.split(command) == [
        "python",
        "-m",
        "segsearch",
        "search",
        "my space.yaml",
        "--name",
        "a;rm -rf x",
    ]


def test_addresses_are_normalized_and_ray_client_addresses_refused():
    assert jobs.normalize_address("10.0.0.5:8265/") == "http://10.0.0.5:8265"
    assert jobs.normalize_address("https://ray.example.com") == "https://ray.example.com"
    with pytest.raises(UserError, match="http://HEAD:8265"):
        jobs.normalize_address("ray://10.0.0.5:10001")


def test_tracking_uri_with_a_password_is_refused_before_contacting_the_cluster(tmp_path):
    space = write_space(tmp_path / "space.yaml")
    with pytest.raises(UserError, match="MLFLOW_TRACKING_PASSWORD"):
        jobs.submit(
            space,
            address=f"http://127.0.0.1:{free_port()}",
            dataset="s3://bkt/data",
            tracking_uri="https://user:hunter2@mlflow.example.com",
        )


def test_token_settings_name_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match=re.escape(f"RAY_AUTH_TOKEN_PATH={missing} is missing")):
        jobs.check_token_settings({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(missing)})
    with pytest.raises(
        UserError, match=re.escape("RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or write ~/")
    ):
        jobs.check_token_settings({"RAY_AUTH_MODE": "token"})
    jobs.check_token_settings({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "abc"})
    jobs.check_token_settings({})
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("abc\n")
    jobs.check_token_settings({"RAY_AUTH_MODE": "token"})


def submit_cli(*args: str):
    """`segsearch submit` in this process: for checks that fail before contacting a cluster."""
    return CliRunner().invoke(main, ["submit", *args])


LASTING = ("--storage", "s3://bkt/runs", "--tracking-uri", "http://mlflow:5000")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ((), "submit needs --storage s3://BUCKET/PREFIX (or --shared-storage PATH) and "),
        (("--storage", "s3://bkt/runs"), "submit needs --tracking-uri http(s)://MLFLOW:5000:"),
        (("--tracking-uri", "http://m:5000"), "submit needs --storage s3://BUCKET/PREFIX"),
        (
            ("--storage", "runs", "--tracking-uri", "http://m:5000"),
            "--storage runs is a local path, which the job would resolve inside its temporary",
        ),
        (
            ("--shared-storage", "runs", "--tracking-uri", "http://m:5000"),
            "--shared-storage runs: expected an absolute path that every node mounts",
        ),
        (
            ("--storage", "s3://bkt/runs", "--tracking-uri", "sqlite:///mlflow.db"),
            "--tracking-uri sqlite:///mlflow.db is not a tracking server",
        ),
        ((*LASTING, "--", "--storage=/tmp/x"), "--storage after --: give it to submit itself"),
        (
            ("--storage", "s3://b/r", "--shared-storage", "/mnt/r", "--tracking-uri", "http://m"),
            "give --storage or --shared-storage, not both",
        ),
    ],
)
def test_submit_refuses_results_that_would_vanish_with_the_job(tmp_path, options, message):
    """Checked on the laptop: the address is a closed port, never contacted."""
    space = write_space(tmp_path / "space.yaml")
    address = f"http://127.0.0.1:{free_port()}"
    out = submit_cli(str(space), "--address", address, "--dataset", "s3://bkt/x", *options)
    assert out.exit_code == 2, out.output
    assert out.stderr.startswith(f"error: {message}"), out.stderr
    assert out.stderr.count("\n") == 1


def test_cluster_defaults_are_checked_on_the_cluster_before_the_search():
    check = jobs.check_cluster_environment
    names = ["SEGSEARCH_STORAGE", "MLFLOW_TRACKING_URI"]
    check(names, {"SEGSEARCH_STORAGE": "/mnt/shared/runs", "MLFLOW_TRACKING_URI": "http://m"})
    check(names, {"SEGSEARCH_STORAGE": "s3://b/runs", "MLFLOW_TRACKING_URI": "https://m"})
    check(["MLFLOW_TRACKING_URI"], {"MLFLOW_TRACKING_URI": "http://m"})
    bad = [
        ({"MLFLOW_TRACKING_URI": "http://m"}, "the cluster's environment has no SEGSEARCH_STORAGE"),
        (
            {"SEGSEARCH_STORAGE": "runs", "MLFLOW_TRACKING_URI": "http://m"},
            "the cluster's SEGSEARCH_STORAGE=runs is a relative path",
        ),
        (
            {"SEGSEARCH_STORAGE": "s3://b/r", "MLFLOW_TRACKING_URI": "sqlite:///m.db"},
            "the cluster's MLFLOW_TRACKING_URI=sqlite:///m.db is not an http(s) tracking server",
        ),
    ]
    for environ, message in bad:
        with pytest.raises(UserError, match=re.escape(message)):
            check(names, environ)


def test_secrets_for_the_job_are_named_with_where_they_will_show(tmp_path, monkeypatch):
    for name in SECRET_ENV:  # the session's S3 fixture sets AWS_ACCESS_KEY_ID, among others
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-never-printed")
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    space = write_space(tmp_path / "space.yaml")
    address = f"http://127.0.0.1:{free_port()}"
    common = (str(space), "--address", address, "--dataset", "s3://bkt/x", *LASTING)
    plain = submit_cli(*common)
    assert "warning" not in plain.stderr
    assert plain.stderr.startswith("error: cannot reach the Ray dashboard")
    for options, names in (
        (("--forward-secrets",), "AWS_SECRET_ACCESS_KEY"),
        (("--env", "DB_PASSWORD=hunter22", "--env", "A=1"), "DB_PASSWORD"),
    ):
        out = submit_cli(*common, *options)
        warning, error = out.stderr.splitlines()
        assert warning == (
            f"warning: {names} go to the job in plain text: shown in the job's info to anyone "
            f"who can reach the dashboard ({address}) and written to runtime_env_agent.log in the "
            "Ray session folder of every node that runs it; prefer the cluster's own credentials "
            "(cluster/README.md)"
        )
        assert error.startswith("error: cannot reach the Ray dashboard")
        assert "aws-secret-never-printed" not in out.output and "hunter22" not in out.output


def test_unreachable_address_is_one_line_and_exit_3(tmp_path):
    space = write_space(tmp_path / "space.yaml")
    address = f"http://127.0.0.1:{free_port()}"
    env = client_environ()
    for args in (
        ["submit", str(space), "--address", address, "--dataset", "s3://bkt/x", *LASTING],
        ["logs", "raysubmit_x", "--address", address, "--follow"],
    ):
        out = segsearch_cli(*args, env=env, timeout=60)
        assert out.returncode == 3, out
        assert out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith(f"error: cannot reach the Ray dashboard at {address}")


# --- against the real head ---------------------------------------------------------------------


def test_missing_or_wrong_token_is_refused_saying_what_to_set(ray_head, tmp_path):
    no_token = client_environ(HOME=str(tmp_path))
    out = segsearch_cli("status", "raysubmit_x", "--address", ray_head, env=no_token)
    assert out.returncode == 2
    assert out.stderr == (
        f"error: the Ray cluster at {ray_head} requires a token: set RAY_AUTH_MODE=token and "
        "provide the token in RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or "
        "~/.ray/auth_token\n"
    )
    wrong = client_environ(
        {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, HOME=str(tmp_path)
    )
    out = segsearch_cli("status", "raysubmit_x", "--address", ray_head, env=wrong)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: the Ray cluster at {ray_head} rejected the token from")
    assert out.stderr.count("\n") == 1


def test_job_runs_shipped_code_with_env_and_status_logs_work(ray_head, ray_head_env):
    env = client_environ(ray_head_env)
    code = (
        "import hashlib, os, segsearch; "
        "print('code from', segsearch.__file__); "
        f"print('secret', hashlib.sha256(os.environ[{SECRET_KEY!r}].encode()).hexdigest())"
    )
    job_id = submit_code(code, address=ray_head, env=env, job_env={SECRET_KEY: SECRET_VALUE})
    followed = segsearch_cli("logs", job_id, "--address", ray_head, "--follow", env=env)
    assert followed.returncode == 0, followed.stderr
    assert f"secret {hashlib.sha256(SECRET_VALUE.encode()).hexdigest()}" in followed.stdout
    [code_line] = [line for line in followed.stdout.splitlines() if line.startswith("code from")]
    # py_modules put the shipped copy first on the path, ahead of the editable install
    assert "runtime_resources" in code_line and str(Path(jobs.__file__).parent) not in code_line
    wait_for_status(job_id, "SUCCEEDED", address=ray_head, auth=ray_head_env)
    shown = segsearch_cli("status", job_id, "--address", ray_head, env=env)
    assert shown.stdout.startswith(f"job {job_id}: SUCCEEDED\n")
    assert SECRET_VALUE not in shown.stdout
    again = segsearch_cli("logs", job_id, "--address", ray_head, env=env)
    assert again.returncode == 0 and "code from" in again.stdout


def test_stop_ends_a_long_running_job(ray_head, ray_head_env):
    env = client_environ(ray_head_env)
    job_id = submit_code(
        "import time; print('sleeping', flush=True); time.sleep(600)",
        address=ray_head,
        env=env,
        job_env={},
    )
    wait_for_status(job_id, "RUNNING", address=ray_head, auth=ray_head_env)
    out = segsearch_cli("stop", job_id, "--address", ray_head, env=env)
    assert out.returncode == 0 and out.stdout == f"stop requested for job {job_id}\n"
    wait_for_status(job_id, "STOPPED", address=ray_head, auth=ray_head_env)
    out = segsearch_cli("stop", job_id, "--address", ray_head, env=env)
    assert out.stdout == f"job {job_id} had already ended (STOPPED)\n"


def test_unknown_job_id_is_one_line_and_exit_2(ray_head, ray_head_env):
    out = segsearch_cli(
        "status", "raysubmit_nope", "--address", ray_head, env=client_environ(ray_head_env)
    )
    assert out.returncode == 2
    assert out.stderr == f"error: no job raysubmit_nope on the Ray cluster at {ray_head}\n"


def test_submit_wait_runs_the_shipped_cli_and_prints_env_keys_not_values(
    ray_head, ray_head_env, tmp_path
):
    space = write_space(tmp_path / "tiny.yaml")
    env = client_environ(ray_head_env, AWS_SECRET_ACCESS_KEY="aws-secret-never-printed")
    out = segsearch_cli(
        "submit",
        str(space),
        "--address",
        ray_head,
        "--dataset",
        "s3://bkt/data",
        "--name",
        "plumbing",
        *LASTING,
        "--env",
        f"{SECRET_KEY}={SECRET_VALUE}",
        "--wait",
        "--",
        "--help",  # `segsearch search ... --help` on the cluster: the shipped CLI, no data
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    job_id = lines[0].removeprefix("job: ")
    assert job_id.startswith("raysubmit_")
    assert f"dashboard: {ray_head}/#/jobs/{job_id}" in lines
    assert "MLflow experiment: plumbing (http://mlflow:5000)" in lines
    assert "storage: s3://bkt/runs" in lines
    [env_line] = [line for line in lines if line.startswith("job env:")]
    assert SECRET_KEY in env_line and "AWS_SECRET_ACCESS_KEY" not in env_line
    assert out.stderr.startswith(f"warning: {SECRET_KEY} go to the job in plain text")
    assert "Usage: python -m segsearch search" in out.stdout  # streamed from the cluster
    for secret in (SECRET_VALUE, "aws-secret-never-printed"):
        assert secret not in out.stdout + out.stderr
    shown = segsearch_cli("status", job_id, "--address", ray_head, env=env)
    assert "search: plumbing" in shown.stdout


def test_submit_wait_of_a_failing_search_exits_1(ray_head, ray_head_env, tmp_path):
    space = write_space(tmp_path / "tiny.yaml")
    out = segsearch_cli(
        "submit",
        str(space),
        "--address",
        ray_head,
        "--dataset",
        str(tmp_path / "no-such-dataset"),
        *LASTING,
        "--wait",
        env=client_environ(ray_head_env),
    )
    assert out.returncode == 1, out
    assert "is a local path; every node of the cluster must see it" in out.stdout
    assert out.stderr.startswith("error: job raysubmit_") and " FAILED: " in out.stderr
    assert out.stderr.count("\n") == 1


def test_cluster_defaults_the_cluster_lacks_fail_the_job_before_the_search(
    ray_head, ray_head_env, tmp_path
):
    """The test head sets no SEGSEARCH_STORAGE: the job says so in one line, no search runs."""
    space = write_space(tmp_path / "tiny.yaml")
    out = segsearch_cli(
        "submit",
        str(space),
        "--address",
        ray_head,
        "--dataset",
        "s3://bkt/data",
        "--tracking-uri",
        "http://mlflow:5000",
        "--cluster-defaults",
        "--wait",
        env=client_environ(ray_head_env),
    )
    assert out.returncode == 1, out
    assert "storage: the cluster's SEGSEARCH_STORAGE" in out.stdout.splitlines()
    logged = [line for line in out.stdout.splitlines() if line.startswith("error:")]
    assert logged == [
        "error: the cluster's environment has no SEGSEARCH_STORAGE, and submit was given none "
        "(--cluster-defaults): set it on the cluster (cluster/README.md) or pass it"
    ]
    assert "Traceback" not in out.stdout


# --- end to end (issue 6, part 3) --------------------------------------------------------------


@pytest.mark.slow
def test_submit_wait_runs_a_two_trial_search_logged_to_mlflow(
    ray_head, ray_head_env, s3_endpoint, mlflow_server, tmp_path
):
    import boto3
    import mlflow

    from segsearch.data.demo import make_demo_dataset

    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket="submit-e2e")
    dataset = "s3://submit-e2e/tiny"
    make_demo_dataset(dataset, n_train=16, n_val=8, size=(32, 32), seed=2)
    space = write_space(tmp_path / "tiny.yaml")
    env = client_environ(ray_head_env)  # carries the moto AWS_* variables, forwarded to the job
    out = segsearch_cli(
        "submit",
        str(space),
        "--address",
        ray_head,
        "--dataset",
        dataset,
        "--name",
        "submit-e2e",
        "--tracking-uri",
        mlflow_server,
        "--shared-storage",  # one machine: the head's local disk is every node's
        str(tmp_path / "runs"),
        "--forward-secrets",  # the head runs without the moto credentials
        "--wait",
        env=env,
        timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr
    job_id = out.stdout.splitlines()[0].removeprefix("job: ")
    assert "best trial" in out.stdout
    assert out.stderr.startswith("warning: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY go to the job")
    assert "AWS_SECRET_ACCESS_KEY" in out.stdout and "testing-secret-value" not in out.stdout
    assert f"best checkpoint: {tmp_path / 'runs'}" in out.stdout
    shown = segsearch_cli("status", job_id, "--address", ray_head, env=env)
    assert f"job {job_id}: SUCCEEDED" in shown.stdout
    logged = segsearch_cli("logs", job_id, "--address", ray_head, env=env)
    assert "best trial" in logged.stdout

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("submit-e2e")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id])
    trials = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(trials) == 2, json.dumps([r.data.tags for r in runs], default=str)[:2000]
    assert all("val_miou" in r.data.metrics for r in trials)
