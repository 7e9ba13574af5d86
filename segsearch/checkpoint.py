"""The checkpoint layout, written and read here only: what a trial saves every epoch.

A model is two files: `model.pt` (a state_dict) and `trial.json` (how to rebuild it: the meta
from `checkpoint_meta`). A trial's checkpoint adds `train_state.pt` (optimizer, scheduler, epoch:
for resuming only), `metrics.json` (the epoch's reported metrics) and the epoch's pictures
(PICTURE_FILES) and the trial's reproducibility manifest (`manifest.json`, segsearch.manifest),
which tracking logs to MLflow.

Loading never unpickles objects: the network is rebuilt from trial.json with `build_model` and the
tensors are read with `torch.load(weights_only=True)`, so any checkpoint is safe to open.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from segsearch.config import TrialConfig
from segsearch.data.format import DatasetInfo
from segsearch.errors import UserError, first_line

MODEL_FILE = "model.pt"
META_FILE = "trial.json"
TRAIN_STATE_FILE = "train_state.pt"
METRICS_FILE = "metrics.json"
OVERLAYS_FILE = "overlays.png"
CONFUSION_FILE = "confusion.png"
CLASS_IOU_FILE = "class_iou.csv"
MANIFEST_FILE = "manifest.json"
#: The epoch's pictures and tables, and the trial's manifest, logged to the trial's MLflow run.
PICTURE_FILES = (OVERLAYS_FILE, CONFUSION_FILE, CLASS_IOU_FILE, MANIFEST_FILE)
#: Files only a resumed trial needs; a logged model leaves them out (the optimizer state is large).
RESUME_ONLY_FILES = (TRAIN_STATE_FILE,)
REQUIRED_META = ("model", "in_channels", "num_classes", "classes", "mean", "std", "image_size")


def unwrap(model: nn.Module) -> nn.Module:
    """The plain network inside DDP (`.module`) or torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def save_model(directory: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Write model.pt (CPU state_dict of the unwrapped model) and trial.json into a local dir."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {key: value.detach().cpu() for key, value in unwrap(model).state_dict().items()}
    torch.save(state, directory / MODEL_FILE)
    (directory / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def checkpoint_meta(
    trial: TrialConfig, info: DatasetInfo, *, dataset: str, epoch: int
) -> dict[str, Any]:
    """trial.json: everything needed to rebuild the network and feed it images as in training."""
    config = trial.to_dict()
    return {
        "model": config["model"],
        "in_channels": info.channels,
        "num_classes": info.num_classes,
        "classes": list(info.classes),
        "ignore_index": info.ignore_index,
        "mean": list(info.mean),
        "std": list(info.std),
        "image_size": config["image_size"],
        "dataset": dataset,
        "config": config,
        "epoch": epoch,
    }


def save_checkpoint(
    directory: Path,
    model: nn.Module,
    meta: dict[str, Any],
    *,
    metrics: dict[str, Any],
    train_state: dict[str, Any],
    manifest: dict[str, Any] | None = None,
) -> None:
    """A trial's checkpoint of one epoch: the model, its metrics, the state to resume from and
    the trial's manifest."""
    save_model(directory, model, meta)
    (directory / METRICS_FILE).write_text(json.dumps(metrics))
    torch.save(train_state, directory / TRAIN_STATE_FILE)
    if manifest is not None:
        (directory / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")


def restore_checkpoint(directory: Path, model: nn.Module) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load a trial's checkpoint into `model`; return its train state and its metrics."""
    model.load_state_dict(_load_tensors(directory / MODEL_FILE))
    train_state = _load_tensors(directory / TRAIN_STATE_FILE)
    metrics = json.loads((directory / METRICS_FILE).read_text())
    return train_state, metrics


def _load_tensors(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(location: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a checkpoint (local dir or s3:// URI) in eval mode, with its meta."""
    from segsearch.data.storage import filesystem_for

    location = str(location)
    filesystem, root = filesystem_for(location)
    meta = read_meta(_read(filesystem, root, META_FILE, location), location)
    state = _read(filesystem, root, MODEL_FILE, location)
    return build_from(meta, state, location), meta


def read_meta(data: bytes, location: str) -> dict[str, Any]:
    """Parse trial.json and check it names everything needed to rebuild and feed the model."""
    try:
        meta = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{location}/{META_FILE} is not valid JSON ({err})") from None
    missing = [key for key in REQUIRED_META if not isinstance(meta, dict) or key not in meta]
    if missing:
        raise UserError(f"{location}/{META_FILE} lacks {missing}; was it written by segsearch?")
    return meta


def build_from(meta: dict[str, Any], state: bytes, location: str) -> nn.Module:
    """Build the network described by `meta` and load the state_dict bytes into it."""
    from segsearch.models import build_model

    model = build_model(
        meta["model"], in_channels=int(meta["in_channels"]), num_classes=int(meta["num_classes"])
    )
    try:
        weights = torch.load(io.BytesIO(state), map_location="cpu", weights_only=True)
        model.load_state_dict(weights)
    except Exception as err:
        raise UserError(
            f"{location}/{MODEL_FILE} does not fit the model in {META_FILE}: {first_line(err)}"
        ) from None
    return model.eval()


def _read(filesystem: Any, root: str, name: str, location: str) -> bytes:
    from segsearch.data.storage import join, storage_errors

    try:
        with storage_errors(location), filesystem.open_input_stream(join(root, name)) as stream:
            return stream.read()
    except FileNotFoundError:
        raise UserError(
            f"no checkpoint at {location}: {name} is missing; "
            f"give a directory holding {MODEL_FILE} and {META_FILE}"
        ) from None
