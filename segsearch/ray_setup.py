"""Starting or joining Ray with a CPU budget that leaves room for Ray Data beside training."""

from __future__ import annotations

import logging
import os
from typing import Any

#: Logical CPUs for a local Ray instance. More than the cores on purpose: Train workers and
#: Tune's trial drivers each hold whole logical CPUs, and Ray Data's read/decode tasks must
#: always find one free, or the data stream (and the trial) waits forever.
LOCAL_NUM_CPUS = 8

#: Variables a search needs on every node: S3 credentials and settings, MLflow credentials. They are
#: forwarded from the driver to the search's tasks and actors, and from `segsearch submit` to the
#: job. Not AWS_PROFILE / AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE: they name local files.
FORWARDED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "MLFLOW_TRACKING_INSECURE_TLS",
    "MLFLOW_S3_ENDPOINT_URL",
)


#: Set by Ray in the driver of a Ray Job (`segsearch submit`).
JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def quiet_ray() -> None:
    """Keep Ray's (and MLflow's) progress bars and info logs out of the user's way; segsearch
    prints its own line per trial event (and the traceback file of a failed trial)."""
    from ray.data import DataContext

    # Tune's newer console output prints its banner even at verbose=0; the classic one obeys it.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for name in ("ray.tune", "ray.train", "ray.data", "mlflow"):
        logging.getLogger(name).setLevel(logging.CRITICAL)

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def init_ray(address: str | None = None, *, temp_dir: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); else start Ray locally with headroom."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.ERROR}
    if JOB_CONFIG_ENV not in os.environ:
        # A Ray Job's runtime env already carries them (and Ray refuses to merge the same keys).
        env_vars = {key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}
        options["runtime_env"] = {"env_vars": env_vars}
    if address:
        ray.init(address=address, **options)
    else:
        ray.init(
            address="local",
            num_cpus=LOCAL_NUM_CPUS,
            include_dashboard=False,
            _temp_dir=temp_dir,
            **options,
        )
    quiet_ray()
