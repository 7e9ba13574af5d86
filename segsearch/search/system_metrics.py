"""System metrics of the node a trial trains on, averaged per epoch, for the trial's MLflow run.

MLflow's `SystemMetricsMonitor` logs from its own thread straight to a run. A trial's worker has
no run to log to (the tracker opens it on the Tune driver, the one writer of the store) and may
train on another node. So rank 0 samples with MLflow's own monitors (CPU and memory through
psutil, which Ray ships; every GPU of the node through NVML when `nvidia-ml-py` is installed) on
a background thread, reports the epoch's averages with its metrics, and the tracker logs them
under `system/` at step = epoch, which the MLflow UI shows in a run's System metrics tab.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any

#: Seconds between samples; `take` adds one at the epoch's end, so short epochs get one too.
SAMPLE_EVERY_S = 2.0
#: MLflow's prefix for system metrics (SystemMetricsMonitor's own).
PREFIX = "system/"


class SystemSampler:
    """Samples the node's CPU, memory and GPUs on a daemon thread until closed or collected."""

    def __init__(self, *, every_s: float = SAMPLE_EVERY_S) -> None:
        self._monitors = _monitors()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        _collect(self._monitors)  # psutil's CPU share counts from its previous call: prime it
        for monitor in self._monitors:
            monitor.clear_metrics()
        # The thread holds the monitors, never the sampler: dropping the sampler stops it.
        weakref.finalize(self, self._stop.set)
        threading.Thread(
            target=_sample,
            args=(self._monitors, self._lock, self._stop, every_s),
            name="segsearch-system-metrics",
            daemon=True,
        ).start()

    def take(self) -> dict[str, float]:
        """The averages since the last `take` (with a sample taken now), as `system/<name>`."""
        values: dict[str, float] = {}
        with self._lock:
            _collect(self._monitors)
            for monitor in self._monitors:
                values.update(monitor.aggregate_metrics())
                monitor.clear_metrics()
        return {PREFIX + name: float(value) for name, value in values.items()}

    def close(self) -> None:
        self._stop.set()


def _monitors() -> list[Any]:
    """MLflow's CPU monitor, and its GPU monitor where NVML is importable and finds a GPU."""
    import ray  # noqa: F401  (puts Ray's bundled psutil on the path)
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
    from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

    monitors: list[Any] = [CPUMonitor()]
    with contextlib.suppress(ImportError, RuntimeError):  # no nvidia-ml-py, or NVML finds no GPU
        monitors.append(GPUMonitor())
    return monitors


def _collect(monitors: list[Any]) -> None:
    for monitor in monitors:
        monitor.collect_metrics()


def _sample(
    monitors: list[Any], lock: threading.Lock, stop: threading.Event, every_s: float
) -> None:
    while not stop.wait(every_s):
        with lock:
            _collect(monitors)
