"""Whether one trial fits the cluster, decided before any trial starts (no endless Train retry)."""

from __future__ import annotations

from pathlib import Path

import pytest

from segsearch.ray_setup import LOCAL_NUM_CPUS
from segsearch.search.capacity import (
    TRIAL_DRIVER_CPUS,
    capacity_problem,
    trial_cpus,
    trial_resources,
)
from segsearch.search.tuner import DATA_CPU_RESERVE, trial_concurrency
from segsearch.space import ResourcesSpec, load_space

SPACES = sorted(Path(__file__).resolve().parent.parent.joinpath("search_spaces").glob("*.yaml"))
LAPTOP = [{"CPU": float(LOCAL_NUM_CPUS)}]
GPU_NODE = {"CPU": 8.0, "GPU": 1.0}


def test_a_gpu_space_on_a_cpu_machine_says_what_to_change() -> None:
    problem = capacity_problem(ResourcesSpec(gpus_per_worker=1), live=LAPTOP)
    assert problem == (
        "the space asks 1 GPU per worker; this cluster has no GPU: set "
        "resources.gpus_per_worker: 0 or run on a GPU cluster"
    )


def test_a_worker_larger_than_every_node_is_refused() -> None:
    problem = capacity_problem(ResourcesSpec(cpus_per_worker=16), live=[*LAPTOP, *LAPTOP])
    assert problem is not None
    assert "16 CPUs per worker; the largest node has 8 CPUs" in problem


def test_workers_that_fit_only_together_are_refused_on_one_node() -> None:
    problem = capacity_problem(ResourcesSpec(workers=3, cpus_per_worker=3), live=LAPTOP)
    assert problem is not None and "room for 2 such worker(s)" in problem


def test_workers_spread_over_nodes_and_gpus_fit() -> None:
    spec = ResourcesSpec(workers=2, gpus_per_worker=1, cpus_per_worker=4)
    assert capacity_problem(spec, live=[GPU_NODE, GPU_NODE]) is None
    assert capacity_problem(spec, live=[GPU_NODE]) is not None


def test_an_autoscaler_that_can_add_a_gpu_node_lets_the_search_wait_for_it() -> None:
    spec = ResourcesSpec(workers=4, gpus_per_worker=1, cpus_per_worker=4)
    assert capacity_problem(spec, live=[{"CPU": 2.0}], addable=[GPU_NODE]) is None
    assert capacity_problem(spec, live=[{"CPU": 2.0}], addable=[{"CPU": 64.0}]) is not None


def test_a_trial_that_leaves_no_cpu_for_its_data_is_refused() -> None:
    """One worker of 8 CPUs, or 1 CPU for the driver + 2 workers of 3.5, take all 8: Ray Data's
    tasks would wait forever."""
    problem = capacity_problem(ResourcesSpec(cpus_per_worker=8), live=LAPTOP)
    assert problem is not None and "for reading data" in problem
    problem = capacity_problem(ResourcesSpec(workers=2, cpus_per_worker=3.5), live=LAPTOP)
    assert problem is not None and "1 CPU for its driver" in problem
    assert capacity_problem(ResourcesSpec(cpus_per_worker=7), live=LAPTOP) is None


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_the_local_default_cannot_starve_the_data_stream(path: Path) -> None:
    """On the local default (LOCAL_NUM_CPUS logical CPUs, no GPU) a shipped space, run with
    `gpus_per_worker: 0`, is either refused up front or leaves CPUs for Ray Data's tasks at its
    default concurrency: the set-up that hung (trials holding every CPU, data tasks waiting
    forever) cannot start."""
    spec = load_space(path)
    resources = spec.resources.model_copy(update={"gpus_per_worker": 0})
    spec = spec.model_copy(update={"resources": resources})
    if capacity_problem(resources, live=LAPTOP) is not None:
        return
    trials, _ = trial_concurrency(spec, LAPTOP[0])
    held = trials * trial_cpus(resources)
    assert held + DATA_CPU_RESERVE <= LOCAL_NUM_CPUS


def test_a_max_concurrent_that_would_starve_the_data_stream_is_capped_with_a_notice() -> None:
    """4 trials x (1 CPU driver + 1 CPU worker) took all 8 CPUs: Ray Data's tasks never ran."""
    spec = load_space(SPACES[0])
    spec = spec.model_copy(
        update={"max_concurrent": 4, "resources": ResourcesSpec(workers=1, cpus_per_worker=2)}
    )
    trials, notice = trial_concurrency(spec, LAPTOP[0])
    assert trials == 3
    assert notice == (
        "max_concurrent: 4 lowered to 3: 4 trials of 2 CPUs each would leave no CPU of the "
        "cluster's 8 for reading data"
    )
    assert trial_concurrency(spec.model_copy(update={"max_concurrent": 3}), LAPTOP[0]) == (3, None)


def test_a_trial_holds_its_driver_cpu_only_beside_train_workers() -> None:
    """A one-worker trial trains in its Tune process (its worker's CPUs); a multi-worker one
    holds 1 CPU for its driver beside its Train workers."""
    assert trial_cpus(ResourcesSpec(workers=1, cpus_per_worker=1)) == 1
    assert trial_resources(ResourcesSpec(workers=1, cpus_per_worker=2, gpus_per_worker=1)) == {
        "cpu": 2,
        "gpu": 1,
    }
    two = ResourcesSpec(workers=2, cpus_per_worker=1)
    assert trial_cpus(two) == TRIAL_DRIVER_CPUS + 2
    assert trial_resources(two) is None


def test_max_concurrent_is_kept_where_an_autoscaler_adds_nodes() -> None:
    spec = load_space(SPACES[0]).model_copy(update={"max_concurrent": 16})
    assert trial_concurrency(spec, LAPTOP[0], can_grow=True) == (16, None)
