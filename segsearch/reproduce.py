"""`segsearch reproduce RUN_ID`: train one tracked trial again from its manifest; compare metrics.

The trial's run holds its manifest (segsearch.manifest). The rerun is a search of one trial with
every value of the original trial config fixed, the same number of workers, for as many epochs
as the original ran (ASHA may have stopped it early), without early stopping, over the same data
(same fingerprint, else nothing runs). It is tracked like any search, as `reproduce-<run>-<time>`.
On CPU with the same packages and data order the metric is the same to rounding; the report
says by how much it differs.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from segsearch.checkpoint import MANIFEST_FILE
from segsearch.errors import UserError, first_line

__all__ = ["Reproduction", "reproduce"]


@dataclass(frozen=True)
class Reproduction:
    """The original trial's metric at its last epoch, and the rerun's at the same epoch."""

    run_id: str
    search: str
    metric: str
    epoch: int
    original: float
    reproduced: float

    def describe(self) -> str:
        return (
            f"{self.metric} at epoch {self.epoch}: original {self.original:.6f}, reproduced "
            f"{self.reproduced:.6f} (difference {abs(self.reproduced - self.original):.2e}; "
            f"rerun tracked as search {self.search})"
        )


def reproduce(
    run_id: str,
    *,
    tracking_uri: str | None = None,
    dataset: str | None = None,
    storage: str | None = None,
) -> Reproduction:
    """Rerun the trial of MLflow run `run_id` alone; its metric next to the original's."""
    from segsearch.data.fingerprint import dataset_fingerprint
    from segsearch.data.format import read_dataset_info
    from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri
    from segsearch.search.tuner import run_search
    from segsearch.space import parse_space

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri, existing=True)
    manifest, metric, epoch, original = _original(run_id, uri)
    source = dataset or manifest["dataset"]["uri"]
    info = read_dataset_info(source)
    if dataset_fingerprint(source, info.splits) != manifest["dataset"]["fingerprint"]:
        raise UserError(
            f"{source} is not the data run {run_id} trained on (its fingerprint differs from "
            f"{manifest['dataset']['fingerprint']}); pass --dataset with that data"
        )
    name = f"reproduce-{run_id[:12]}-{time.strftime('%Y%m%d-%H%M%S')}"
    fixed = {key: value for key, value in manifest["trial"].items() if key != "epochs"}
    spec = parse_space(
        {
            "name": name,
            "metric": metric,
            "trials": 1,
            "epochs": epoch,
            "scheduler": {"kind": "none"},
            "resources": {"workers": manifest["devices"]["workers"]},
            "fixed": fixed,
        },
        source=f"the manifest of run {run_id}",
    )
    with tempfile.TemporaryDirectory(prefix="segsearch-reproduce-") as tmp:
        result = run_search(spec, dataset=source, storage=storage or tmp, tracking_uri=uri)
    (trial,) = result.trials
    if trial["error"] is not None:
        raise UserError(f"the rerun of run {run_id} failed: {trial['error']}")
    rows = [row for row in trial["history"] if row.get("epoch") == epoch]
    if not rows:
        raise UserError(f"the rerun of run {run_id} reported no epoch {epoch}")
    return Reproduction(run_id, name, metric, epoch, original, float(rows[-1][metric]))


def _original(run_id: str, uri: str) -> tuple[dict[str, Any], str, int, float]:
    """The run's manifest, the search's metric, the run's last epoch and its metric there."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from segsearch.tracking.tags import EPOCHS_RUN, METRIC, PARENT_RUN

    client = MlflowClient(tracking_uri=uri)
    try:
        run = client.get_run(run_id)
        parent = run.data.tags.get(PARENT_RUN)
        metric = (client.get_run(parent).data.tags.get(METRIC) if parent else None) or "val_miou"
        with tempfile.TemporaryDirectory(prefix="segsearch-manifest-") as tmp:
            path = client.download_artifacts(run_id, MANIFEST_FILE, tmp)
            manifest = json.loads(Path(path).read_text())
        history = client.get_metric_history(run_id, metric)
    except MlflowException as err:
        raise UserError(
            f"run {run_id} at {uri}: {first_line(err)} (runs logged before manifests have none)"
        ) from None
    epoch = int(run.data.tags.get(EPOCHS_RUN) or max((m.step for m in history), default=0))
    values = [m.value for m in history if m.step == epoch]
    if not values:
        raise UserError(f"run {run_id} has no {metric} at epoch {epoch}")
    return manifest, metric, epoch, values[-1]
