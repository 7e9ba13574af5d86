"""The search: Optuna in Ray Tune, ASHA early stopping, and a Ray Train job per trial."""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.tune import Callback

from segsearch.capacity import TRIAL_DRIVER_CPUS, check_capacity
from segsearch.config import TrialConfig
from segsearch.data.fingerprint import dataset_fingerprint
from segsearch.data.format import DatasetInfo
from segsearch.data.shards import OpenedDataset, open_dataset
from segsearch.errors import UserError, last_line, user_error_in
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri
from segsearch.progress import TrialProgress, format_table, print_line
from segsearch.space import ResourcesSpec, SearchSpec, nest
from segsearch.tracking import SearchTracker

#: Logical CPUs kept free for Ray Data's read and decode tasks when sizing concurrency.
DATA_CPU_RESERVE = 1.0
#: Validation images drawn in each trial's overlay picture.
OVERLAY_IMAGES = 4
#: Times run_trial starts a failed Train run again (from its last checkpoint); a UserError (bad
#: data found mid-trial) is never retried.
TRAIN_RETRIES = 1
#: Seconds between Tune's saves of the search state (trials, searcher) to storage, instead of
#: its adaptive 10 s or more: a trial started after the last save is lost with a killed driver
#: (its run is then ended as lost on resume). A save writes a few small files; an upload starts
#: only when the previous one is done.
STATE_SAVE_PERIOD_S = 1


class SearchInterrupted(Exception):
    """The search was interrupted (Ctrl-C); its state is saved and `--resume` continues it."""

    def __init__(self, name: str, experiment_path: str) -> None:
        super().__init__(f"search {name!r} interrupted; its state is in {experiment_path}")
        self.name = name
        self.experiment_path = experiment_path


#: A trial's result history as Tune writes it in the trial's folder.
TRIAL_HISTORY_FILES = ("result.json", "progress.csv")


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares; shipped once through the object store."""

    search_name: str
    dataset: OpenedDataset
    storage: str
    epochs: int
    resources: ResourcesSpec
    overlay: dict[str, list[np.ndarray]] = field(default_factory=dict)


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search: the best trial and a row per trial."""

    name: str
    metric: str
    mode: str
    best_trial_id: str | None
    best_metric: float | None
    best_config: dict[str, Any]
    best_checkpoint: str | None
    trials: list[dict[str, Any]]
    experiment_path: str

    @property
    def worst_metric(self) -> float | None:
        scores = [t[self.metric] for t in self.trials if t[self.metric] is not None]
        if not scores:
            return None
        return min(scores) if self.mode == "max" else max(scores)

    def table(self) -> str:
        return format_table(self.trials, metric=self.metric)


class ReleasePlacementGroups(Callback):
    """Frees the Train workers' placement group of a trial that Tune stopped (ASHA) or lost.

    Ray Train removes it through a cleaner actor that needs the state API (the dashboard); on a
    local instance without one, or beside another Ray instance, it never does, and the CPUs of
    every stopped trial stay reserved until later trials cannot start.
    """

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _release((trial.last_result or {}).get("placement_group"))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        _release((trial.last_result or {}).get("placement_group"))


class KeepTrialHistory(Callback):
    """Brings back a resumed trial's earlier results before Tune appends new ones to them.

    Tune appends every result to result.json and progress.csv in a staging folder on the driver
    and uploads that folder over the trial's folder in storage. A resumed search (a fresh Ray, or
    another machine) starts with an empty staging folder, so without this the upload replaced the
    trial's earlier epochs with the ones after the resume.
    """

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        import pyarrow.fs

        trial.init_local_path()
        filesystem = trial.storage.storage_filesystem
        for name in TRIAL_HISTORY_FILES:
            local = Path(trial.local_path, name)
            remote = f"{trial.storage.trial_fs_path}/{name}"
            try:
                stored = filesystem.get_file_info(remote).type == pyarrow.fs.FileType.File
                if stored and not local.exists():
                    pyarrow.fs.copy_files(remote, str(local), source_filesystem=filesystem)
            except OSError as err:  # storage unreachable: say so, and let the search go on
                print_line(f"warning: trial {trial.trial_id}: earlier {name} not restored ({err})")


def _release(group_id: str | None) -> None:
    from ray.util.placement_group import (
        PlacementGroup,
        placement_group_table,
        remove_placement_group,
    )

    if group_id and placement_group_table().get(group_id, {}).get("state") == "CREATED":
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(group_id))))


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune's trainable: run one trial as a Ray Train job and let TuneReportCallback relay it.

    A failed Train run starts again from its last checkpoint (same run name), at most
    TRAIN_RETRIES times; a failure caused by a UserError (bad data met mid-trial) is raised at
    once as that one line, since running it again would meet the same data.
    """
    import ray.tune
    from ray.train import TrainingFailedError

    trial = TrialConfig.from_dict({**nest(config), "epochs": context.epochs})
    trial_id = ray.tune.get_context().get_trial_id()
    for attempt in range(TRAIN_RETRIES + 1):
        try:
            _trainer(trial, trial_id, context).fit()
            return
        except TrainingFailedError as err:
            found = user_error_in(err)
            if found is not None:
                raise UserError(str(found)) from None
            if attempt == TRAIN_RETRIES:
                raise


def _trainer(trial: TrialConfig, trial_id: str, context: TrialContext) -> Any:
    """The trial's TorchTrainer; named after the trial, so a new one resumes the same run."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from segsearch.data.ray_data import load_splits
    from segsearch.train import train_loop_per_worker

    datasets = load_splits(context.dataset, image_size=trial.image_size)
    wanted = context.resources
    resources = {"CPU": wanted.cpus_per_worker}
    if wanted.gpus_per_worker:
        resources["GPU"] = wanted.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": trial,
            "dataset": context.dataset.uri,
            "dataset_info": context.dataset.info,
            "overlay": _overlay_at(context.overlay, trial.image_size),
            "launched_at": time.time(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=wanted.workers,
            use_gpu=wanted.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=f"{context.storage.rstrip('/')}/{context.search_name}-train",
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[TuneReportCallback()],
        ),
    )


def run_search(
    spec: SearchSpec,
    *,
    dataset: str,
    storage: str | None = None,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    space_path: str | Path | None = None,
    echo: Callable[[str], None] = print_line,
) -> SearchResult:
    """Run (or resume) a search described by `spec` over the dataset at `dataset`.

    Everything a user can get wrong (space, dataset, storage, tracking server, resources the
    cluster cannot give) is checked before anything is written. Every trial is tracked in MLflow
    (`tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db) under an experiment
    named after the search. Raises SearchInterrupted after Ctrl-C (runs marked KILLED); any
    error after the parent run opened ends it as FAILED, and a UserError stays one line.
    """
    from segsearch.ray_setup import init_ray, quiet_ray

    quiet_ray()
    dataset = absolute_uri(dataset)
    opened = open_dataset(dataset)
    info = opened.info
    check_trial_configs(spec, info)
    storage = resolve_storage(storage)
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    can_restore = _can_restore(experiment_path, resume=resume, name=spec.name)
    check_tracking_server(resolve_tracking_uri(tracking_uri))
    init_ray(address)
    check_capacity(spec.resources)
    tracker = SearchTracker.start(
        tracking_uri=tracking_uri,
        search_name=spec.name,
        space_path=space_path,
        dataset_uri=dataset,
        dataset_info=info,
        dataset_fingerprint=dataset_fingerprint(dataset, info.splits),
        settings=_settings(spec),
        epochs=spec.epochs,
    )
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_SAVE_PERIOD_S))
    try:
        tuner = _tuner(spec, opened, storage, tracker, restore=can_restore, echo=echo)
        grid = tuner.fit()
    except KeyboardInterrupt:
        tracker.interrupted()
        raise SearchInterrupted(spec.name, experiment_path) from None
    except BaseException as err:
        tracker.failed(last_line(err))
        found = user_error_in(err)
        if found is not None:
            raise UserError(str(found)) from None
        raise
    if _interrupted(grid, spec):
        tracker.interrupted()
        raise SearchInterrupted(spec.name, experiment_path)
    summary = tracker.finish(grid, metric=spec.metric, mode=spec.mode)
    echo(f"MLflow: experiment {spec.name!r}, search run {summary.parent_run_id}")
    return _summarize(grid, spec, experiment_path)


def _tuner(
    spec: SearchSpec,
    dataset: OpenedDataset,
    storage: str,
    tracker: SearchTracker,
    *,
    restore: bool,
    echo: Callable[[str], None],
) -> Any:
    """The Tuner of a new search, or of the earlier one restored.

    Tune itself does not retry a failed trial (`max_failures=0`): run_trial already starts a
    failed Train run again from its checkpoint, unless the failure is bad input; an errored
    trial is retried by `--resume`.
    """
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    context = TrialContext(
        search_name=spec.name,
        dataset=dataset,
        storage=storage,
        epochs=spec.epochs,
        resources=spec.resources,
        overlay=_overlay_batch(dataset),
    )
    trainable = ray.tune.with_parameters(run_trial, context=context)
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    if restore:
        echo(f"resuming search {spec.name!r} from {experiment_path}")
        return ray.tune.Tuner.restore(
            experiment_path, trainable=trainable, resume_unfinished=True, resume_errored=True
        )
    scheduler = (
        ASHAScheduler(
            time_attr="training_iteration",
            max_t=spec.epochs,
            grace_period=min(spec.scheduler.grace_period, spec.epochs),
            reduction_factor=spec.scheduler.reduction_factor,
        )
        if spec.scheduler.kind == "asha"
        else FIFOScheduler()
    )
    return ray.tune.Tuner(
        trainable,
        tune_config=ray.tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=OptunaSearch(
                space=spec.define_by_run, metric=spec.metric, mode=spec.mode, sampler=_sampler(spec)
            ),
            scheduler=scheduler,
            num_samples=spec.trials,
            max_concurrent_trials=_concurrency(spec, echo),
        ),
        run_config=ray.tune.RunConfig(
            name=spec.name,
            storage_path=storage,
            failure_config=ray.tune.FailureConfig(max_failures=0),
            callbacks=[
                TrialProgress(metric=spec.metric, epochs=spec.epochs, echo=echo),
                tracker.tune_callback(),
                ReleasePlacementGroups(),
                KeepTrialHistory(),
            ],
            verbose=0,
        ),
    )


def _interrupted(grid: Any, spec: SearchSpec) -> bool:
    """Whether Tune returned early: it catches Ctrl-C itself, saves its state and returns the
    trials so far, some still unfinished (or fewer than asked)."""
    trials = grid._experiment_analysis.trials
    unfinished = [t for t in trials if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(trials) < spec.trials


def _can_restore(experiment_path: str, *, resume: bool, name: str) -> bool:
    """Whether to continue an earlier search; a name already used needs --resume."""
    import ray.tune

    exists = ray.tune.Tuner.can_restore(experiment_path)
    if exists and not resume:
        raise UserError(
            f"a search named {name!r} already exists at {experiment_path}; "
            "pass --resume to continue it or choose another --name"
        )
    return exists


def _settings(spec: SearchSpec) -> dict[str, Any]:
    """The search-level settings recorded on the MLflow parent run."""
    return {
        "metric": spec.metric,
        "mode": spec.mode,
        "trials": spec.trials,
        "sampler": spec.sampler.model_dump(),
        "scheduler": spec.scheduler.model_dump(),
        "resources": spec.resources.model_dump(),
    }


def check_trial_configs(spec: SearchSpec, info: DatasetInfo, *, samples: int = 16) -> None:
    """Sample the space without Ray and build each trial's parts, so bad values fail up front."""
    import optuna

    from segsearch.data.augment import build_augment
    from segsearch.losses import build_loss
    from segsearch.models import build_model

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(samples):
        ot_trial = study.ask()
        constants = spec.define_by_run(ot_trial)
        trial = TrialConfig.from_dict(nest({**ot_trial.params, **constants}))
        build_model(trial.model, in_channels=info.channels, num_classes=info.num_classes)
        build_loss(
            trial.loss,
            num_classes=info.num_classes,
            ignore_index=info.ignore_index,
            class_pixel_counts=info.class_pixel_counts,
        )
        build_augment(trial.aug, ignore_index=info.ignore_index)
        study.tell(ot_trial, 0.0)


def _concurrency(spec: SearchSpec, echo: Callable[[str], None]) -> int:
    """Trials at once on the connected cluster, saying so when the space's max_concurrent is
    lowered."""
    import ray

    from segsearch.capacity import can_add_nodes

    trials, notice = trial_concurrency(spec, ray.cluster_resources(), can_grow=can_add_nodes())
    if notice:
        echo(f"warning: {notice}")
    return trials


def trial_concurrency(
    spec: SearchSpec, total: dict[str, float], *, can_grow: bool = False
) -> tuple[int, str | None]:
    """(trials at once, a notice when the space's max_concurrent was lowered).

    A max_concurrent above what fits (`concurrency_for`) would let trials take every CPU, and
    Ray Data's read tasks, which wait for a free share of one, would never run: the search hangs
    without a word. Where an autoscaler adds nodes, the space's value stands.
    """
    fit = concurrency_for(spec, total)
    asked = spec.max_concurrent
    if asked is None:
        return fit, None
    if can_grow or asked <= fit:
        return asked, None
    res = spec.resources
    if res.gpus_per_worker > 0:
        why = f"{asked} trials need more GPUs than the cluster's {total.get('GPU', 0):g}"
    else:
        per_trial = TRIAL_DRIVER_CPUS + res.workers * res.cpus_per_worker
        why = (
            f"{asked} trials of {per_trial:g} CPUs each would leave no CPU of the cluster's "
            f"{total.get('CPU', 0):g} for reading data"
        )
    return fit, f"max_concurrent: {asked} lowered to {fit}: {why}"


def concurrency_for(spec: SearchSpec, total: dict[str, float]) -> int:
    """Trials that fit at once: by GPUs when trials use them, else by CPUs less Ray Data's share."""
    res = spec.resources
    if res.gpus_per_worker > 0:
        fit = total.get("GPU", 0) / (res.workers * res.gpus_per_worker)
    else:
        per_trial = TRIAL_DRIVER_CPUS + res.workers * res.cpus_per_worker
        fit = (total.get("CPU", 0) - DATA_CPU_RESERVE) / per_trial
    return max(1, math.floor(fit))


def absolute_uri(uri: str) -> str:
    """A local path made absolute (trials run in other working directories); URIs unchanged."""
    return uri if "://" in uri else str(Path(uri).expanduser().resolve())


def resolve_storage(storage: str | None) -> str:
    """Where Tune keeps its state and checkpoints: a local folder (made absolute) or s3://.

    A local folder is checked, not created: Tune makes it once the search starts, so a search
    that fails its checks leaves no empty folder behind.
    """
    storage = storage or os.environ.get("SEGSEARCH_STORAGE") or "segsearch-runs"
    if "://" in storage:
        return storage
    path = Path(storage).expanduser().resolve()
    check_writable(path)
    return str(path)


def check_writable(path: Path) -> None:
    """UserError unless `path` is, or can be made as, a writable folder (probed with a
    temporary file in its nearest existing folder, which is removed at once)."""
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(
            f"storage {path}: {existing} is a file, not a folder; pass another --storage"
        )
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise UserError(
            f"storage {path} is not writable ({existing}: {reason}); pass another --storage"
        ) from None


def _sampler(spec: SearchSpec) -> Any:
    import optuna

    if spec.sampler.kind == "random":
        return optuna.samplers.RandomSampler(seed=spec.sampler.seed)
    return optuna.samplers.TPESampler(seed=spec.sampler.seed)


def _overlay_batch(dataset: OpenedDataset) -> dict[str, list[np.ndarray]]:
    """A fixed handful of validation images (at their own size) every trial draws its overlay
    picture from, resized to the trial's own image_size (`_overlay_at`)."""
    from segsearch.data.ray_data import load_splits

    val = load_splits(dataset)["val"]
    try:
        batch = val.limit(OVERLAY_IMAGES).take_batch(OVERLAY_IMAGES, batch_format="numpy")
    except Exception as err:  # a shard that cannot be read or decoded: the data's fault
        reason = last_line(err)
        raise UserError(f"reading the val split of {dataset.uri} failed: {reason}") from None
    return {"image": list(batch["image"]), "mask": list(batch["mask"])}


def _overlay_at(
    overlay: dict[str, list[np.ndarray]], image_size: tuple[int, int] | None
) -> dict[str, np.ndarray]:
    """The overlay images and masks as one batch at the trial's image size (the first image's
    size when the trial trains at each image's own size)."""
    from segsearch.data.ray_data import resize_pair

    if not overlay:
        return {}
    images, masks = overlay["image"], overlay["mask"]
    size = image_size or images[0].shape[:2]
    pairs = [resize_pair(image, mask, size) for image, mask in zip(images, masks, strict=True)]
    return {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs])}


def _summarize(grid: Any, spec: SearchSpec, experiment_path: str) -> SearchResult:
    rows = []
    for result in grid:
        metrics = result.metrics or {}
        score = metrics.get(spec.metric)
        history = result.metrics_dataframe
        rows.append(
            {
                "trial_id": metrics.get("trial_id", "?"),
                spec.metric: None if score is None or math.isnan(score) else float(score),
                "epochs": metrics.get("training_iteration", 0),
                "config": result.config or {},
                "checkpoint": metrics.get("checkpoint_path"),
                "error": last_line(result.error) if result.error else None,
                "history": [] if history is None else history.to_dict("records"),
            }
        )
    sign = -1 if spec.mode == "max" else 1
    rows.sort(key=lambda r: math.inf if r[spec.metric] is None else sign * r[spec.metric])
    best = rows[0] if rows and rows[0][spec.metric] is not None else None
    return SearchResult(
        name=spec.name,
        metric=spec.metric,
        mode=spec.mode,
        best_trial_id=best["trial_id"] if best else None,
        best_metric=best[spec.metric] if best else None,
        best_config=nest(best["config"]) if best else {},
        best_checkpoint=best["checkpoint"] if best else None,
        trials=rows,
        experiment_path=experiment_path,
    )
