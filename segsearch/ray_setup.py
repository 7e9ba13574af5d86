"""Starting or joining Ray with a CPU budget that leaves room for Ray Data beside training."""

from __future__ import annotations

import logging
import os
import socket
from typing import Any
from urllib.parse import urlsplit

from segsearch.errors import ServiceUnavailable

#: Logical CPUs for a local Ray instance. More than the cores on purpose: Train workers and
#: Tune's trial drivers each hold whole logical CPUs, and Ray Data's read/decode tasks must
#: always find one free, or the data stream (and the trial) waits forever.
LOCAL_NUM_CPUS = 8

#: Credentials a search may need on every node. Never forwarded by default: Ray writes a
#: runtime_env's env_vars in plain text to its session's runtime_env_agent.log, and the Jobs API
#: shows a job's to anyone who can reach the dashboard. Locally, Ray's processes inherit the
#: driver's environment; on a cluster, the platform provides them (instance roles, Kubernetes
#: Secrets: cluster/README.md), or `segsearch submit --forward-secrets` passes them knowingly.
SECRET_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
)
#: Settings, not secrets, forwarded to a cluster the driver joins and to a submitted job, so the
#: nodes reach the same endpoints. Not AWS_PROFILE / AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE:
#: they name local files.
SETTINGS_ENV = (
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
)
#: AWS credentials Ray Tune copies from the driver into every trainable actor's runtime_env
#: (ray.tune.execution.class_cache), and so into runtime_env_agent.log.
_TUNE_PROPAGATED_SECRETS = frozenset({*SECRET_ENV, "AWS_SECURITY_TOKEN"})

#: Seconds to wait for a cluster's GCS port before calling the address unreachable (Ray itself
#: retries for minutes).
CONNECT_TIMEOUT_S = 10.0

#: Loggers whose INFO lines and progress talk `quiet_ray` silences.
QUIET_LOGGERS = ("ray.tune", "ray.train", "ray.data", "mlflow")

#: Set by Ray in the driver of a Ray Job (`segsearch submit`).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def quiet_ray() -> None:
    """Keep Ray's (and MLflow's) progress bars and info logs out of the user's way; segsearch
    prints its own line per trial event (and the traceback file of a failed trial). Under -v
    their warnings stay."""
    from ray.data import DataContext

    from segsearch.console import is_verbose

    # Tune's newer console output prints its banner even at verbose=0; the classic one obeys it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING if is_verbose() else logging.CRITICAL)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def init_ray(
    address: str | None = None, *, temp_dir: str | None = None, dashboard: bool = False
) -> str | None:
    """Join the cluster at `address` (or $RAY_ADDRESS); else start Ray locally with headroom.

    A local Ray's processes inherit this process's environment, credentials included, so
    nothing is forwarded; a joined cluster gets SETTINGS_ENV only, never SECRET_ENV. A local
    Ray runs its dashboard only when asked (`dashboard`: it costs a few processes and ~0.5 GB),
    on 127.0.0.1. Returns the dashboard's URL when this call started or joined Ray and a
    dashboard runs there; None otherwise.
    """
    import ray

    keep_credentials_out_of_tune()
    if address:  # even when already connected: a dead address asked for is never ignored
        check_reachable(address)
    if ray.is_initialized():
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    from segsearch.console import is_verbose

    verbose = is_verbose()
    options: dict[str, Any] = {
        "log_to_driver": verbose,
        "logging_level": logging.WARNING if verbose else logging.ERROR,
    }
    # A Ray Job's runtime env already carries its settings (and Ray refuses to merge the same
    # keys); a local Ray inherits them.
    settings = {key: os.environ[key] for key in SETTINGS_ENV if os.environ.get(key)}
    if address and settings and JOB_CONFIG_ENV not in os.environ:
        options["runtime_env"] = {"env_vars": settings}
    if address:
        check_reachable(address)  # $RAY_ADDRESS
        context = ray.init(address=address, **options)
    else:
        context = ray.init(
            address="local",
            num_cpus=LOCAL_NUM_CPUS,
            include_dashboard=dashboard,
            dashboard_host="127.0.0.1",
            _temp_dir=temp_dir,
            **options,
        )
    quiet_ray()
    url = context.address_info.get("webui_url")
    return f"http://{url}" if url else None


def check_reachable(address: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """ServiceUnavailable in seconds when nothing listens at a cluster's HOST:PORT (or
    ray://HOST:PORT); "auto" and addresses without a port are left to Ray."""
    parts = urlsplit(address if "://" in address else f"ray://{address}")
    try:
        host, port = parts.hostname, parts.port
    except ValueError:
        return
    if not host or port is None:
        return
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as err:
        reason = err.strerror or type(err).__name__
    raise ServiceUnavailable(
        f"cannot reach the Ray cluster at {address} ({reason}): is it up? (--address / RAY_ADDRESS)"
    )


def keep_credentials_out_of_tune() -> None:
    """Stop Ray Tune from writing the driver's AWS credentials into its trainables' runtime_env.

    Tune 2.60 has no setting for it: it reads the module-level ENV_VARS_TO_PROPAGATE on every
    trainable it registers. Trainables lose nothing: a local Ray's workers inherit the driver's
    environment, a cluster's nodes have their own credentials, and a job's env_vars (submit
    --forward-secrets) reach all of the job's workers anyway.
    """
    from ray.tune.execution import class_cache

    class_cache.ENV_VARS_TO_PROPAGATE = set(class_cache.ENV_VARS_TO_PROPAGATE) - set(
        _TUNE_PROPAGATED_SECRETS
    )
