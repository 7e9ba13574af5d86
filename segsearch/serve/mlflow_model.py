"""A checkpoint as an MLflow model: servable by MLflow, and reloadable without unpickling.

Format, chosen on purpose:
- The flavor is `mlflow.pytorch` in MLflow's default `pt2` format (torch.export): no pickle on
  either side. What is exported is `MaskPredictor`, the network with its preprocessing: uint8
  images (N,H,W,C) of any size in, class ids (N,H,W) out. The net itself runs at the trained
  image size (the wrapper resizes to it), so only the batch and the outer resizes carry dynamic
  shapes, and every architecture exports, those that pad to their stride included. The signature
  says so (uint8 (-1,-1,-1,C) → int64 (-1,-1,-1); unnamed, so pyfunc passes the array straight
  through), and `mlflow.pyfunc.load_model(uri).predict(images)` returns the masks `segsearch
  predict` writes. A trial trained at native size (no image_size) exports with dynamic H/W too;
  its program may then be guarded to sizes like the example's (multiples of 32).
- Beside it, in the model's `extra_files/`, the checkpoint itself: `model.pt` (state_dict) and
  `trial.json` (architecture, classes, mean/std, image size, dataset). segsearch reloads from
  these (`torch.load(weights_only=True)` into a model rebuilt from trial.json): the exact network
  of the checkpoint, on any device and any input size, whatever torch exported the pt2 file.
- No silent fallback to the pickle format: if an export ever fails, logging fails with torch's
  error (tests export every architecture).
The weights are stored twice; segsearch's models are a few MB, so clarity wins over bytes.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from segsearch.checkpoint import (
    META_FILE,
    MODEL_FILE,
    build_from,
    load_model,
    read_meta,
    save_model,
)
from segsearch.errors import UserError, first_line
from segsearch.serve.predictor import MaskPredictor

EXTRA_DIR = "extra_files"
EXAMPLE_SHAPE = (2, 64, 96)
"""Input example N,H,W: a batch of 2 keeps the batch dimension dynamic in the export (1 would be
specialised); H != W keeps them two symbols; multiples of 32 suit a net run at native size."""


def log_model(
    checkpoint_dir: str, *, artifact_path: str = "model", run_id: str | None = None
) -> str:
    """Log a checkpoint (local dir or s3://) as an MLflow model of `run_id`; return its model URI.

    Uses the current MLflow tracking URI (mlflow.set_tracking_uri / MLFLOW_TRACKING_URI).
    """
    import mlflow
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    net, meta = load_model(checkpoint_dir)
    predictor = MaskPredictor(net, meta).eval()
    channels = predictor.channels
    example = np.random.default_rng(0).integers(0, 256, (*EXAMPLE_SHAPE, channels), dtype=np.uint8)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, -1, -1, channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.int64), (-1, -1, -1))]),
    )
    logged = mlflow.initialize_logged_model(
        name=artifact_path, source_run_id=run_id, **_run_context(run_id)
    )
    with tempfile.TemporaryDirectory(prefix="segsearch-model-") as tmp:
        save_model(tmp, net, meta)
        info = mlflow.pytorch.log_model(
            predictor,
            name=artifact_path,
            signature=signature,
            input_example=example,
            extra_files=[str(Path(tmp) / MODEL_FILE), str(Path(tmp) / META_FILE)],
            serialization_format="pt2",
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"],
            run_id=run_id,
            model_id=logged.model_id,
        )
    return info.model_uri


def _run_context(run_id: str | None) -> dict[str, Any]:
    """The run's experiment and params for its logged model.

    Given only a run id (no active run), MLflow files a new logged model under the *active*
    experiment (often Default); created here first, it lands in the run's own experiment, where
    the search's other records, and `segsearch promote`, look for it.
    """
    if run_id is None:
        return {}
    from mlflow import MlflowClient

    run = MlflowClient().get_run(run_id)
    return {"experiment_id": run.info.experiment_id, "params": dict(run.data.params)}


def load_logged_model(
    model_uri: str, *, tracking_uri: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The network (eval mode) and trial.json of a logged model: models:/…, runs:/… or a URI."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from segsearch.mlflow_uri import check_tracking_server, resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    check_tracking_server(uri, existing=True)
    with tempfile.TemporaryDirectory(prefix="segsearch-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=_artifact_location(model_uri, uri), dst_path=tmp, tracking_uri=uri
            )
        except (MlflowException, OSError) as err:
            raise UserError(
                f"cannot load model {model_uri} from {uri}: {first_line(err)}"
            ) from None
        folder = Path(local) / EXTRA_DIR
        if not (folder / META_FILE).is_file() or not (folder / MODEL_FILE).is_file():
            raise UserError(
                f"model {model_uri} has no {EXTRA_DIR}/{META_FILE} and {MODEL_FILE}: "
                "log it with segsearch (segsearch.serve.mlflow_model.log_model)"
            )
        meta = read_meta((folder / META_FILE).read_bytes(), model_uri)
        return build_from(meta, (folder / MODEL_FILE).read_bytes(), model_uri), meta


def _artifact_location(model_uri: str, uri: str) -> str:
    """Where a models:/ or runs:/ URI's files are, looked up with a client bound to `uri`.

    MLflow's own download resolves registry names and a run's logged models through the *global*
    tracking/registry URI, whatever URI it is given; resolving here keeps --tracking-uri the
    only source of truth.
    """
    from mlflow import MlflowClient
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    if model_uri.startswith("runs:/"):
        run_id, _, path = model_uri[len("runs:/") :].strip("/").partition("/")
        return _run_model_location(client, run_id, path or "model")
    while model_uri.startswith("models:/"):
        found = get_model_name_and_version(client, model_uri)
        if len(found) == 1:
            return client.get_logged_model(found[0]).artifact_location
        model_uri = client.get_model_version_download_uri(*found)
    return model_uri


def _run_model_location(client: Any, run_id: str, name: str) -> str:
    """The newest model named `name` logged by the run, else the run's artifact folder `name`."""
    run = client.get_run(run_id)
    models = [
        model
        for model in client.search_logged_models(
            experiment_ids=[run.info.experiment_id], filter_string=f"name = '{name}'"
        )
        if model.source_run_id == run_id
    ]
    if models:
        return max(models, key=lambda model: model.creation_timestamp).artifact_location
    return f"{run.info.artifact_uri.rstrip('/')}/{name}"
