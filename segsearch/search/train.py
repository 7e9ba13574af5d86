"""One trial's training: `train`, run by every Ray Train worker of a multi-worker trial (DDP,
`train_loop_per_worker`) or in a one-worker trial's own process."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from segsearch.checkpoint import (
    CLASS_IOU_FILE,
    CONFUSION_FILE,
    OVERLAYS_FILE,
    checkpoint_meta,
    load_weights,
    restore_checkpoint,
    save_checkpoint,
    unwrap,
)
from segsearch.config import OptimConfig, TrialConfig
from segsearch.data.augment import build_augment
from segsearch.data.format import DatasetInfo
from segsearch.losses import build_loss
from segsearch.manifest import trial_manifest
from segsearch.metrics import ConfusionMatrix
from segsearch.models import build_model, count_parameters
from segsearch.search import placement
from segsearch.search.cost import measure_cost
from segsearch.search.system_metrics import SystemSampler
from segsearch.search.worker import Worker, ray_train_worker
from segsearch.serve.predictor import resize_logits
from segsearch.space import MEASURED_COSTS
from segsearch.visualize import plot_confusion, render_overlays, write_class_iou_csv

if TYPE_CHECKING:
    from segsearch.data.trial_data import TrialData

#: The size measured at when a trial trains at each image's own size and has no overlay image.
COST_FALLBACK_SIZE = (256, 256)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry on every worker of a multi-worker trial (DDP): `train` with Train's
    rank, device, data shards, checkpoint and reports."""
    train(config, ray_train_worker())


def train(config: dict[str, Any], worker: Worker) -> None:
    """Train one trial's model; report metrics and a checkpoint every epoch (rank 0 writes it).

    The one training loop of both paths: a Ray Train worker (`train_loop_per_worker`) or the
    Tune trial's own process (a one-worker trial, `trial.py`). `config` holds `trial` (the
    TrialConfig), `dataset_info` (the DatasetInfo), `dataset` (its URI), `data` (the TrialData
    its batches come from), `overlay` (a few fixed validation images and masks at the trial's
    image size, for pictures), `launched_at` (when the trial's function started, to report
    start-up time) and `timings` (when each start-up stage before this loop ended, reported
    with the loop's own in `startup_at`) and `start_from` (a refit's trial checkpoint, or None).

    A refit from a checkpoint starts from its weights only, with a fresh optimizer and lr
    schedule over the refit's epochs (a warm restart): the trial's schedule was sized for the
    trial's epochs and has decayed by its best epoch, and Adam's moments rebuild in a few steps.
    Its own checkpoint, once it has one, wins (a resumed refit).
    """
    trial: TrialConfig = config["trial"]
    info: DatasetInfo = config["dataset_info"]
    timings = {**config.get("timings", {}), "loop": time.time()}
    data: TrialData = config["data"]
    rank, world, device = worker.rank, worker.world, worker.device
    on_gpu = device.type == "cuda"
    torch.manual_seed(trial.seed + rank)

    model = build_model(trial.model, in_channels=info.channels, num_classes=info.num_classes)
    if config.get("start_from"):
        load_weights(config["start_from"], model)
    num_params = count_parameters(model)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = worker.prepare_model(model)
    net = unwrap(model)  # the plain module: where only some ranks run forward (no collectives)
    loss_fn = build_loss(
        trial.loss,
        num_classes=info.num_classes,
        ignore_index=info.ignore_index,
        class_pixel_counts=info.class_pixel_counts,
        class_image_pixels=info.class_image_pixels,
    )
    augment = build_augment(trial.aug, ignore_index=info.ignore_index)
    steps_per_epoch = max(1, info.splits["train"] // (world * trial.batch_size))
    optimizer = _make_optimizer(trial.optim, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(trial.optim, steps_per_epoch, trial.epochs)
    )
    restored = worker.checkpoint()
    start_epoch, last_metrics = _restore(restored, net, optimizer, scheduler)
    measure = bool(config.get("measure_cost")) and rank == 0
    cost = {k: last_metrics[k] for k in MEASURED_COSTS if k in last_metrics} if measure else {}
    if restored is not None:
        # Report the restored epoch again: a trial stopped between its checkpoint and the upload
        # of Tune's result file would otherwise miss that epoch in its history (ASHA, Optuna and
        # MLflow keep an epoch once). A run that had finished ends here, with its result.
        worker.report(last_metrics, restored if rank == 0 else None)
        if start_epoch >= trial.epochs:
            return
    normalize = _Normalizer(info, device)
    generator = torch.Generator(device=device).manual_seed(trial.seed * 1000 + rank)
    timings["model"] = time.time()
    startup_s = None
    manifest = (
        trial_manifest(
            trial, dataset=config["dataset"], splits=info.splits, device=device, workers=world
        )
        if rank == 0
        else None
    )
    system = SystemSampler() if rank == 0 else None

    for epoch in range(start_epoch + 1, trial.epochs + 1):
        epoch_started_at = time.time()
        started = time.perf_counter()
        model.train()
        loss_sum, images = 0.0, 0
        epoch_batches = data.batches("train", rank=rank, world=world, epoch=epoch)
        for image, mask in _batches(epoch_batches, device):
            if startup_s is None:
                timings["first_batch"] = time.time()
            image, mask = augment(image, mask, generator=generator)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
                logits = model(normalize(image))
            loss = loss_fn(logits.float(), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(image)
            images += len(image)
            if startup_s is None:
                timings["first_step"] = time.time()
                startup_s = timings["first_step"] - config["launched_at"]
        train_time = time.perf_counter() - started
        loss_sum, images = _sum_across_workers([loss_sum, images], device)
        if measure and not cost:  # once: the architecture, not the weights, sets the cost
            cost = measure_cost(
                net, channels=info.channels, image_size=_cost_size(trial, config), device=device
            )

        val_batches = data.batches("val", rank=rank, world=world, epoch=epoch)
        matrix = _evaluate(net, val_batches, info, normalize, device)
        scores = matrix.compute()
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(images, 1),
            "val_miou": scores["miou"],
            "val_dice": scores["dice"],
            "val_pixel_acc": scores["pixel_acc"],
            **{f"val_iou_{c}": iou for c, iou in zip(info.classes, scores["iou"], strict=True)},
            "epoch_time_s": time.perf_counter() - started,
            "epoch_started_at": epoch_started_at,
            "images_per_s": images / max(train_time, 1e-9),
            "num_params": num_params,
            "lr": scheduler.get_last_lr()[0],
            "startup_s": startup_s,
            "startup_at": dict(timings),
            placement.RESULT_KEY: worker.placement_group,
            **(system.take() if system else {}),
            **cost,
            placement.NODE_KEY: placement.current_node_id(),
        }
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                meta = checkpoint_meta(trial, info, dataset=config["dataset"], epoch=epoch)
                train_state = {
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "epoch": epoch,
                }
                save_checkpoint(
                    Path(tmp),
                    net,
                    meta,
                    metrics=metrics,
                    train_state=train_state,
                    manifest=manifest,
                )
                _write_pictures(Path(tmp), net, config.get("overlay"), scores, info)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            worker.report(metrics, checkpoint)


def _cost_size(trial: TrialConfig, config: dict[str, Any]) -> tuple[int, int]:
    """The image size a trial's cost is measured at: its image_size, else (each image at its own
    size) that of the first overlay image, a validation image."""
    if trial.image_size is not None:
        return tuple(trial.image_size)
    overlay = config.get("overlay") or {}
    if "image" in overlay:
        return tuple(overlay["image"].shape[1:3])
    return COST_FALLBACK_SIZE


class _Normalizer:
    """Scales 0..1 images by the dataset's per-channel mean and std."""

    def __init__(self, info: DatasetInfo, device: torch.device) -> None:
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1).clamp_min(1e-6)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def _batches(
    batches: Iterable[dict[str, np.ndarray]], device: torch.device
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (image float N,C,H,W in 0..1, mask long N,H,W) on `device` from numpy batches."""
    for batch in batches:
        yield _tensors(batch, device)


def _tensors(
    batch: dict[str, np.ndarray], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device)
    mask = torch.from_numpy(np.ascontiguousarray(batch["mask"])).to(device)
    return image.permute(0, 3, 1, 2).float().div_(255), mask.long()


@torch.no_grad()
def _evaluate(
    net: nn.Module,
    batches: Iterable[dict[str, np.ndarray]],
    info: DatasetInfo,
    normalize: _Normalizer,
    device: torch.device,
) -> ConfusionMatrix:
    """The confusion counts of a split at its images' own resolution: where a batch carries
    `native_mask` (a split resized to the trial's size), each image's logits are resized
    (`resize_logits`, as `MaskPredictor` does) to its mask's own size before the argmax, so
    val_miou is the score `segsearch evaluate` gives the checkpoint, not that of shrunk masks."""
    net.eval()
    matrix = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    on_gpu = device.type == "cuda"
    for batch in batches:
        image, mask = _tensors(batch, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = net(normalize(image))
        natives = batch.get("native_mask")
        if natives is None or _already_native(natives, batch["mask"]):
            matrix.update(logits.argmax(1), mask)
            continue
        for one, native in zip(logits, natives, strict=True):
            truth = torch.from_numpy(np.ascontiguousarray(native)).to(device)
            resized = resize_logits(one[None].float(), truth.shape)
            matrix.update(resized.argmax(1)[0], truth)
    matrix.all_reduce()
    return matrix


def _already_native(natives: np.ndarray, masks: np.ndarray) -> bool:
    """Whether every mask was already at the trial's size (nothing resized): then the batch's
    masks are the native ones and its logits need no resize, so it is scored in one step."""
    return natives.dtype != object and natives.shape == masks.shape


def _sum_across_workers(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _make_optimizer(optim: OptimConfig, params: Any) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay
        )
    return torch.optim.AdamW(params, lr=optim.lr, weight_decay=optim.weight_decay)


def _lr_factor(optim: OptimConfig, steps_per_epoch: int, epochs: int):
    """Per-step multiplier of the base lr: linear warmup, then constant, cosine or poly decay."""
    warmup = int(optim.warmup_epochs * steps_per_epoch)
    total = max(steps_per_epoch * epochs, warmup + 1)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min((step - warmup) / (total - warmup), 1.0)
        if optim.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * progress))
        if optim.schedule == "poly":
            return (1 - progress) ** 0.9
        return 1.0

    return factor


def _restore(
    checkpoint: Any, net: nn.Module, optimizer: Any, scheduler: Any
) -> tuple[int, dict[str, Any]]:
    """Load the latest checkpoint of this run, if any: the last finished epoch and its metrics."""
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as directory:
        state, metrics = restore_checkpoint(Path(directory), net)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"]), metrics


@torch.no_grad()
def _write_pictures(
    directory: Path,
    net: nn.Module,
    overlay: dict[str, np.ndarray] | None,
    scores: dict[str, Any],
    info: DatasetInfo,
) -> None:
    """The epoch's overlays (fixed val images | truth | prediction), confusion matrix, IoUs.

    Rank 0 draws them before it reports, so every worker waits: numpy and PIL only, and one
    forward pass without autograd over the handful of overlay images (bench/pictures.py)."""
    if overlay:
        images, masks = overlay["image"], overlay["mask"]
        device = next(net.parameters()).device
        batch = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
        net.eval()
        with torch.inference_mode():
            preds = net(_Normalizer(info, device)(batch)).argmax(1).cpu().numpy()
        picture = render_overlays(
            images, masks, preds, classes=info.classes, ignore_index=info.ignore_index
        )
        Image.fromarray(picture).save(directory / OVERLAYS_FILE)
    plot_confusion(np.asarray(scores["matrix"]), info.classes, directory / CONFUSION_FILE)
    write_class_iou_csv(scores["iou"], info.classes, directory / CLASS_IOU_FILE)
