"""Searches as Ray Jobs: submit to a cluster's Jobs API, then follow, inspect or stop them.

What travels with a job (the `runtime_env`):

- the segsearch package, through `py_modules`, whether it was imported from a source checkout
  or from a wheel install (see `code_runtime_env`);
- the search-space file, as the job's `working_dir` (a staging folder holding that file alone);
- settings (region, endpoints) as `env_vars`; credentials only on request (`forward_secrets`,
  `--env`), since Ray shows a job's env_vars in its info on the dashboard and writes them to
  runtime_env_agent.log on the nodes. The cluster's own identity (instance roles, Kubernetes
  Secrets and service accounts) is the default way to credentials: cluster/README.md.

Checkpoints and the MLflow store must outlive the job: a relative `--storage` or a sqlite:///
tracking URI would land in the job's temporary working directory on the head and vanish with it,
so `submit` wants shared storage and a tracking server, named here or by the cluster.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shlex
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

import segsearch
from segsearch.errors import ServiceUnavailable, UserError
from segsearch.ray_setup import SECRET_ENV, SETTINGS_ENV

#: Never shipped with the package.
CODE_EXCLUDES = ["__pycache__", "*.pyc", "*.pyo"]
#: Seconds to wait for the dashboard port before calling the address unreachable.
CONNECT_TIMEOUT_S = 10.0
#: Ray loggers that print INFO lines (uploads, websocket closes) on every command.
QUIET_LOGGERS = (
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)
#: Where Ray reads a token from when RAY_AUTH_MODE=token, highest precedence first.
TOKEN_SOURCES = "RAY_AUTH_TOKEN, the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token"
#: What the cluster's environment provides under `--cluster-defaults`.
STORAGE_ENV = "SEGSEARCH_STORAGE"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
ENV_OF = {"--storage": STORAGE_ENV, "--tracking-uri": TRACKING_ENV}

Echo = Callable[[str], None]


class JobFailed(Exception):
    """A followed job ended in FAILED or STOPPED; the CLI exits 1 with this one-line message."""


def submit(
    space_path: str | Path,
    *,
    address: str,
    dataset: str,
    name: str | None = None,
    tracking_uri: str | None = None,
    storage: str | None = None,
    shared_storage: str | None = None,
    cluster_defaults: bool = False,
    env: Mapping[str, str] | None = None,
    wait: bool = False,
    extra_args: Sequence[str] = (),
    echo: Echo = print,
    warn: Echo = print,
) -> str:
    """Submit `segsearch search SPACE` as a Ray Job on the cluster at `address`; return its id.

    The space and where results go (see `check_locations`) are validated here first, so a typo
    fails on the laptop, not on the cluster. With `wait`, follow the job's logs to the end and
    raise JobFailed unless it succeeded.
    """
    from segsearch.space import load_space

    space_path = Path(space_path)
    spec = load_space(space_path)
    name = name or spec.name
    _check_tracking_uri(tracking_uri)
    storage = check_locations(
        storage=storage,
        shared_storage=shared_storage,
        tracking_uri=tracking_uri,
        cluster_defaults=cluster_defaults,
        extra_args=extra_args,
    )
    argv = ["search", space_path.name, "--dataset", dataset, "--name", name]
    locations = {"--tracking-uri": tracking_uri, "--storage": storage}
    for option, value in locations.items():
        argv += [option, value] if value else []
    entrypoint = segsearch_entrypoint([*argv, *extra_args])
    from_cluster = [ENV_OF[option] for option, value in locations.items() if not value]
    if from_cluster:
        entrypoint = f"{cluster_check_entrypoint(from_cluster)} && {entrypoint}"
    env = dict(env or {})
    warning = exposure_warning(env, address)
    if warning:
        warn(warning)
    with _staged([space_path]) as working_dir:
        runtime_env = {**code_runtime_env(), "working_dir": str(working_dir), "env_vars": env}
        job_id = submit_entrypoint(
            entrypoint,
            address=address,
            runtime_env=runtime_env,
            metadata={"segsearch.search": name},
        )
    origin = "source checkout" if is_source_checkout() else "installed package"
    echo(f"job: {job_id}")
    echo(f"code: segsearch {segsearch.__version__} from {package_dir()} ({origin})")
    echo(f"dashboard: {dashboard_url(address, job_id)}")
    where = tracking_uri or f"the cluster's {TRACKING_ENV}"
    default_storage = f"the cluster's {STORAGE_ENV}"
    echo(f"MLflow experiment: {name} ({where})")
    echo(f"storage: {storage or default_storage}")
    if env:
        echo(f"job env: {', '.join(sorted(env))} (values not shown)")
    if "://" not in dataset:
        echo(f"note: {dataset} is a local path; every node of the cluster must see it")
    if wait:
        follow(job_id, address=address, echo=echo)
    return job_id


def submit_entrypoint(
    entrypoint: str,
    *,
    address: str,
    runtime_env: Mapping[str, Any],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """Submit any shell entrypoint with `runtime_env` through the Jobs API; return the job id."""
    with _connected(address) as client:
        return client.submit_job(
            entrypoint=entrypoint,
            runtime_env=dict(runtime_env),
            metadata=dict(metadata or {}),
        )


def code_runtime_env() -> dict[str, Any]:
    """The runtime_env part that installs this segsearch on the cluster: `py_modules`.

    One mechanism for both ways segsearch gets installed. From a source checkout (an editable
    install, pyproject.toml beside the package) it ships the user's current code, edits not yet
    committed included, and nothing else of the tree: a `working_dir` of the checkout would carry
    .venv, data, mlruns or a *.db unless every such pattern were excluded. From a wheel it ships
    the installed release, byte for byte. `pip: ["segsearch==X"]` was set aside because it needs
    segsearch on an index the cluster can reach and builds a virtualenv per job; `pip: ["-e ."]`
    cannot point at a laptop's folder. Dependencies (torch, ray, mlflow, ...) come from the
    cluster image (cluster/ installs segsearch there); py_modules goes first on the workers'
    PYTHONPATH, so the shipped package wins over the image's copy of segsearch.
    """
    return {"py_modules": [str(package_dir())], "excludes": list(CODE_EXCLUDES)}


def package_dir() -> Path:
    """The folder of the segsearch package this process imported."""
    return Path(segsearch.__file__).resolve().parent


def is_source_checkout() -> bool:
    """True when segsearch runs from a source tree (pyproject.toml next to the package)."""
    return (package_dir().parent / "pyproject.toml").is_file()


def segsearch_entrypoint(argv: Sequence[str]) -> str:
    """The job's shell command: `python -m segsearch ...`, which needs no console script."""
    return shlex.join(["python", "-m", "segsearch", *argv])


def job_env(
    pairs: Iterable[str] = (),
    *,
    forward: bool = True,
    forward_secrets: bool = False,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The job's env_vars: SETTINGS_ENV (when `forward`) and SECRET_ENV (when `forward_secrets`)
    taken from `environ`, then KEY=VALUE pairs."""
    environ = os.environ if environ is None else environ
    names = (SETTINGS_ENV if forward else ()) + (SECRET_ENV if forward_secrets else ())
    env = {k: environ[k] for k in names if environ.get(k)}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise UserError(f"--env {key or pair!r}: expected KEY=VALUE with KEY a variable name")
        env[key] = value
    return env


def exposure_warning(env: Mapping[str, str], address: str) -> str | None:
    """A warning naming the secret-looking variables in `env` and where Ray will show them."""
    from segsearch.tracking._clean import is_secret_key

    secrets = sorted(key for key in env if key in SECRET_ENV or is_secret_key(key))
    if not secrets:
        return None
    return (
        f"warning: {', '.join(secrets)} go to the job in plain text: shown in the job's info to "
        f"anyone who can reach the dashboard ({normalize_address(address)}) and written to "
        "runtime_env_agent.log in the Ray session folder of every node that runs it; prefer the "
        "cluster's own credentials (cluster/README.md)"
    )


def check_locations(
    *,
    storage: str | None,
    shared_storage: str | None,
    tracking_uri: str | None,
    cluster_defaults: bool,
    extra_args: Sequence[str] = (),
) -> str | None:
    """The job's `--storage` (None: the cluster's); UserError unless results outlive the job.

    Shared storage is s3:// (any remote URI) or an absolute path the user declares mounted on
    every node (`shared_storage`); tracking goes to an http(s) server. With `cluster_defaults`,
    what is not given comes from the cluster's SEGSEARCH_STORAGE / MLFLOW_TRACKING_URI, checked
    on the head before the search starts (`cluster_check_entrypoint`).
    """
    for arg in extra_args:
        option = arg.split("=", 1)[0]
        if option in ("--storage", "--tracking-uri"):
            raise UserError(
                f"{option} after --: give it to submit itself (before --), where it is checked"
            )
    if storage and shared_storage:
        raise UserError("give --storage or --shared-storage, not both")
    if shared_storage is not None and not PurePosixPath(shared_storage).is_absolute():
        raise UserError(
            f"--shared-storage {shared_storage}: expected an absolute path that every node mounts"
        )
    if storage and not _is_remote(storage):
        raise UserError(
            f"--storage {storage} is a local path, which the job would resolve inside its "
            "temporary working directory on the head: use s3://BUCKET/PREFIX, or "
            "--shared-storage PATH for a folder every node mounts"
        )
    if tracking_uri and urlsplit(tracking_uri).scheme not in ("http", "https"):
        raise UserError(
            f"--tracking-uri {tracking_uri} is not a tracking server: its store would stay in "
            "the job's temporary working directory on the head; use http(s)://MLFLOW:5000"
        )
    storage = storage or shared_storage
    missing = [
        option
        for option, given in (
            ("--storage s3://BUCKET/PREFIX (or --shared-storage PATH)", storage),
            ("--tracking-uri http(s)://MLFLOW:5000", tracking_uri),
        )
        if not given
    ]
    if missing and not cluster_defaults:
        raise UserError(
            f"submit needs {' and '.join(missing)}: otherwise checkpoints and the MLflow store "
            "land in the job's temporary working directory on the head and vanish with it "
            f"(--cluster-defaults takes {STORAGE_ENV} / {TRACKING_ENV} from the cluster)"
        )
    return storage


def cluster_check_entrypoint(names: Sequence[str]) -> str:
    """The shell command that checks the cluster's own `names` on the head (cluster_env.py)."""
    return shlex.join(["python", "-m", "segsearch.cluster_env", *names])


def check_cluster_environment(names: Iterable[str], environ: Mapping[str, str]) -> None:
    """UserError unless the cluster's environment sets `names` to shared, lasting places."""
    for name in names:
        value = environ.get(name, "")
        if not value:
            raise UserError(
                f"the cluster's environment has no {name}, and submit was given none "
                "(--cluster-defaults): set it on the cluster (cluster/README.md) or pass it"
            )
        if name == TRACKING_ENV and urlsplit(value).scheme not in ("http", "https"):
            raise UserError(f"the cluster's {name}={value} is not an http(s) tracking server")
        if name == STORAGE_ENV and not (_is_remote(value) or PurePosixPath(value).is_absolute()):
            raise UserError(
                f"the cluster's {name}={value} is a relative path: it would resolve inside "
                "the job's temporary working directory"
            )


def _is_remote(uri: str) -> bool:
    return urlsplit(uri).scheme not in ("", "file") and "://" in uri


def dashboard_url(address: str, job_id: str) -> str:
    """The dashboard page of one job."""
    return f"{normalize_address(address)}/#/jobs/{job_id}"


def normalize_address(address: str) -> str:
    """http://HOST:PORT for the Jobs API; HOST:PORT gets http://; ray:// is refused."""
    address = address.strip().rstrip("/")
    if not address:
        raise UserError("--address is empty: pass the dashboard address, http://HEAD:8265")
    if "://" not in address:
        address = f"http://{address}"
    scheme = urlsplit(address).scheme
    if scheme not in ("http", "https"):
        raise UserError(
            f"--address {address}: jobs go to the dashboard's HTTP address (http://HEAD:8265), "
            f"not a {scheme}:// address"
        )
    return address


def status(job_id: str, *, address: str) -> Any:
    """The job's JobDetails (status, message, entrypoint, start and end times)."""
    with _connected(address) as client:
        return _job_info(client, job_id, address)


def logs(job_id: str, *, address: str, follow_logs: bool = False, echo: Echo = print) -> None:
    """Print the job's logs so far, or with `follow_logs` stream them until the job ends."""
    if follow_logs:
        follow(job_id, address=address, echo=echo, check=False)
        return
    with _connected(address) as client:
        _job_info(client, job_id, address)
        text = client.get_job_logs(job_id)
    if text:
        echo(text.rstrip("\n"))


def follow(job_id: str, *, address: str, echo: Echo = print, check: bool = True) -> str:
    """Stream the job's logs until it ends; return its final status.

    With `check`, raise JobFailed when the job did not succeed.
    """
    import aiohttp

    with _connected(address) as client:
        _job_info(client, job_id, address)
        try:
            asyncio.run(_tail(client, job_id, echo))
        except KeyboardInterrupt:
            raise KeyboardInterrupt(
                f"stopped following job {job_id}; it keeps running (`segsearch stop {job_id}` "
                "ends it)"
            ) from None
        except (RuntimeError, aiohttp.ClientError) as err:
            raise UserError(
                f"lost the log stream of job {job_id} ({_whitespace_collapsed(err)}); "
                f"`segsearch logs {job_id} --follow` streams it again"
            ) from None
        info = _job_info(client, job_id, address)
    final = str(info.status)
    if check and final != "SUCCEEDED":
        raise JobFailed(f"job {job_id} {final}: {headline(info.message)}")
    return final


def stop(job_id: str, *, address: str) -> bool:
    """Ask the cluster to stop the job; False when it had already ended."""
    with _connected(address) as client:
        _job_info(client, job_id, address)
        return client.stop_job(job_id)


def check_token_settings(environ: Mapping[str, str] | None = None) -> None:
    """With RAY_AUTH_MODE=token, fail here in one line when no token can be read.

    Ray itself aborts the process on an unreadable RAY_AUTH_TOKEN_PATH and only warns on a
    missing token before the server refuses the request.
    """
    environ = os.environ if environ is None else environ
    if environ.get("RAY_AUTH_MODE", "").lower() != "token" or environ.get("RAY_AUTH_TOKEN"):
        return
    token_path = environ.get("RAY_AUTH_TOKEN_PATH")
    if token_path:
        path = Path(token_path).expanduser()
        if not _readable_token(path):
            raise UserError(
                f"RAY_AUTH_TOKEN_PATH={token_path} is missing or empty: point it at the "
                "cluster's token file (`ray get-auth-token` on the head prints the token)"
            )
        return
    if not _readable_token(Path.home() / ".ray" / "auth_token"):
        raise UserError(
            "RAY_AUTH_MODE=token but no token found: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
            "or write ~/.ray/auth_token (`ray get-auth-token` on the head prints the token)"
        )


@contextmanager
def _connected(address: str):
    """A JobSubmissionClient for `address`; unreachable or refused turns into a UserError."""
    import requests
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    address = normalize_address(address)
    check_token_settings()
    _probe(address)
    try:
        yield JobSubmissionClient(address)
    except AuthenticationError as err:
        raise UserError(_auth_message(address, str(err))) from None
    except (ConnectionError, requests.exceptions.ConnectionError) as err:
        raise ServiceUnavailable(
            f"Ray dashboard at {address} stopped answering: {_whitespace_collapsed(err)}"
        ) from None


def _probe(address: str) -> None:
    """Fail in seconds, in one line, when nothing listens at the address."""
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=CONNECT_TIMEOUT_S):
            return
    except OSError as err:
        reason = err.strerror or type(err).__name__
    raise ServiceUnavailable(
        f"cannot reach the Ray dashboard at {address} ({reason}): is the cluster up and its "
        "dashboard port (8265) reachable or forwarded?"
    )


def _auth_message(address: str, error: str) -> str:
    """Say exactly which token setting is missing or wrong."""
    mode = os.environ.get("RAY_AUTH_MODE", "").lower()
    if "Authentication failed" in error:
        source = (
            "RAY_AUTH_TOKEN"
            if os.environ.get("RAY_AUTH_TOKEN")
            else os.environ.get("RAY_AUTH_TOKEN_PATH", "~/.ray/auth_token")
        )
        return (
            f"the Ray cluster at {address} rejected the token from {source}: use the head's "
            "token (`ray get-auth-token` on the head)"
        )
    if mode != "token":
        return (
            f"the Ray cluster at {address} requires a token: set RAY_AUTH_MODE=token and "
            f"provide the token in {TOKEN_SOURCES}"
        )
    return f"the Ray cluster at {address} got no token: provide it in {TOKEN_SOURCES}"


def _job_info(client: Any, job_id: str, address: str) -> Any:
    try:
        return client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise UserError(f"no job {job_id} on the Ray cluster at {address}") from None
        raise


async def _tail(client: Any, job_id: str, echo: Echo) -> None:
    async for chunk in client.tail_job_logs(job_id):
        echo(chunk.rstrip("\n"))


@contextmanager
def _staged(files: Iterable[Path]):
    """A fresh folder holding copies of `files` only: the job's working_dir."""
    with tempfile.TemporaryDirectory(prefix="segsearch-job-") as folder:
        for file in files:
            shutil.copy2(file, Path(folder) / file.name)
        yield Path(folder)


def _check_tracking_uri(uri: str | None) -> None:
    """A password inside the URI would sit in the job's entrypoint, shown on the dashboard."""
    if uri and urlsplit(uri).password:
        raise UserError(
            "--tracking-uri contains a password: pass the URI without it and give the cluster "
            "MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (cluster/README.md)"
        )


def _readable_token(path: Path) -> bool:
    try:
        return bool(path.read_text().strip())
    except OSError:
        return False


def headline(message: str | None) -> str:
    """The first line of a job's status message, without the log tail Ray appends to failures."""
    first = (message or "").strip().split("\n", 1)[0]
    return first.split(", last available logs", 1)[0].rstrip(":")


def _whitespace_collapsed(value: Any) -> str:
    """All of `value` on one line, whitespace collapsed (unlike first_line, nothing is cut)."""
    return " ".join(str(value or "").split())
