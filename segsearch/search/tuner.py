"""The search as Tune runs it: Optuna samples trials, ASHA stops the weak, state is saved for
`--resume`, and the results become one SearchResult (each trial itself: `trial.py`)."""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from segsearch.config import TrialConfig
from segsearch.data.fingerprint import dataset_fingerprint
from segsearch.data.format import DatasetInfo
from segsearch.data.shards import OpenedDataset, open_dataset
from segsearch.data.trial_data import SearchData
from segsearch.errors import UserError, last_line, user_error_in
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri
from segsearch.search.capacity import TRIAL_DRIVER_CPUS, check_capacity
from segsearch.search.placement import ReleasePlacementGroups
from segsearch.search.progress import TrialProgress, format_table, print_line
from segsearch.search.trial import KeepTrialHistory, TrialContext, overlay_batch, run_trial
from segsearch.space import SearchSpec, nest, search_image_sizes
from segsearch.tracking import SearchTracker

#: Logical CPUs kept free for Ray Data's read and decode tasks when sizing concurrency.
DATA_CPU_RESERVE = 1.0
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
        with _StopSignalWatch() as stop_signal:
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
    if stop_signal.seen or _interrupted(grid, spec):
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

    data = SearchData.build(dataset, image_sizes=search_image_sizes(spec))
    echo(data.describe())
    context = TrialContext(
        search_name=spec.name,
        dataset=dataset,
        storage=storage,
        epochs=spec.epochs,
        resources=spec.resources,
        data=data,
        overlay=overlay_batch(dataset),
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


class _StopSignalWatch(logging.Handler):
    """Notes Tune's own "Stop signal received" warning during `fit()`.

    Tune catches Ctrl-C itself and returns normally; its trials may then all look finished (a
    single running trial is marked TERMINATED), so the warning is the one sure sign. The logger
    is taken at WARNING level without passing the record on, so nothing more is printed.
    """

    LOGGER = "ray.tune.tune"

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen = False
        self._logger = logging.getLogger(self.LOGGER)
        self._saved = (self._logger.level, self._logger.propagate)

    def emit(self, record: logging.LogRecord) -> None:
        if "Stop signal received" in record.getMessage():
            self.seen = True

    def __enter__(self) -> _StopSignalWatch:
        self._logger.setLevel(logging.WARNING)
        self._logger.propagate = False
        self._logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._logger.removeHandler(self)
        self._logger.setLevel(self._saved[0])
        self._logger.propagate = self._saved[1]


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

    from segsearch.search.capacity import can_add_nodes

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
