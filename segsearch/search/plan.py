"""`segsearch search --dry-run`: everything a search checks before it starts, and what it would
run, without running it: no trial, no MLflow run, no Tune state, nothing written.

The space is sampled as the search's own sampler starts (same kind, same seed), each sampled
trial's model, loss and augmentation are built (`check_trial_configs`), the dataset's shards are
opened and counted, the tracking server asked for /health. The resource plan comes from the
cluster the search would use: a given `--address` (or $RAY_ADDRESS) is joined to read its
resources; the local default is the Ray segsearch would start (LOCAL_NUM_CPUS logical CPUs and
the GPUs torch sees), so no local Ray is started for it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

from segsearch.errors import UserError
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri, without_password
from segsearch.space import SearchSpec

#: Sampled trial configs shown by --dry-run.
SHOWN_SAMPLES = 3


@dataclass(frozen=True)
class SearchPlan:
    """What a search would run, and on what."""

    name: str
    dataset: str
    splits: dict[str, int]
    classes: list[str]
    trials: int
    epochs: int
    metric: str
    mode: str
    sampler: str
    scheduler: str
    workers_per_trial: int
    cpus_per_trial: float
    """The trial's driver CPU plus its workers' CPUs."""
    gpus_per_trial: float
    trials_at_once: int
    cluster: str
    cluster_cpus: float
    cluster_gpus: float
    tracking_uri: str
    samples: list[dict[str, Any]]
    notice: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """The plan for people, a few lines."""
        splits = ", ".join(f"{name} {count}" for name, count in self.splits.items())
        lines = [
            f"search {self.name}: {self.trials} trials × {self.epochs} epochs, {self.metric} "
            f"({self.mode}), sampler {self.sampler}, scheduler {self.scheduler}",
            f"dataset {self.dataset}: {splits} images, classes {', '.join(self.classes)}",
            f"tracking: {self.tracking_uri}",
            f"per trial: {self.workers_per_trial} worker(s), {self.cpus_per_trial:g} CPUs "
            f"(1 for its driver), {self.gpus_per_trial:g} GPUs",
            f"cluster: {self.cluster} ({self.cluster_cpus:g} CPUs, {self.cluster_gpus:g} GPUs): "
            f"{self.trials_at_once} trial(s) at once",
        ]
        if self.notice:
            lines.append(f"note: {self.notice}")
        lines.append(f"first {len(self.samples)} sampled configs:")
        for index, sample in enumerate(self.samples, 1):
            lines.append(f"  {index}. " + " ".join(f"{k}={v}" for k, v in sample.items()))
        return "\n".join(lines)


def plan_search(
    spec: SearchSpec,
    *,
    dataset: str,
    address: str | None = None,
    tracking_uri: str | None = None,
    samples: int = SHOWN_SAMPLES,
) -> SearchPlan:
    """Check the space, dataset, tracking server and cluster as a search would; say what it
    would run. Raises what the search would raise."""
    from segsearch.data.shards import open_dataset
    from segsearch.search.capacity import trial_cpus
    from segsearch.search.tuner import absolute_uri, check_trial_configs, trial_concurrency

    dataset = absolute_uri(dataset)
    info = open_dataset(dataset).info
    check_trial_configs(spec, info)
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri)
    cluster, total, can_grow = _cluster(spec, address or os.environ.get("RAY_ADDRESS"))
    at_once, notice = trial_concurrency(spec, total, can_grow=can_grow)
    res = spec.resources
    return SearchPlan(
        name=spec.name,
        dataset=dataset,
        splits=dict(info.splits),
        classes=list(info.classes),
        trials=spec.trials,
        epochs=spec.epochs,
        metric=spec.metric,
        mode=spec.mode,
        sampler=spec.sampler.kind,
        scheduler=spec.scheduler.kind,
        workers_per_trial=res.workers,
        cpus_per_trial=trial_cpus(res),
        gpus_per_trial=res.workers * res.gpus_per_worker,
        trials_at_once=min(at_once, spec.trials),
        cluster=cluster,
        cluster_cpus=total.get("CPU", 0.0),
        cluster_gpus=total.get("GPU", 0.0),
        tracking_uri=without_password(uri),
        samples=sample_configs(spec, samples),
        notice=notice,
    )


def sample_configs(spec: SearchSpec, count: int) -> list[dict[str, Any]]:
    """The first `count` parameter sets the space's sampler draws (fixed values left out)."""
    import optuna

    sampler = (
        optuna.samplers.RandomSampler(seed=spec.sampler.seed)
        if spec.sampler.kind == "random"
        else optuna.samplers.TPESampler(seed=spec.sampler.seed)
    )
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(sampler=sampler, direction=_direction(spec))
        drawn = []
        for _ in range(count):
            trial = study.ask()
            spec.define_by_run(trial)
            drawn.append(dict(trial.params))
    finally:
        optuna.logging.set_verbosity(verbosity)
    return drawn


def _direction(spec: SearchSpec) -> str:
    return "maximize" if spec.mode == "max" else "minimize"


def _cluster(spec: SearchSpec, address: str | None) -> tuple[str, dict[str, float], bool]:
    """(description, total resources, whether an autoscaler adds nodes) of the cluster a search
    would use; UserError when no trial could ever be placed on it."""
    if address:
        import ray

        from segsearch.ray_setup import init_ray, quiet_ray
        from segsearch.search.capacity import can_add_nodes, check_capacity

        quiet_ray()
        init_ray(address)
        check_capacity(spec.resources)
        total = {key: float(value) for key, value in ray.cluster_resources().items()}
        return f"Ray cluster at {address}", total, can_add_nodes()
    from segsearch.ray_setup import LOCAL_NUM_CPUS
    from segsearch.search.capacity import capacity_problem

    total = {"CPU": float(LOCAL_NUM_CPUS), "GPU": float(_local_gpus())}
    problem = capacity_problem(spec.resources, live=[total])
    if problem:
        raise UserError(problem)
    return "local Ray (started by the search)", total, False


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
