"""Whether one trial can ever be placed on the cluster, checked before any trial starts.

Ray Train waits for its workers' resources and retries its start-up timeout without end, so a
space that asks for a GPU on a machine without one would hang the search silently. One trial
with one worker trains in its Tune trial's own process, which holds that worker's resources; a
multi-worker trial needs 1 CPU for its Tune driver plus `workers` bundles of (cpus_per_worker,
gpus_per_worker), each bundle on one node. Either needs a share of a CPU beside it for its data
stream. Node shapes come from
the live nodes and, where an autoscaler has reported its node types to the GCS (autoscaler v2,
KubeRay), from those types too. An autoscaler that reports nothing (for example the v1 cluster
launcher) is declared with SEGSEARCH_AUTOSCALING=1, which skips the check.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

from segsearch.data.ray_data import DATA_CPUS
from segsearch.errors import UserError
from segsearch.space import ResourcesSpec

AUTOSCALING_ENV = "SEGSEARCH_AUTOSCALING"
#: The CPU each multi-worker Tune trial's driver function holds beside its Train workers.
TRIAL_DRIVER_CPUS = 1.0

Shape = dict[str, float]


def in_trial_process(resources: ResourcesSpec) -> bool:
    """Whether a trial trains in its Tune trial's own process (one worker), not in Train's."""
    return resources.workers == 1


def trial_cpus(resources: ResourcesSpec) -> float:
    """Logical CPUs one trial holds: its worker's in its own process, or its driver's and its
    Train workers'."""
    if in_trial_process(resources):
        return resources.cpus_per_worker
    return TRIAL_DRIVER_CPUS + resources.workers * resources.cpus_per_worker


def trial_resources(resources: ResourcesSpec) -> dict[str, float] | None:
    """What a one-worker Tune trial asks for (its worker's CPUs and GPUs); None for a
    multi-worker trial, whose driver keeps Tune's default of 1 CPU."""
    if not in_trial_process(resources):
        return None
    return {"cpu": resources.cpus_per_worker, "gpu": resources.gpus_per_worker}


def check_capacity(resources: ResourcesSpec) -> None:
    """UserError (one line: what the space asks, what the cluster has, what to change) when no
    trial could ever start on the connected Ray cluster."""
    if os.environ.get(AUTOSCALING_ENV) == "1":
        return
    live, addable = cluster_shapes()
    problem = capacity_problem(resources, live=live, addable=addable)
    if problem:
        raise UserError(problem)


def can_add_nodes() -> bool:
    """Whether an autoscaler can add nodes to the connected cluster (declared or reported)."""
    return os.environ.get(AUTOSCALING_ENV) == "1" or bool(_autoscaler_node_types())


def cluster_shapes() -> tuple[list[Shape], list[Shape]]:
    """(total resources of each live node, resources of each node type an autoscaler can add)."""
    import ray

    live = [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]
    return live, _autoscaler_node_types()


def _autoscaler_node_types() -> list[Shape]:
    """Node types from the autoscaler's cluster config in the GCS (what Ray Data reads too)."""
    try:
        from ray._private.state import state

        config = state.get_cluster_config()
    except Exception:  # an older GCS or no autoscaler: nothing reported
        return []
    if config is None:
        return []
    return [
        {key: float(value) for key, value in group.resources.items()}
        for group in config.node_group_configs
        if group.max_count != 0 and group.resources
    ]


def capacity_problem(
    resources: ResourcesSpec, *, live: Sequence[Shape], addable: Sequence[Shape] = ()
) -> str | None:
    """Why one trial of `resources` can never be placed, or None when it can."""
    cpus, gpus = resources.cpus_per_worker, resources.gpus_per_worker
    shapes = [*live, *addable]
    asked = _amount(cpus, "CPU") + (f" and {_amount(gpus, 'GPU')}" if gpus else "")
    if gpus and not any(shape.get("GPU", 0) > 0 for shape in shapes):
        return (
            f"the space asks {_amount(gpus, 'GPU')} per worker; this cluster has no GPU: set "
            "resources.gpus_per_worker: 0 or run on a GPU cluster"
        )
    if not any(_fits(shape, cpus, gpus) for shape in shapes):
        largest = max(shapes, key=lambda s: (s.get("GPU", 0), s.get("CPU", 0)), default={})
        has = _amount(largest.get("CPU", 0), "CPU")
        if gpus:
            has += f" and {_amount(largest.get('GPU', 0), 'GPU')}"
        return (
            f"the space asks {asked} per worker; the largest node has {has}: lower "
            "resources.cpus_per_worker / gpus_per_worker or add larger nodes"
        )
    if addable:
        return None  # the autoscaler adds nodes of a shape that fits a worker
    placed = sum(_workers_on(shape, cpus, gpus) for shape in live)
    total_cpus = sum(shape.get("CPU", 0) for shape in live)
    need_cpus = trial_cpus(resources) + DATA_CPUS
    if placed < resources.workers or total_cpus < need_cpus:
        driver = (
            ""
            if in_trial_process(resources)
            else f" plus {_amount(TRIAL_DRIVER_CPUS, 'CPU')} for its driver"
        )
        return (
            f"one trial needs {resources.workers} worker(s) of {asked}{driver} and "
            f"{DATA_CPUS:g} for reading data; this cluster has "
            f"{_amount(total_cpus, 'CPU')} and room for {placed} such worker(s): lower "
            "resources.workers / cpus_per_worker or use a larger cluster"
        )
    return None


def _fits(shape: Shape, cpus: float, gpus: float) -> bool:
    return shape.get("CPU", 0) >= cpus and shape.get("GPU", 0) >= gpus


def _workers_on(shape: Shape, cpus: float, gpus: float) -> int:
    counts = [math.floor(shape.get("CPU", 0) / cpus)]
    if gpus:
        counts.append(math.floor(shape.get("GPU", 0) / gpus))
    return min(counts)


def _amount(value: float, unit: str) -> str:
    return f"{value:g} {unit}" + ("" if value == 1 else "s")
