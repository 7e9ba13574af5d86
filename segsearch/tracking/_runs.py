"""The MLflow calls behind a search's runs: find or make them by tag, log within MLflow's limits."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag, ViewType

from segsearch.errors import UserError
from segsearch.tracking._clean import MAX_TAG_VALUE, clean
from segsearch.tracking.tags import (
    BEST,
    DATASET_FINGERPRINT,
    ERROR,
    PARENT_RUN,
    ROLE,
    SEARCH,
    STATUS,
    TRIAL_ID,
    quoted,
)


def experiment_for(client: MlflowClient, name: str) -> str:
    """The id of the experiment named after the search, made on first use."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        return client.create_experiment(
            name, artifact_location=local_artifact_root(client.tracking_uri), tags={ROLE: "search"}
        )
    if experiment.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment {name!r} was deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or choose another --name"
        )
    return experiment.experiment_id


def local_artifact_root(tracking_uri: str) -> str | None:
    """For a sqlite:/// store, `mlruns/` beside the database file, not in whatever folder the
    search happens to run from (MLflow's default); None (the server's choice) otherwise."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    database = Path(tracking_uri[len("sqlite:///") :].split("?")[0]).expanduser().resolve()
    return (database.parent / "mlruns").as_uri()


def open_parent(client: MlflowClient, experiment_id: str, name: str) -> tuple[str, bool]:
    """The search's parent run, reopened when it exists; (run id, whether it existed)."""
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{ROLE}` = 'search' and tags.`{SEARCH}` = '{quoted(name)}'",
        run_view_type=ViewType.ACTIVE_ONLY,
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        log_batch(client, run_id, tags=[RunTag(STATUS, "running")])
        return run_id, True
    tags = clean({ROLE: "search", SEARCH: name, STATUS: "running"})
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id, False


def children_of(
    client: MlflowClient, experiment_id: str, parent_id: str, *, role: str = "trial"
) -> dict[str, str]:
    """Trial id → run id of the parent's existing child runs of one role (trial or refit)."""
    children: dict[str, str] = {}
    token = None
    while True:
        page = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`{PARENT_RUN}` = '{parent_id}' and tags.`{ROLE}` = '{role}'",
            max_results=1000,
            page_token=token,
        )
        for run in page:
            trial_id = run.data.tags.get(TRIAL_ID)
            if trial_id:
                children.setdefault(trial_id, run.info.run_id)
        token = page.token
        if not token:
            return children


def open_child(
    client: MlflowClient,
    *,
    experiment_id: str,
    parent_id: str,
    search_name: str,
    trial_id: str,
    known: str | None,
    tags: Mapping[str, Any] | None = None,
) -> str:
    """The trial's child run: the known or tagged one reopened, else a new one (with the
    parent's dataset fingerprint, and `tags` over the trial's own: a refit run's role)."""
    run_id = known or _find_child(client, experiment_id, parent_id, trial_id)
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        log_batch(client, run_id, tags=[RunTag(STATUS, "running")])
        if ERROR in client.get_run(run_id).data.tags:
            client.delete_tag(run_id, ERROR)
        return run_id
    tags = {
        ROLE: "trial",
        SEARCH: search_name,
        TRIAL_ID: trial_id,
        PARENT_RUN: parent_id,
        STATUS: "running",
        **(tags or {}),
    }
    fingerprint = client.get_run(parent_id).data.tags.get(DATASET_FINGERPRINT)
    if fingerprint:
        tags[DATASET_FINGERPRINT] = fingerprint
    return client.create_run(experiment_id, run_name=trial_id, tags=clean(tags)).info.run_id


def last_step(client: MlflowClient, run_id: str) -> int:
    """The last epoch (step of the `epoch` metric) logged to a run; 0 when none."""
    return max((m.step for m in client.get_metric_history(run_id, "epoch")), default=0)


def image_steps(client: MlflowClient, run_id: str) -> dict[str, int]:
    """The last step of each image key logged with `log_image(key=..., step=...)` to a run.

    MLflow names those files `images/<key>+step+<step>+timestamp+...` (a `/` in the key as `~`).
    """
    steps: dict[str, int] = {}
    for entry in client.list_artifacts(run_id, "images"):
        key, sep, rest = entry.path.removeprefix("images/").partition("+step+")
        step = rest.partition("+")[0]
        if sep and step.isdigit():
            steps[key] = max(steps.get(key, 0), int(step))
    return steps


def mark_best(client: MlflowClient, experiment_id: str, parent_id: str, best_run: str) -> None:
    """Tag `segsearch.best=true` on the best trial's run only (a resumed search may change it)."""
    previous = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PARENT_RUN}` = '{parent_id}' and tags.`{BEST}` = 'true'",
    )
    for run in previous:
        if run.info.run_id != best_run:
            client.set_tag(run.info.run_id, BEST, "false")
    client.set_tag(best_run, BEST, "true")


def log_params(
    client: MlflowClient, run_id: str, params: Mapping[str, Any], *, echo: Callable[[str], None]
) -> None:
    """Log the params a run does not have yet; a changed value keeps the first (MLflow's rule)."""
    existing = client.get_run(run_id).data.params
    new = []
    for key, value in clean(params).items():
        if key not in existing:
            new.append(Param(key, value))
        elif existing[key] != value:
            echo(f"tracking: run {run_id} keeps {key}={existing[key]!r} (now {value!r})")
    log_batch(client, run_id, params=new)


def log_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    cleaned = clean(tags, max_value=MAX_TAG_VALUE)
    log_batch(client, run_id, tags=[RunTag(k, v) for k, v in cleaned.items()])


def log_batch(
    client: MlflowClient,
    run_id: str,
    *,
    metrics: Sequence[Metric] = (),
    params: Sequence[Param] = (),
    tags: Sequence[RunTag] = (),
) -> None:
    """log_batch within MLflow's per-request limits (1000 metrics, 100 params, 100 tags)."""
    metrics, params, tags = list(metrics), list(params), list(tags)
    while metrics or params or tags:
        client.log_batch(run_id, metrics=metrics[:1000], params=params[:100], tags=tags[:100])
        metrics, params, tags = metrics[1000:], params[100:], tags[100:]


def end_run(client: MlflowClient, run_id: str, tags: Mapping[str, Any], *, failed: bool) -> None:
    terminate(client, run_id, tags, status="FAILED" if failed else "FINISHED")


def terminate(client: MlflowClient, run_id: str, tags: Mapping[str, Any], *, status: str) -> None:
    """Tag a run and end it with an MLflow RunStatus (FINISHED, FAILED or KILLED)."""
    log_tags(client, run_id, tags)
    client.set_terminated(run_id, status=status)


def mark_lost(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    """Tag a run lost; end it KILLED unless it had FINISHED or FAILED."""
    log_tags(client, run_id, tags)
    if client.get_run(run_id).info.status not in ("FINISHED", "FAILED"):
        client.set_terminated(run_id, status="KILLED")


def terminate_if_running(
    client: MlflowClient, run_id: str, tags: Mapping[str, Any], *, status: str
) -> None:
    """End a run still RUNNING; a run already ended keeps its status."""
    if client.get_run(run_id).info.status == "RUNNING":
        terminate(client, run_id, tags, status=status)


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (used by mlflow_model.log_model) at `uri` inside the block."""
    import mlflow

    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    saved = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)
        if saved_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


def _find_child(
    client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str
) -> str | None:
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`{PARENT_RUN}` = '{parent_id}' and tags.`{TRIAL_ID}` = '{quoted(trial_id)}'"
        ),
        max_results=1,
    )
    return found[0].info.run_id if found else None
