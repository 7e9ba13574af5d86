"""Per-epoch system metrics sampled on rank 0 with MLflow's own monitors."""

from __future__ import annotations

import gc
import threading
import time

from segsearch.search.system_metrics import PREFIX, SystemSampler


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "segsearch-system-metrics"]


def test_take_gives_mlflow_system_metric_names_and_starts_afresh():
    sampler = SystemSampler(every_s=0.05)
    sum(i * i for i in range(200_000))  # some CPU time to measure
    time.sleep(0.2)
    first = sampler.take()
    assert {
        f"{PREFIX}cpu_utilization_percentage",
        f"{PREFIX}system_memory_usage_megabytes",
        f"{PREFIX}system_memory_usage_percentage",
    } <= set(first)
    assert 0.0 <= first[f"{PREFIX}cpu_utilization_percentage"] <= 100.0
    assert 0.0 < first[f"{PREFIX}system_memory_usage_percentage"] <= 100.0
    assert set(sampler.take()) == set(first)  # a take right after still has its own sample
    sampler.close()


def test_the_thread_ends_when_the_sampler_is_dropped():
    before = set(sampler_threads())
    sampler = SystemSampler(every_s=0.05)
    (thread,) = set(sampler_threads()) - before
    del sampler
    gc.collect()
    thread.join(timeout=5)
    assert not thread.is_alive()
