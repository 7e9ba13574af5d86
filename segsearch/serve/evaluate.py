"""`segsearch evaluate`: a model's scores on one split of a dataset, at the images' own resolution.

This is the number to quote. Validation during a search runs at the trial's resized image_size;
here each image goes through the model's own preprocessing (`MaskPredictor`: resize to the trained
size, normalise, net) and the logits are resized back to the mask's size before the argmax, so
every pixel of the original mask counts, except those of the dataset's ignore index. The counts of
the whole split go into one `ConfusionMatrix`, so the scores do not depend on how it is batched.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from segsearch.data.format import DatasetInfo, read_dataset_info
from segsearch.errors import UserError, first_line
from segsearch.metrics import ConfusionMatrix
from segsearch.serve.ensemble import Ensemble, load_models
from segsearch.serve.predict import pick_device, shape_batches, split_rows
from segsearch.serve.predictor import MaskPredictor

__all__ = ["Evaluation", "evaluate", "log_evaluation", "model_run", "score"]

EVALUATION_DIR = "evaluation"
CONFUSION_FILE = "confusion.png"
CLASSES_FILE = "per_class.csv"
RESULT_FILE = "evaluation.json"
_BAD_METRIC_CHARS = re.compile(r"[^\w.\- :/]")


@dataclass(frozen=True, eq=False)
class Evaluation:
    """Scores of one model on one split; IoU and Dice of a class absent from both the masks and
    the predictions are NaN and left out of the means."""

    model_uri: str
    dataset: str
    split: str
    images: int
    ignore_index: int
    classes: tuple[str, ...]
    miou: float
    dice: float
    pixel_acc: float
    iou: dict[str, float]
    dice_per_class: dict[str, float]
    confusion: np.ndarray
    """Pixel counts, int64 (classes × classes), rows the truth and columns the prediction."""
    run_id: str | None = None
    """The MLflow run the scores were logged to, if any."""

    @classmethod
    def from_counts(
        cls,
        counts: ConfusionMatrix,
        *,
        model_uri: str,
        dataset: str,
        split: str,
        images: int,
        classes: Sequence[str],
    ) -> Evaluation:
        """The scores of a split's confusion counts."""
        scores = counts.compute()
        confusion = np.asarray(scores["matrix"], dtype=np.int64)
        confusion.setflags(write=False)
        return cls(
            model_uri=model_uri,
            dataset=dataset,
            split=split,
            images=images,
            ignore_index=counts.ignore_index,
            classes=tuple(classes),
            miou=scores["miou"],
            dice=scores["dice"],
            pixel_acc=scores["pixel_acc"],
            iou=dict(zip(classes, scores["iou"], strict=True)),
            dice_per_class=dict(zip(classes, scores["dice_per_class"], strict=True)),
            confusion=confusion,
        )

    def metrics(self) -> dict[str, float]:
        """`<split>_miou`, `<split>_dice`, `<split>_pixel_acc` (those that are numbers).

        For the val split `val_native_miou` …: `val_miou` is the per-epoch score that training
        logs at the trained size, and that promote ranks trials by; it must not change.
        """
        prefix = _BAD_METRIC_CHARS.sub("_", self.split)
        prefix = f"{prefix}_native" if prefix == "val" else prefix
        values = {"miou": self.miou, "dice": self.dice, "pixel_acc": self.pixel_acc}
        return {f"{prefix}_{k}": v for k, v in values.items() if math.isfinite(v)}

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data; NaN (an absent class, or nothing counted) becomes null."""
        return {
            "model_uri": self.model_uri,
            "dataset": self.dataset,
            "split": self.split,
            "images": self.images,
            "ignore_index": self.ignore_index,
            "miou": _number(self.miou),
            "dice": _number(self.dice),
            "pixel_acc": _number(self.pixel_acc),
            "iou": {name: _number(value) for name, value in self.iou.items()},
            "dice_per_class": {name: _number(v) for name, v in self.dice_per_class.items()},
            "classes": list(self.classes),
            "confusion": self.confusion.tolist(),
            "run_id": self.run_id,
        }

    def table(self) -> str:
        """The per-class table and the means, for people."""
        truth, predicted = self.confusion.sum(axis=1), self.confusion.sum(axis=0)
        rows = [["class", "IoU", "Dice", "pixels", "predicted"]] + [
            [name, _cell(self.iou[name]), _cell(self.dice_per_class[name]), str(t), str(p)]
            for name, t, p in zip(self.classes, truth, predicted, strict=True)
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
            for row in rows
        ]
        return "\n".join(
            [
                f"{self.model_uri} on {self.dataset}, split {self.split}: {self.images} images "
                f"at native resolution (ignore index {self.ignore_index})",
                "",
                *lines,
                "",
                f"mIoU {_cell(self.miou)}  Dice {_cell(self.dice)}  "
                f"pixel accuracy {_cell(self.pixel_acc)}",
            ]
        )


def evaluate(
    model_uri: str | Sequence[str],
    dataset: str,
    *,
    split: str = "test",
    tracking_uri: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    log: bool = True,
) -> Evaluation:
    """Score a model on a split; with `log`, also on the MLflow run that logged the model.

    Several model URIs are scored as one ensemble (segsearch.serve.ensemble), named
    `A + B + …`; an ensemble has no run of its own, so nothing is logged for it.
    """
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    uris = [model_uri] if isinstance(model_uri, str) else list(model_uri)
    name = " + ".join(uris)
    info = read_dataset_info(dataset)
    _check_split(info, dataset, split)
    predictor, classes = load_models(uris, tracking_uri=tracking_uri)
    _check_classes(classes, info, name, dataset)
    predictor = predictor.to(pick_device(device))
    one_model = len(uris) == 1
    run_id = model_run(uris[0], tracking_uri=tracking_uri) if log and one_model else None
    counts, images = score(predictor, dataset, split, info=info, batch_size=batch_size)
    if images != info.splits[split]:
        raise UserError(
            f"{dataset}: split {split!r} has {images} images in its shards, dataset.json says "
            f"{info.splits[split]}; ingest it again"
        )
    evaluation = Evaluation.from_counts(
        counts,
        model_uri=name,
        dataset=dataset,
        split=split,
        images=images,
        classes=info.classes,
    )
    if run_id is None:
        return evaluation
    evaluation = dataclasses.replace(evaluation, run_id=run_id)
    log_evaluation(evaluation, run_id=run_id, tracking_uri=tracking_uri)
    return evaluation


def score(
    predictor: MaskPredictor | Ensemble,
    dataset: str,
    split: str,
    *,
    info: DatasetInfo,
    batch_size: int = 8,
) -> tuple[ConfusionMatrix, int]:
    """Confusion counts of the predictor's masks against one split's masks; the image count."""
    counts = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    images = 0
    batches = shape_batches(
        _samples(dataset, split), lambda sample: predictor.input_shape(sample.image), batch_size
    )
    for batch in batches:
        predictions = predictor.masks([sample.image for sample in batch])
        for sample, prediction in zip(batch, predictions, strict=True):
            try:
                counts.update(torch.from_numpy(prediction), torch.from_numpy(sample.mask))
            except ValueError as err:
                raise UserError(f"{sample.where}: {err}") from None
            images += 1
    return counts, images


def model_run(model_uri: str, *, tracking_uri: str | None = None) -> str | None:
    """The MLflow run that logged the model: from runs:/RUN/…, or the registered version's or
    logged model's source run; None for a checkpoint folder (it has none)."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].strip("/").partition("/")[0] or None
    if not model_uri.startswith("models:/"):
        return None
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.store.artifact.utils.models import get_model_name_and_version

    from segsearch.mlflow_uri import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        found = get_model_name_and_version(client, model_uri)
        if len(found) == 1:
            return client.get_logged_model(found[0]).source_run_id
        return client.get_model_version(*found).run_id or None
    except MlflowException as err:
        raise UserError(f"MLflow at {uri}: {first_line(err)}") from None


def log_evaluation(evaluation: Evaluation, *, run_id: str, tracking_uri: str | None = None) -> None:
    """Metrics `<split>_miou` … on the run, and under evaluation/<split>/ the confusion picture,
    the per-class CSV and the whole result as JSON."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    from segsearch.mlflow_uri import resolve_tracking_uri
    from segsearch.visualize import plot_confusion

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    stamp = int(1000 * time.time())
    metrics = [Metric(k, v, stamp, 0) for k, v in evaluation.metrics().items()]
    with tempfile.TemporaryDirectory(prefix="segsearch-evaluation-") as tmp:
        folder = Path(tmp)
        plot_confusion(evaluation.confusion, evaluation.classes, folder / CONFUSION_FILE)
        write_class_csv(evaluation, folder / CLASSES_FILE)
        (folder / RESULT_FILE).write_text(json.dumps(evaluation.to_dict(), indent=2) + "\n")
        try:
            client.log_batch(run_id, metrics=metrics)
            client.log_artifacts(run_id, tmp, artifact_path=artifact_dir(evaluation.split))
        except MlflowException as err:
            raise UserError(f"MLflow at {uri}: run {run_id}: {first_line(err)}") from None


def artifact_dir(split: str) -> str:
    """Where a split's evaluation files go among the run's artifacts."""
    return f"{EVALUATION_DIR}/{split}"


def write_class_csv(evaluation: Evaluation, path: Path) -> None:
    """`class,iou,dice,pixels,predicted`; an absent class gets empty iou and dice."""
    truth, predicted = evaluation.confusion.sum(axis=1), evaluation.confusion.sum(axis=0)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["class", "iou", "dice", "pixels", "predicted"])
        for index, name in enumerate(evaluation.classes):
            iou, dice = evaluation.iou[name], evaluation.dice_per_class[name]
            writer.writerow([name, _csv(iou), _csv(dice), int(truth[index]), int(predicted[index])])


@dataclass(frozen=True)
class _Sample:
    where: str
    image: np.ndarray
    mask: np.ndarray


def _samples(dataset: str, split: str) -> Iterator[_Sample]:
    from segsearch.data.images import decode_image, decode_mask

    for where, row in split_rows(dataset, split, columns=("image", "mask")):
        try:
            image, mask = decode_image(row["image"]), np.array(decode_mask(row["mask"]))
        except UserError:
            raise
        except Exception as err:
            raise UserError(f"{where}: unreadable image or mask ({first_line(err)})") from None
        if mask.shape != image.shape[:2]:
            raise UserError(
                f"{where}: mask {mask.shape} and image {image.shape[:2]} differ in size"
            )
        yield _Sample(where, image, mask)


def _check_split(info: DatasetInfo, dataset: str, split: str) -> None:
    if split not in info.splits:
        raise UserError(
            f"{dataset} has no split {split!r}; its splits: {', '.join(sorted(info.splits))}"
        )
    if info.splits[split] == 0:
        raise UserError(f"split {split!r} of {dataset} has no images")


def _check_classes(classes: Sequence[str], info: DatasetInfo, model_uri: str, dataset: str) -> None:
    if tuple(classes) != info.classes:
        raise UserError(
            f"model {model_uri} predicts classes {list(classes)}, but {dataset} has "
            f"{list(info.classes)}; evaluate it on a dataset with the classes it was trained on"
        )


def _number(value: float) -> float | None:
    return None if math.isnan(value) else value


def _cell(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _csv(value: float) -> str:
    return "" if math.isnan(value) else f"{value:.6f}"
