"""Starting or joining Ray with a CPU budget that leaves room for Ray Data beside training."""

from __future__ import annotations

import os

#: Logical CPUs for a local Ray instance. More than the cores on purpose: Train workers and
#: Tune's trial drivers each hold whole logical CPUs, and Ray Data's read/decode tasks must
#: always find one free, or the data stream (and the trial) waits forever.
LOCAL_NUM_CPUS = 8


def quiet_ray_data() -> None:
    """Turn off Ray Data's per-operator progress bars (many lines a second in a log)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.enable_operator_progress_bars = False
    ctx.print_on_execution_start = False


def init_ray(address: str | None = None) -> None:
    """Join the cluster at `address` (or $RAY_ADDRESS); else start a local instance with headroom."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    if address:
        ray.init(address=address, log_to_driver=False)
    else:
        ray.init(
            address="local",
            num_cpus=LOCAL_NUM_CPUS,
            include_dashboard=False,
            log_to_driver=False,
        )
    quiet_ray_data()
