"""The searches in a tracking store, read back from MLflow: `segsearch list` and `segsearch best`.

A search is an experiment tagged `segsearch.role=search` with one parent run of that role; its
trials are the child runs tagged `segsearch.role=trial`. Scores are the trial runs' latest
values of the search's metric (the parent's `metric` and `mode` params), the value Tune ranks
trials by, so a running search is listed with its best so far.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from segsearch.errors import UserError, first_line
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri, without_password
from segsearch.tracking.tags import (
    BEST_RUN_ID,
    MODEL_URI,
    PARENT_RUN,
    ROLE,
    SEARCH,
    STATUS,
    TRIAL_ID,
    quoted,
)

__all__ = ["BestTrial", "SearchSummary", "best_trial", "list_searches"]

DEFAULT_METRIC = "val_miou"


@dataclass(frozen=True)
class SearchSummary:
    """One search as `segsearch list` shows it."""

    name: str
    state: str
    """The parent run's `segsearch.status`: running, finished, failed or interrupted."""
    trials: int
    metric: str
    mode: str
    best_metric: float | None
    best_trial_id: str | None
    started: int
    """Start of the parent run, milliseconds since the epoch."""
    run_id: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BestTrial:
    """The best trial of a search: its score, run, model and parameters."""

    search: str
    trial_id: str
    run_id: str
    metric: str
    value: float
    state: str
    model_uri: str | None
    """models:/… of the model the search logged for it (its best trial only), else None."""
    params: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """A few lines for people."""
        lines = [
            f"search {self.search}: best trial {self.trial_id} {self.metric}={self.value:.4f} "
            f"({self.state})",
            f"run: {self.run_id}",
            f"model: {self.model_uri or 'none logged (the search logs one when it finishes)'}",
        ]
        lines += [f"  {key} = {value}" for key, value in sorted(self.params.items())]
        return "\n".join(lines)


def list_searches(*, tracking_uri: str | None = None) -> list[SearchSummary]:
    """Every search in the store, newest first."""
    with _client(tracking_uri) as client:
        experiments = [
            e.experiment_id
            for e in _pages(
                lambda token: client.search_experiments(
                    filter_string=f"tags.`{ROLE}` = 'search'", page_token=token
                )
            )
        ]
        if not experiments:
            return []
        parents = _runs(client, experiments, f"tags.`{ROLE}` = 'search'")
        trials: dict[str, list[Any]] = {}
        for run in _runs(client, experiments, f"tags.`{ROLE}` = 'trial'"):
            trials.setdefault(run.data.tags.get(PARENT_RUN, ""), []).append(run)
    summaries = [_summary(parent, trials.get(parent.info.run_id, [])) for parent in parents]
    return sorted(summaries, key=lambda s: s.started, reverse=True)


def best_trial(name: str, *, tracking_uri: str | None = None) -> BestTrial:
    """The search's best trial: the one its parent run names once it finished, else the best
    scored so far."""
    with _client(tracking_uri) as client:
        parent = _parent(client, name, tracking_uri)
        trials = _runs(
            client,
            [parent.info.experiment_id],
            f"tags.`{ROLE}` = 'trial' and tags.`{PARENT_RUN}` = '{parent.info.run_id}'",
        )
    metric, mode = _metric_of(parent)
    chosen = parent.data.tags.get(BEST_RUN_ID)
    named = [run for run in trials if run.info.run_id == chosen]
    best = named[0] if named else _best_run(trials, metric, mode)
    if best is None:
        raise UserError(f"search {name!r} has no trial that logged {metric} yet")
    return BestTrial(
        search=name,
        trial_id=best.data.tags.get(TRIAL_ID, best.info.run_name or best.info.run_id),
        run_id=best.info.run_id,
        metric=metric,
        value=float(best.data.metrics.get(metric, math.nan)),
        state=best.data.tags.get(STATUS, best.info.status.lower()),
        model_uri=best.data.tags.get(MODEL_URI),
        params=dict(best.data.params),
    )


def _summary(parent: Any, trials: list[Any]) -> SearchSummary:
    metric, mode = _metric_of(parent)
    best = _best_run(trials, metric, mode)
    return SearchSummary(
        name=parent.data.tags.get(SEARCH, parent.info.run_name),
        state=parent.data.tags.get(STATUS, parent.info.status.lower()),
        trials=len(trials),
        metric=metric,
        mode=mode,
        best_metric=best.data.metrics[metric] if best is not None else None,
        best_trial_id=best.data.tags.get(TRIAL_ID) if best is not None else None,
        started=parent.info.start_time or 0,
        run_id=parent.info.run_id,
    )


def _metric_of(parent: Any) -> tuple[str, str]:
    params = parent.data.params
    return params.get("metric", DEFAULT_METRIC), params.get("mode", "max")


def _best_run(runs: Iterable[Any], metric: str, mode: str) -> Any:
    scored = [r for r in runs if math.isfinite(r.data.metrics.get(metric, math.nan))]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda r: r.data.metrics[metric])


def _parent(client: Any, name: str, tracking_uri: str | None) -> Any:
    experiment = client.get_experiment_by_name(name)
    found = []
    if experiment is not None:
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{ROLE}` = 'search' and tags.`{SEARCH}` = '{quoted(name)}'",
            max_results=1,
            order_by=["attributes.start_time DESC"],
        )
    if not found:
        where = without_password(resolve_tracking_uri(tracking_uri))
        raise UserError(f"no search {name!r} at {where}; `segsearch list` shows the searches")
    return found[0]


def _runs(client: Any, experiment_ids: list[str], filter_string: str) -> list[Any]:
    return list(
        _pages(
            lambda token: client.search_runs(
                experiment_ids, filter_string=filter_string, max_results=1000, page_token=token
            )
        )
    )


def _pages(fetch: Any) -> Iterator[Any]:
    token = None
    while True:
        page = fetch(token)
        yield from page
        token = page.token
        if not token:
            return


@contextmanager
def _client(tracking_uri: str | None) -> Iterator[Any]:
    """A client of an existing store; MLflow's failures become one-line UserErrors."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri, existing=True)
    try:
        yield MlflowClient(tracking_uri=uri)
    except MlflowException as err:
        raise UserError(f"MLflow at {without_password(uri)}: {first_line(err)}") from None
