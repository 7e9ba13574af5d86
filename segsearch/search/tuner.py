"""The search as Tune runs it: Optuna samples trials, ASHA stops the weak, state is saved for
`--resume`, and the results become one SearchResult (each trial itself: `trial.py`)."""

from __future__ import annotations

import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray

from segsearch.config import TrialConfig
from segsearch.data.fingerprint import dataset_fingerprint
from segsearch.data.format import DatasetInfo
from segsearch.data.shards import OpenedDataset, open_dataset
from segsearch.data.storage import filesystem_for, join, storage_errors
from segsearch.data.trial_data import SearchData
from segsearch.errors import UserError, last_line, user_error_in
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri, without_password
from segsearch.search.budget import (
    BudgetReport,
    Ledger,
    budget_report,
    budgeted,
    forget_ledger,
    ledger_in,
    ledger_of,
    resumed_budget,
    total_cost,
    with_costs,
)
from segsearch.search.capacity import check_capacity, trial_cpus
from segsearch.search.epochs import trial_rows
from segsearch.search.pareto import ParetoFront
from segsearch.search.progress import format_table, print_line
from segsearch.search.refit import (
    Compute,
    checkpoint_uri,
    chosen_refit,
    evaluate_on_test,
    refit_path,
    refit_phase,
    refit_rows,
    refit_starts,
    refit_tuner,
    spent,
    training_images,
)
from segsearch.search.scheduler import trial_scheduler
from segsearch.search.study import (
    StudySearch,
    check_new_study,
    load_study,
    registered,
    resolve_study_storage,
)
from segsearch.search.trial import (
    TrialContext,
    overlay_batch,
    run_config,
    trainable,
)
from segsearch.search.warm_start import warm_start_points
from segsearch.space import (
    BudgetSpec,
    SearchSpec,
    check_budget,
    enqueued_points,
    nest,
    search_image_sizes,
)
from segsearch.tracking import SearchTracker

#: The parent run's tag that says how the search went against its budget.
BUDGET_TAG = "segsearch.budget"
#: Logical CPUs kept free for Ray Data's read and decode tasks when sizing concurrency.
DATA_CPU_RESERVE = 1.0
#: Seconds between Tune's saves of the search state (trials, searcher) to storage, instead of
#: its adaptive 10 s or more: a trial started after the last save is lost with a killed driver
#: (its run is then ended as lost on resume). A save writes a few small files; an upload starts
#: only when the previous one is done.
STATE_SAVE_PERIOD_S = 1
#: The budget a search last resumed with, beside Tune's state (its tuner.pkl keeps the first).
BUDGET_FILE = "segsearch-budget.json"
#: What --dashboard prints when Ray runs no dashboard this process can name.
_NO_DASHBOARD = "none (Ray was already running in this process, or the cluster runs none)"
#: Ray 2.60 guards its dashboard with a token by default; the token itself is never printed.
_DASHBOARD_TOKEN = "it asks for Ray's token when auth is on: `ray get-auth-token` prints it"


class SearchInterrupted(Exception):
    """The search was interrupted (Ctrl-C); its state is saved and `--resume` continues it."""

    def __init__(self, name: str, experiment_path: str) -> None:
        super().__init__(f"search {name!r} interrupted; its state is in {experiment_path}")
        self.name = name
        self.experiment_path = experiment_path


@dataclass(frozen=True)
class SearchResult:
    """The outcome of a search: the best trial and a row per trial (scored by its best epoch);
    with a refit, a row per refit trial; the compute spent; the final model's test scores."""

    name: str
    metric: str
    mode: str
    best_trial_id: str | None
    best_metric: float | None
    best_config: dict[str, Any]
    best_checkpoint: str | None
    trials: list[dict[str, Any]]
    experiment_path: str
    refit: list[dict[str, Any]] = field(default_factory=list)
    compute: Compute | None = None
    budget: BudgetReport | None = None
    test: Any = None  # segsearch.serve.evaluate.Evaluation of the final model, if scored
    pareto: ParetoFront | None = None  # a multi-objective search's front

    @property
    def final(self) -> dict[str, Any] | None:
        """The row of the model the search ends with: its chosen refit's, else its best
        trial's (the first row, when it has a score)."""
        return chosen_refit(self.refit) or (self.trials[0] if self.best_trial_id else None)

    @property
    def final_checkpoint(self) -> str | None:
        return self.final["checkpoint"] if self.final else None

    @property
    def worst_metric(self) -> float | None:
        scores = [t[self.metric] for t in self.trials if t[self.metric] is not None]
        if not scores:
            return None
        return min(scores) if self.mode == "max" else max(scores)

    def table(self) -> str:
        table = format_table(self.trials, metric=self.metric)
        if self.refit:
            table += "\n\nrefit:\n" + format_table(self.refit, metric=self.metric)
        if self.pareto is not None:
            table += "\n\n" + self.pareto.describe()
        return table

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (`segsearch search --json`): every trial but its history."""
        fields = ("name", "metric", "mode", "best_trial_id", "best_metric", "best_config")
        data = {name: getattr(self, name) for name in fields}
        data["best_checkpoint"] = self.best_checkpoint
        data["experiment_path"] = self.experiment_path
        data["trials"] = [{k: v for k, v in t.items() if k != "history"} for t in self.trials]
        data["budget"] = self.budget.to_dict() if self.budget else None
        if self.pareto is not None:
            data.update(self.pareto.to_dict())
        return data

    def to_dataframe(self, *, history: bool = False) -> Any:
        """The trials as a pandas DataFrame: a row per trial (id, score or each objective,
        epochs, error, checkpoint, a column per parameter), or with `history` a row per trial
        and epoch."""
        import pandas as pd

        if history:
            return pd.DataFrame(
                [{"trial_id": t["trial_id"], **row} for t in self.trials for row in t["history"]]
            )
        scores = list(self.pareto.objectives) if self.pareto else [self.metric]
        columns = ("trial_id", *scores, "epochs", "error", "checkpoint")
        return pd.DataFrame([{**{c: t[c] for c in columns}, **t["config"]} for t in self.trials])


def run_search(
    spec: SearchSpec,
    *,
    dataset: str,
    storage: str | None = None,
    resume: bool = False,
    address: str | None = None,
    tracking_uri: str | None = None,
    space_path: str | Path | None = None,
    optuna_storage: str | None = None,
    dashboard: bool = False,
    echo: Callable[[str], None] = print_line,
) -> SearchResult:
    """Run (or resume) a search described by `spec` over the dataset at `dataset`.

    Everything a user can get wrong (space, dataset, storage, tracking server, resources the
    cluster cannot give) is checked before anything is written. Every trial is tracked in MLflow
    (`tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db) under an experiment
    named after the search; its Optuna study, of the same name, is kept in `optuna_storage` (see
    `resolve_study_storage`). `dashboard` starts a local Ray with its dashboard and prints
    the URL (a joined cluster's, if it runs one). Raises SearchInterrupted after Ctrl-C (runs
    marked KILLED); any error after the parent run opened ends it as FAILED, and a UserError
    stays one line.
    """
    from segsearch.ray_setup import init_ray, quiet_ray

    quiet_ray()
    dataset = absolute_uri(dataset)
    opened = open_dataset(dataset)
    info = opened.info
    check_trial_configs(spec, info)
    check_budget(spec)
    storage = resolve_storage(storage)
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    can_restore = _can_restore(experiment_path, resume=resume, name=spec.name)
    restore_refit = spec.refit is not None and _can_restore(
        refit_path(storage, spec.name), resume=resume, name=spec.name
    )
    check_tracking_server(resolve_tracking_uri(tracking_uri))
    study_url = resolve_study_storage(
        optuna_storage, tracking_uri=resolve_tracking_uri(tracking_uri), storage=storage
    )
    if can_restore:
        spec = _resumed(spec, experiment_path, study_url, echo)
    points = [] if can_restore else _new_study(spec, study_url, tracking_uri, echo)
    url = init_ray(address, dashboard=dashboard)
    if dashboard:
        echo(
            f"Ray dashboard: {url} ({_DASHBOARD_TOKEN})"
            if url
            else f"Ray dashboard: {_NO_DASHBOARD}"
        )
    check_capacity(spec.resources)
    tracker = SearchTracker.start(
        tracking_uri=tracking_uri,
        search_name=spec.name,
        space_path=space_path,
        dataset_uri=dataset,
        dataset_info=info,
        dataset_fingerprint=dataset_fingerprint(dataset, info.splits),
        settings={**_settings(spec), "optuna_storage": without_password(study_url)},
        epochs=spec.epochs,
        metric=spec.metric,
    )
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", str(STATE_SAVE_PERIOD_S))
    # Built at the first Tuner (inside _fit, so a failure ends the search's run) and shared by
    # the refit: the data is decoded once for both.
    context = functools.cache(lambda: _trial_context(spec, opened, storage, echo))
    forget_ledger(spec.name)
    if spec.budget is not None:
        Ledger(spec.name, spec.budget, spec.resources, epochs=spec.epochs)
    with registered(spec.name, study_url):
        grid, wall_s = _fit(
            lambda: _tuner(
                spec, context(), tracker, study_url, points, restore=can_restore, echo=echo
            ),
            tracker,
            trials=spec.trials,
            interrupted=SearchInterrupted(spec.name, experiment_path),
            ledger=lambda: ledger_of(spec.name),
        )
    result = _summarize(grid, spec, storage, experiment_path)
    ledger = ledger_of(spec.name)
    if ledger is not None:
        result = _within_budget(result, ledger, requested=spec.trials)
        echo(result.budget.describe())
    image_epochs, worker_s = spent(
        result.trials, images=info.splits["train"], resources=spec.resources
    )
    compute = Compute(
        search_image_epochs=image_epochs,
        search_wall_s=wall_s,
        search_worker_s=worker_s,
        train_images=info.splits["train"],
    )
    refit_grid: Any = ()
    if spec.refit is not None:
        searched = (grid, result, compute)
        refit_grid, result, compute = _refit(
            spec, context(), tracker, searched, restore=restore_refit, echo=echo
        )
    refit = chosen_refit(result.refit)
    final = result.final
    evaluation = None
    if final is not None and final["checkpoint"]:
        try:
            evaluation = evaluate_on_test(final["checkpoint"], dataset, info, echo)
        except KeyboardInterrupt:
            tracker.interrupted()
            raise SearchInterrupted(spec.name, experiment_path) from None
    summary = tracker.finish(
        grid,
        metric=spec.metric,
        mode=spec.mode,
        refit=refit_grid,
        refit_choice=refit["trial_id"] if refit is not None else None,
        parent_metrics={**compute.metrics(), **_cost_metrics(result)},
        parent_tags={BUDGET_TAG: result.budget.describe()} if result.budget else None,
        evaluation=evaluation,
        evaluated_trial=final["trial_id"] if evaluation is not None else None,
        study=_finished_study(spec.name, study_url, echo),
        pareto=result.pareto,
    )
    echo(compute.describe())
    if refit is not None:
        echo(
            f"refit model: trial {refit['trial_id']} (refit of {refit['refit_of']}), "
            f"checkpoint {refit['checkpoint']}"
        )
    if evaluation is not None:
        echo(f"final model (trial {final['trial_id']}):\n{evaluation.table()}")
    echo(f"MLflow: experiment {spec.name!r}, search run {summary.parent_run_id}")
    return replace(result, compute=compute, test=evaluation)


def _fit(
    make_tuner: Callable[[], Any],
    tracker: SearchTracker,
    *,
    trials: int,
    interrupted: SearchInterrupted,
    ledger: Callable[[], Ledger | None] = lambda: None,
) -> tuple[Any, float]:
    """Run a Tuner to its end: (its ResultGrid, wall seconds). After Ctrl-C the tracker ends
    the search interrupted and `interrupted` is raised; any other error ends it FAILED, and a
    UserError stays one line. A search its budget (the `ledger` its Tuner used) stopped ran
    fewer trials than asked without being interrupted."""
    started = time.monotonic()
    try:
        tuner = make_tuner()
        with _StopSignalWatch() as stop_signal:
            grid = tuner.fit()
    except KeyboardInterrupt:
        tracker.interrupted()
        raise interrupted from None
    except BaseException as err:
        tracker.failed(last_line(err))
        found = user_error_in(err)
        if found is not None:  # of its own kind: ServiceUnavailable keeps its exit code
            raise type(found)(str(found)) from None
        raise
    spent = ledger()
    if stop_signal.seen or _interrupted(grid, 0 if spent and spent.stopped else trials):
        tracker.interrupted()
        raise interrupted
    return grid, time.monotonic() - started


def _refit(
    spec: SearchSpec,
    context: TrialContext,
    tracker: SearchTracker,
    searched: tuple[Any, SearchResult, Compute],
    *,
    restore: bool,
    echo: Callable[[str], None],
) -> tuple[Any, SearchResult, Compute]:
    """Train the search's top_k configurations again (spec.refit), given the search's
    (ResultGrid, SearchResult, Compute): the refit's ResultGrid, the result with the refit's
    rows, and the compute with the refit's."""
    assert spec.refit is not None
    search_grid, result, compute = searched
    phase = refit_phase(result.trials, spec.refit, spec.metric)
    if not phase.sources:
        echo("refit: skipped, no trial reported a score")
        return (), result, compute
    tracker.begin_refit(search_grid, phase)
    grid, wall_s = _fit(
        lambda: refit_tuner(
            phase,
            context,
            name=spec.name,
            storage=context.storage,
            tracker=tracker,
            concurrency=_concurrency(spec, echo),
            restore=restore,
            echo=echo,
            starts=refit_starts(result.trials, phase, spec.refit, context.storage),
        ),
        tracker,
        trials=len(phase.sources),
        interrupted=SearchInterrupted(spec.name, result.experiment_path),
    )
    rows = refit_rows(grid, phase, metric=spec.metric, mode=spec.mode)
    rows = with_costs(_with_uris(rows, context.storage), spec.resources)
    images = training_images(context.dataset.info, spec.refit.on)
    image_epochs, worker_s = spent(rows, images=images, resources=spec.resources)
    compute = replace(
        compute, refit_image_epochs=image_epochs, refit_wall_s=wall_s, refit_worker_s=worker_s
    )
    return grid, replace(result, refit=rows), compute


def _trial_context(
    spec: SearchSpec, dataset: OpenedDataset, storage: str, echo: Callable[[str], None]
) -> TrialContext:
    """What every trial of the search shares (a refit changes its epochs and splits), with the
    data decoded once for all of them when it fits (trial_data.py)."""
    data = SearchData.build(dataset, image_sizes=search_image_sizes(spec))
    echo(data.describe())
    return TrialContext(
        search_name=spec.name,
        dataset=dataset,
        storage=storage,
        epochs=spec.epochs,
        resources=spec.resources,
        data=data,
        overlay=overlay_batch(dataset),
        metric=spec.metric,
        mode=spec.mode,
        measure_cost=spec.measures_cost,
    )


def _finished_study(name: str, url: str, echo: Callable[[str], None]) -> Any:
    """The search's study, for the parent run's pictures (None, said, when it cannot be read)."""
    try:
        return load_study(name, url)
    except UserError as err:
        echo(f"warning: no Optuna pictures: {err}")
        return None


def _new_study(
    spec: SearchSpec, url: str, tracking_uri: str | None, echo: Callable[[str], None]
) -> list[dict[str, Any]]:
    """Check that a new search starts its own study; the configurations it tries first: the
    space's `enqueue:` ones, then the warm start's."""
    if spec.warm_start and spec.warm_start.search == spec.name:
        raise UserError(f"warm_start: {spec.name!r} is this search; name an earlier one")
    check_new_study(spec.name, url)
    shown = without_password(url)
    echo(f"Optuna: study {spec.name!r} in {shown} (watch it: optuna-dashboard {shown})")
    warm = warm_start_points(spec, url, tracking_uri=resolve_tracking_uri(tracking_uri), echo=echo)
    return [*enqueued_points(spec), *warm]


def _tuner(
    spec: SearchSpec,
    context: TrialContext,
    tracker: SearchTracker,
    study_url: str,
    points: list[dict[str, Any]],
    *,
    restore: bool,
    echo: Callable[[str], None],
) -> Any:
    """The Tuner of a new search, or of the earlier one restored.

    A multi-worker trial's failed Train run is started again from its checkpoint by run_trial,
    so Tune does not retry it; a one-worker trial trains in Tune's own process, so Tune retries
    it (`TUNE_RETRIES`), and it resumes from its checkpoint. Bad input is never retried (the
    retry fails at once with the first attempt's line); an errored trial is retried by
    `--resume`. Tune reuses a finished trial's process for the next trial (`reuse_actors`), so
    a one-worker trial finds torch and the training code already imported.
    """
    import ray.tune

    storage = context.storage
    function = trainable(context)
    ledger = ledger_of(spec.name)
    experiment_path = f"{storage.rstrip('/')}/{spec.name}"
    if restore:
        echo(f"resuming search {spec.name!r} from {experiment_path}")
        forget_ledger(spec.name)  # the restored Tuner brings its own ledger
        tuner = ray.tune.Tuner.restore(
            experiment_path, trainable=function, resume_unfinished=True, resume_errored=True
        )
        restored = ledger_of(spec.name)
        if restored is not None and spec.budget is not None:
            restored.apply(spec.budget)  # the budget it resumes with (`_resumed`)
            _keep_budget(experiment_path, spec.budget)
        return tuner
    search_alg: Any = StudySearch(spec=spec, url=study_url, points_to_evaluate=points)
    concurrency: int | None = _concurrency(spec, echo)
    if ledger is not None:  # limited inside the budget's generator
        search_alg, concurrency = budgeted(search_alg, ledger, concurrency=concurrency), None
    return ray.tune.Tuner(
        function,
        tune_config=ray.tune.TuneConfig(
            metric=spec.metric,
            mode=spec.mode,
            search_alg=search_alg,
            scheduler=trial_scheduler(spec),
            num_samples=spec.trials,
            max_concurrent_trials=concurrency,
            reuse_actors=True,
        ),
        run_config=run_config(
            spec.name,
            storage=storage,
            resources=spec.resources,
            metric=spec.metric,
            epochs=spec.epochs,
            tune_callback=tracker.tune_callback(),
            echo=echo,
            ledger=ledger,
        ),
    )


def _within_budget(result: SearchResult, ledger: Ledger, *, requested: int) -> SearchResult:
    """The result of a budgeted search: only the trials that ran (a trial the hard limit
    stopped before it started has nothing to show), and the budget's report."""
    ran = [row for row in result.trials if row["history"] or row["error"]]
    report = budget_report(ledger, ran, requested=requested)
    return replace(result, trials=ran, budget=report)


def _cost_metrics(result: SearchResult) -> dict[str, float]:
    """The parent run's `cost_*` (the search's trials) and `refit_cost_*`, and the budget's."""
    metrics = total_cost(result.trials)
    if result.refit:
        metrics |= {f"refit_{key}": value for key, value in total_cost(result.refit).items()}
    return metrics | (result.budget.metrics() if result.budget else {})


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


def _interrupted(grid: Any, trials: int) -> bool:
    """Whether Tune returned early: it catches Ctrl-C itself, saves its state and returns the
    trials so far, some still unfinished (or fewer than asked)."""
    started = grid._experiment_analysis.trials
    unfinished = [t for t in started if t.status not in ("TERMINATED", "ERROR")]
    return bool(unfinished) or len(started) < trials


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


def _resumed(
    spec: SearchSpec, experiment_path: str, study_url: str, echo: Callable[[str], None]
) -> SearchSpec:
    """The spec of a resumed search, with the budget it resumes under (`resumed_budget`):
    checked against the search's own before anything is written."""
    started = _started_budget(experiment_path, spec.name, study_url)
    budget = resumed_budget(spec.name, started, spec.budget)
    if started is not None and budget != started:
        echo(f"budget: {budget.describe()} from now on (was {started.describe()})")
    return spec.model_copy(update={"budget": budget})


def _started_budget(experiment_path: str, name: str, study_url: str) -> BudgetSpec | None:
    """The search's budget: the one it last resumed with (BUDGET_FILE), else the one in its
    saved Tuner (`tuner.pkl`, as Tuner.restore reads it); None when it has none."""
    import pyarrow.fs
    import ray.cloudpickle

    filesystem, path = filesystem_for(experiment_path)
    with storage_errors(experiment_path):
        with filesystem.open_input_file(join(path, "tuner.pkl")) as file:
            saved = file.readall()
        kept = filesystem.get_file_info(join(path, BUDGET_FILE))
        if kept.type == pyarrow.fs.FileType.File:
            with filesystem.open_input_file(kept.path) as file:
                return BudgetSpec.model_validate_json(file.readall())
    with registered(name, study_url):  # its searcher reopens the study (read only)
        state = ray.cloudpickle.loads(saved)
    forget_ledger(name)  # unpickling registered its ledger; the restored Tuner brings its own
    ledger = ledger_in(state["_tune_config"].search_alg)
    return ledger.budget if ledger is not None else None


def _keep_budget(experiment_path: str, budget: BudgetSpec) -> None:
    """Keep the budget a search resumes with, for its next resume (`_started_budget`)."""
    filesystem, path = filesystem_for(experiment_path)
    kept = join(path, BUDGET_FILE)
    with storage_errors(experiment_path), filesystem.open_output_stream(kept) as file:
        file.write(budget.model_dump_json(exclude_none=True).encode())


def _settings(spec: SearchSpec) -> dict[str, Any]:
    """The search-level settings recorded on the MLflow parent run."""
    return {
        "metric": spec.metric,
        "mode": spec.mode,
        **({"objectives": dict(spec.objectives)} if spec.objectives else {}),
        "trials": spec.trials,
        "sampler": {
            **spec.sampler.model_dump(),
            "startup_trials": spec.sampler.startup_for(spec.trials),
        },
        "scheduler": {
            **spec.scheduler.model_dump(),
            "grace_period": spec.scheduler.grace_for(spec.epochs),
        },
        "warm_start": spec.warm_start.model_dump() if spec.warm_start else None,
        "resources": spec.resources.model_dump(),
        **({"refit": spec.refit.model_dump(by_alias=True)} if spec.refit else {}),
        **({"budget": spec.budget.describe()} if spec.budget else {}),
    }


def check_trial_configs(spec: SearchSpec, info: DatasetInfo, *, samples: int = 16) -> None:
    """Build the parts of the space's `enqueue:` configurations and of a sample of the space
    without Ray, so bad values fail up front (an enqueued one's error names its entry)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    points = enqueued_points(spec)
    for point in points:
        study.enqueue_trial(point)
    for index in range(len(points) + samples):
        ot_trial = study.ask()
        constants = spec.define_by_run(ot_trial)
        try:
            _build_trial_parts(nest({**ot_trial.params, **constants}), info)
        except UserError as err:
            if index >= len(points):
                raise
            raise UserError(f"enqueue[{index}]: {err}") from None
        study.tell(ot_trial, 0.0)


def _build_trial_parts(config: dict[str, Any], info: DatasetInfo) -> None:
    """A trial config's model, loss and augmentation, built as a trial builds them."""
    from segsearch.data.augment import build_augment
    from segsearch.losses import build_loss
    from segsearch.models import build_model

    trial = TrialConfig.from_dict(config)
    build_model(trial.model, in_channels=info.channels, num_classes=info.num_classes)
    build_loss(
        trial.loss,
        num_classes=info.num_classes,
        ignore_index=info.ignore_index,
        class_pixel_counts=info.class_pixel_counts,
        class_image_pixels=info.class_image_pixels,
    )
    build_augment(trial.aug, ignore_index=info.ignore_index)


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
        why = (
            f"{asked} trials of {trial_cpus(res):g} CPUs each would leave no CPU of the cluster's "
            f"{total.get('CPU', 0):g} for reading data"
        )
    return fit, f"max_concurrent: {asked} lowered to {fit}: {why}"


def concurrency_for(spec: SearchSpec, total: dict[str, float]) -> int:
    """Trials that fit at once: by GPUs when trials use them, else by CPUs less Ray Data's share."""
    res = spec.resources
    if res.gpus_per_worker > 0:
        fit = total.get("GPU", 0) / (res.workers * res.gpus_per_worker)
    else:
        fit = (total.get("CPU", 0) - DATA_CPU_RESERVE) / trial_cpus(res)
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


def _summarize(grid: Any, spec: SearchSpec, storage: str, experiment_path: str) -> SearchResult:
    rows = trial_rows(grid, metric=spec.metric, mode=spec.mode, objectives=spec.objective_names)
    rows = with_costs(_with_uris(rows, storage), spec.resources)
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
        pareto=ParetoFront.of(rows, spec.objectives) if spec.objectives else None,
    )


def _with_uris(rows: list[dict[str, Any]], storage: str) -> list[dict[str, Any]]:
    """The rows with their checkpoints as URIs (`checkpoint_uri`): what a user passes on to
    evaluate, predict or export, and what the search prints."""
    return [
        {**row, "checkpoint": row["checkpoint"] and checkpoint_uri(row["checkpoint"], storage)}
        for row in rows
    ]
