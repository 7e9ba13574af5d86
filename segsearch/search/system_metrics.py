"""System metrics of the node a trial trains on, averaged per epoch, for the trial's MLflow run.

MLflow's `SystemMetricsMonitor` logs from its own thread straight to a run, and its monitors come
with `import mlflow` (seconds per trial start). A trial's worker has no run to log to (the
tracker opens it on the Tune driver, the one writer of the store) and may train on another node.
So rank 0 samples the node's CPU and memory with psutil, and its own GPU through torch (memory;
utilisation through NVML where `nvidia-ml-py` is installed), on a background thread; it reports
the epoch's averages with its metrics under MLflow's own names, and the tracker logs them as
`system/<name>` at step = epoch, which the MLflow UI shows in a run's System metrics tab.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable

import psutil

#: Seconds between samples; `take` adds one at the epoch's end, so short epochs get one too.
SAMPLE_EVERY_S = 2.0
#: MLflow's prefix for system metrics (SystemMetricsMonitor's own).
PREFIX = "system/"

Probe = Callable[[], dict[str, float]]


class SystemSampler:
    """Samples the node's CPU and memory and the trial's GPU on a daemon thread until closed or
    dropped."""

    def __init__(self, *, every_s: float = SAMPLE_EVERY_S) -> None:
        self._probes = [_cpu_and_memory, *_gpu_probes()]
        self._samples: defaultdict[str, list[float]] = defaultdict(list)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        psutil.cpu_percent()  # the CPU share counts from the previous call: start counting now
        # The thread holds the probes and samples, never the sampler: dropping the sampler
        # stops it.
        weakref.finalize(self, self._stop.set)
        threading.Thread(
            target=_sample_until,
            args=(self._stop, every_s, self._probes, self._samples, self._lock),
            name="segsearch-system-metrics",
            daemon=True,
        ).start()

    def take(self) -> dict[str, float]:
        """The averages since the last `take` (with a sample taken now), as `system/<name>`."""
        with self._lock:
            _sample(self._probes, self._samples)
            averages = {name: sum(v) / len(v) for name, v in self._samples.items() if v}
            self._samples.clear()
        return {PREFIX + name: round(value, 1) for name, value in averages.items()}

    def close(self) -> None:
        self._stop.set()


def _cpu_and_memory() -> dict[str, float]:
    memory = psutil.virtual_memory()
    return {
        "cpu_utilization_percentage": psutil.cpu_percent(),
        "system_memory_usage_megabytes": memory.used / 1e6,
        "system_memory_usage_percentage": memory.used / memory.total * 100,
    }


def _gpu_probes() -> list[Probe]:
    """The trial's own GPU, when it trains on one (CUDA already set up): the memory in use on
    the device, and its utilisation where torch can read NVML (`nvidia-ml-py` installed)."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    device = torch.cuda.current_device()

    def gpu() -> dict[str, float]:
        free, total = torch.cuda.mem_get_info(device)
        values = {
            f"gpu_{device}_memory_usage_megabytes": (total - free) / 1e6,
            f"gpu_{device}_memory_usage_percentage": (total - free) / total * 100,
        }
        with contextlib.suppress(ModuleNotFoundError, RuntimeError):  # no nvidia-ml-py, no NVML
            values[f"gpu_{device}_utilization_percentage"] = float(torch.cuda.utilization(device))
        return values

    return [gpu]


def _sample(probes: list[Probe], samples: defaultdict[str, list[float]]) -> None:
    for probe in probes:
        for name, value in probe().items():
            samples[name].append(float(value))


def _sample_until(
    stop: threading.Event,
    every_s: float,
    probes: list[Probe],
    samples: defaultdict[str, list[float]],
    lock: threading.Lock,
) -> None:
    while not stop.wait(every_s):
        with lock:
            _sample(probes, samples)
