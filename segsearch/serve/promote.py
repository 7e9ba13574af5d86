"""Promote a search's model to the MLflow Model Registry and point an alias at it.

The model is the search's refit (its best configuration trained again) when it has one, else its
best trial's; a trial or a refit on train counts by its best epoch's score (`best_<metric>`).

Guarded and repeatable: an alias never silently moves to a model that scored worse on the same
dataset (unless forced), and promoting a run that already has a version reuses that version.
"The same dataset" is the same dataset fingerprint (segsearch.data.fingerprint), whatever path
or directory each search read it from; runs logged before fingerprints compare dataset URIs.
Scores are compared like with like: the same metric on the same dataset. A refit trained on
train+val has no held-out val score: it counts by its test_miou when the search scored it on a
test split, else by its configuration's search score (`search_<metric>`); on the same dataset a
model scored by another metric than the alias's takes the alias only with --force.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from segsearch.errors import UserError, first_line
from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri
from segsearch.tracking._runs import global_tracking_uri
from segsearch.tracking.tags import (
    DATASET,
    DATASET_FINGERPRINT,
    METRIC,
    METRIC_VALUE,
    MODE,
    PARENT_RUN,
    REFIT_OF,
    REFIT_ON,
    REFIT_RANK,
    ROLE,
    SEARCH,
    TRIAL,
    TRIAL_ID,
    export_tag,
    quoted,
)

__all__ = ["Promotion", "attach_export", "promote"]

MODEL_ARTIFACT = "model"
EXPORT_DIR = "export"
"""Where `promote --export` puts the checked file among the logged model's files."""
#: What a search's test-split evaluation logs (segsearch.serve.evaluate.Evaluation.metrics).
TEST_METRIC = "test_miou"


@dataclass(frozen=True)
class Promotion:
    """What `promote` did: which version the alias points to, and whether anything changed."""

    model_name: str
    version: str
    alias: str
    run_id: str
    trial: str
    metric: str
    value: float
    created: bool
    moved: bool
    previous: str | None
    export: str | None = None
    """With --export: what was attached to the version, and its check, in one line."""

    def to_dict(self) -> dict[str, Any]:
        """Plain data for JSON (`segsearch promote --json`)."""
        return asdict(self)

    def describe(self) -> str:
        """One line for the CLI."""
        what = f"{self.model_name} version {self.version} (trial {self.trial}, "
        what += f"{self.metric}={self.value:.4f})"
        if not self.moved:
            return f"{self.model_name}@{self.alias} already is {what}; nothing changed"
        verb = "registered" if self.created else "reused"
        before = f", was version {self.previous}" if self.previous else ""
        return f"{verb} {what}; {self.model_name}@{self.alias} → {self.version}{before}"


def promote(
    search_name: str,
    *,
    model_name: str,
    alias: str = "champion",
    metric: str = "val_miou",
    mode: str = "max",
    force: bool = False,
    tracking_uri: str | None = None,
    export: str | None = None,
) -> Promotion:
    """Register the best finished trial of a search as a version of `model_name`; move the alias.

    With `export` (onnx, torchscript or pt2), the model is first exported and checked
    (segsearch.serve.export); a file that fails its check stops the promotion before anything
    changes. The checked file is attached to the version's logged model (see attach_export).
    """
    from mlflow import MlflowClient

    if mode not in ("max", "min"):
        raise UserError(f"--mode must be max or min, got {mode!r}")
    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri, existing=True)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    with _mlflow_errors(uri), tempfile.TemporaryDirectory(prefix="segsearch-promote-") as tmp:
        experiment = client.get_experiment_by_name(search_name)
        if experiment is None:
            raise UserError(
                f"no search {search_name!r} at {uri}: no MLflow experiment of that name "
                "(the experiment is named after the search; check --tracking-uri)"
            )
        run, model_id = _best_run(client, experiment.experiment_id, search_name, metric, mode)
        metric, mode, value = _score(run, metric, mode)
        exported = _checked_export(model_id, export, tmp, uri) if export else None
        dataset = _dataset(client, run)
        fingerprint = _fingerprint(client, run)
        trial = run.data.tags.get(TRIAL_ID) or run.info.run_name or run.info.run_id
        if run.data.tags.get(ROLE) == "refit":
            trial = f"{trial}, refit of {run.data.tags.get(REFIT_OF, '?')}"
        current = _alias_version(client, model_name, alias)
        existing = _version_of_run(client, model_name, run.info.run_id)
        common = dict(
            model_name=model_name,
            alias=alias,
            run_id=run.info.run_id,
            trial=trial,
            metric=metric,
            value=value,
        )
        if current is not None and existing is not None and current.version == existing.version:
            note = attach_export(client, model_id, current, exported) if exported else None
            return Promotion(
                version=current.version,
                created=False,
                moved=False,
                previous=None,
                export=note,
                **common,
            )
        if current is not None and not force:
            _gate(
                current,
                model_name,
                alias,
                metric,
                mode,
                value,
                (dataset, fingerprint),
                trial,
                search_name,
            )
        version = existing
        if version is None:
            _ensure_registered_model(client, model_name)
            tags = {
                SEARCH: search_name,
                TRIAL: trial,
                METRIC: metric,
                METRIC_VALUE: repr(value),
                MODE: mode,
                DATASET: dataset,
            }
            if fingerprint:
                tags[DATASET_FINGERPRINT] = fingerprint
            # MLflow's SQLite registry resolves the models:/ source through the global URI.
            with global_tracking_uri(uri):
                version = client.create_model_version(
                    name=model_name,
                    source=f"models:/{model_id}",
                    run_id=run.info.run_id,
                    tags=tags,
                    model_id=model_id,
                )
        client.set_registered_model_alias(model_name, alias, version.version)
        note = attach_export(client, model_id, version, exported) if exported else None
    return Promotion(
        version=version.version,
        created=existing is None,
        moved=True,
        previous=current.version if current is not None else None,
        export=note,
        **common,
    )


def _checked_export(model_id: str, fmt: str, folder: str, uri: str) -> Any:
    """The logged model exported to `folder` in `fmt` and checked on its own dataset."""
    from segsearch.serve.export import FORMATS
    from segsearch.serve.export import export as export_model

    if fmt not in FORMATS:
        raise UserError(f"--export must be one of {', '.join(FORMATS)}, got {fmt!r}")
    out = f"{folder}/model{FORMATS[fmt]}"
    return export_model(f"models:/{model_id}", out, fmt=fmt, tracking_uri=uri)


def attach_export(client: Any, model_id: str, version: Any, exported: Any) -> str:
    """Upload a checked export into the version's logged model, under EXPORT_DIR; tag the version.

    MLflow 3 keeps a registered version's files in its logged model (models:/<model_id>), so
    the file travels with the version: `mlflow.artifacts.download_artifacts(
    "models:/NAME/VERSION")` brings it along, and the version's tag `segsearch.export.<format>`
    names its path there, the tag `segsearch.export.<format>.check` its check.
    """
    name = Path(exported.out).name
    client.log_model_artifact(model_id, exported.out, EXPORT_DIR)
    path = f"{EXPORT_DIR}/{name}"
    check = exported.check.describe()
    client.set_model_version_tag(version.name, version.version, export_tag(exported.fmt), path)
    client.set_model_version_tag(
        version.name, version.version, f"{export_tag(exported.fmt)}.check", check
    )
    return f"attached {path} ({exported.fmt}) to version {version.version}; {check}"


def _best_run(
    client: Any, experiment_id: str, search_name: str, metric: str, mode: str
) -> tuple[Any, str]:
    """(run, logged model id): the search's refit when it has a finished one with a model, else
    its best finished trial with one."""
    models = _logged_models(client, experiment_id)
    refits = _all_runs(
        client, experiment_id, f"tags.`{ROLE}` = 'refit' and attributes.status = 'FINISHED'"
    )
    refits = [run for run in refits if run.info.run_id in models]
    if refits:
        run = _best_refit(refits, metric, mode)
        return run, models[run.info.run_id]
    return _best_trial(client, experiment_id, search_name, metric, mode, models)


def _best_refit(runs: list[Any], metric: str, mode: str) -> Any:
    """The refit with the best held-out score (refits on train), else the refit of the search's
    best configuration (on train+val: nothing held out to rank them by)."""
    held_out = [
        run
        for run in runs
        if run.data.tags.get(REFIT_ON) == "train" and math.isfinite(_value(run, metric))
    ]
    if held_out:
        held_out.sort(key=lambda r: _value(r, metric), reverse=mode == "max")
        return held_out[0]
    return min(runs, key=lambda r: _rank(r.data.tags.get(REFIT_RANK)))


def _rank(tag: str | None) -> float:
    return float(tag) if tag and tag.isdigit() else math.inf


def _value(run: Any, metric: str) -> float:
    """A run's score by `metric`: its best epoch's when it logged one, else its last value."""
    metrics = run.data.metrics
    return float(metrics.get(f"best_{metric}", metrics.get(metric, math.nan)))


def _score(run: Any, metric: str, mode: str) -> tuple[str, str, float]:
    """(metric, mode, value) the run is registered and gated by: `metric` at its best epoch,
    or for a refit on train+val (no held-out val) its test_miou, else its search score."""
    if run.data.tags.get(ROLE) != "refit" or run.data.tags.get(REFIT_ON) == "train":
        return metric, mode, _value(run, metric)
    test = run.data.metrics.get(TEST_METRIC)
    if test is not None and math.isfinite(test):
        return TEST_METRIC, "max", float(test)
    name = f"search_{metric}"
    return name, mode, float(run.data.metrics.get(name, math.nan))


def _best_trial(
    client: Any,
    experiment_id: str,
    search_name: str,
    metric: str,
    mode: str,
    models: dict[str, str],
) -> tuple[Any, str]:
    """The finished trial run with the best `metric` (at its best epoch) among those with a
    logged model."""
    runs = _all_runs(
        client,
        experiment_id,
        f"tags.`{ROLE}` = 'trial' and attributes.status = 'FINISHED'",
    )
    if not runs:
        raise UserError(f"search {search_name!r} has no finished trial runs yet")
    scored = [r for r in runs if math.isfinite(_value(r, metric))]
    if not scored:
        known = sorted({name for r in runs for name in r.data.metrics})
        raise UserError(
            f"no finished trial of search {search_name!r} logged metric {metric!r}; "
            f"choose --metric from {known}"
        )
    scored.sort(key=lambda r: _value(r, metric), reverse=mode == "max")
    for run in scored:
        if run.info.run_id in models:
            return run, models[run.info.run_id]
    raise UserError(
        f"no finished trial of search {search_name!r} has a logged model "
        f"(artifact {MODEL_ARTIFACT!r}); the search logs one for its best trial when it ends"
    )


def _all_runs(client: Any, experiment_id: str, filter_string: str) -> list[Any]:
    runs: list[Any] = []
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string=filter_string, max_results=1000, page_token=token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _logged_models(client: Any, experiment_id: str) -> dict[str, str]:
    """Run id → id of the newest ready model logged under MODEL_ARTIFACT by that run."""
    from mlflow.entities import LoggedModelStatus

    found: dict[str, Any] = {}
    token = None
    while True:
        page = client.search_logged_models(
            experiment_ids=[experiment_id],
            filter_string=f"name = '{MODEL_ARTIFACT}'",
            page_token=token,
        )
        for model in page:
            if model.status != LoggedModelStatus.READY or not model.source_run_id:
                continue
            best = found.get(model.source_run_id)
            if best is None or model.creation_timestamp > best.creation_timestamp:
                found[model.source_run_id] = model
        token = page.token
        if not token:
            return {run_id: model.model_id for run_id, model in found.items()}


def _dataset(client: Any, run: Any) -> str:
    """The run's dataset URI (param or tag `dataset`), else its parent search run's."""
    for candidate in (run, _parent(client, run)):
        if candidate is None:
            continue
        for table in (candidate.data.params, candidate.data.tags):
            value = table.get("dataset") or table.get(DATASET)
            if value:
                return value
    return ""


def _fingerprint(client: Any, run: Any) -> str:
    """The run's dataset fingerprint tag, else its parent search run's; "" when neither has one."""
    for candidate in (run, _parent(client, run)):
        if candidate is not None and candidate.data.tags.get(DATASET_FINGERPRINT):
            return candidate.data.tags[DATASET_FINGERPRINT]
    return ""


def _same_dataset(tags: Any, dataset: str, fingerprint: str) -> bool:
    """Same fingerprint when both have one; else (older runs) the same dataset URI."""
    held = tags.get(DATASET_FINGERPRINT)
    if held and fingerprint:
        return held == fingerprint
    return tags.get(DATASET) == dataset


def _parent(client: Any, run: Any) -> Any:
    parent_id = run.data.tags.get(PARENT_RUN)
    return client.get_run(parent_id) if parent_id else None


def _alias_version(client: Any, model_name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException as err:
        if err.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def _version_of_run(client: Any, model_name: str, run_id: str) -> Any:
    query = f"name = '{quoted(model_name)}' and run_id = '{run_id}'"
    versions = client.search_model_versions(query)
    return min(versions, key=lambda v: int(v.version)) if versions else None


def _gate(
    current: Any,
    model_name: str,
    alias: str,
    metric: str,
    mode: str,
    value: float,
    data: tuple[str, str],
    trial: str,
    search_name: str,
) -> None:
    """Refuse to move the alias to a model that scored worse on the same dataset and metric.

    `data` is the candidate's (dataset URI, dataset fingerprint).
    """
    tags = current.tags
    dataset, fingerprint = data
    if not _same_dataset(tags, dataset, fingerprint):
        return
    if tags.get(METRIC) and tags.get(METRIC) != metric:
        raise UserError(
            f"{model_name}@{alias} is version {current.version}, scored by {tags[METRIC]} on "
            f"{dataset or 'the same dataset'}; trial {trial} of {search_name} is scored by "
            f"{metric}, which does not compare with it; pass --force to move the alias anyway"
        )
    try:
        held = float(tags[METRIC_VALUE])
    except (KeyError, ValueError):
        return
    better = held > value if mode == "max" else held < value
    if better:
        raise UserError(
            f"{model_name}@{alias} is version {current.version} with {metric}={held:.4f} on "
            f"{dataset or 'the same dataset'}, better than trial {trial} of {search_name} "
            f"({metric}={value:.4f}); pass --force to move the alias anyway"
        )


def _ensure_registered_model(client: Any, model_name: str) -> None:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode

    try:
        client.create_registered_model(model_name)
    except MlflowException as err:
        if err.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise


@contextmanager
def _mlflow_errors(uri: str) -> Iterator[None]:
    """MLflow failures become one-line UserErrors naming the tracking URI."""
    from mlflow.exceptions import MlflowException

    try:
        yield
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: {first_line(err)}") from None
