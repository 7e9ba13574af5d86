"""One trial's training: `train_loop_per_worker` runs on every Ray Train worker (DDP)."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from torch import nn

from segsearch.checkpoint import (
    CLASS_IOU_FILE,
    CONFUSION_FILE,
    OVERLAYS_FILE,
    checkpoint_meta,
    restore_checkpoint,
    save_checkpoint,
    unwrap,
)
from segsearch.config import OptimConfig, TrialConfig
from segsearch.data.augment import build_augment
from segsearch.data.format import DatasetInfo
from segsearch.errors import UserError, last_line
from segsearch.losses import build_loss
from segsearch.metrics import ConfusionMatrix
from segsearch.models import build_model, count_parameters
from segsearch.search import placement
from segsearch.visualize import plot_confusion, render_overlays, write_class_iou_csv


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train one trial's model; report metrics and a checkpoint every epoch (rank 0 writes it).

    `config` holds `trial` (the TrialConfig), `dataset_info` (the DatasetInfo), `dataset` (its
    URI), `overlay` (a few fixed validation images and masks at the trial's image size, for
    pictures) and `launched_at` (wall-clock time the trial started, to report start-up time).
    """
    import ray.train
    import ray.train.torch

    trial: TrialConfig = config["trial"]
    info: DatasetInfo = config["dataset_info"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    on_gpu = device.type == "cuda"
    torch.manual_seed(trial.seed + rank)

    model = build_model(trial.model, in_channels=info.channels, num_classes=info.num_classes)
    num_params = count_parameters(model)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    model = ray.train.torch.prepare_model(model)
    net = unwrap(model)  # the plain module: where only some ranks run forward (no collectives)
    loss_fn = build_loss(
        trial.loss,
        num_classes=info.num_classes,
        ignore_index=info.ignore_index,
        class_pixel_counts=info.class_pixel_counts,
    )
    augment = build_augment(trial.aug, ignore_index=info.ignore_index)
    steps_per_epoch = max(1, info.splits["train"] // (world * trial.batch_size))
    optimizer = _make_optimizer(trial.optim, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(trial.optim, steps_per_epoch, trial.epochs)
    )
    restored = ray.train.get_checkpoint()
    start_epoch, last_metrics = _restore(restored, net, optimizer, scheduler)
    if start_epoch >= trial.epochs:
        # The run had finished when its trial was interrupted: report its result again, so the
        # resumed trial ends with its metrics and checkpoint instead of an empty result.
        ray.train.report(last_metrics, checkpoint=restored if rank == 0 else None)
        return
    normalize = _Normalizer(info, device)
    generator = torch.Generator(device=device).manual_seed(trial.seed * 1000 + rank)
    startup_s = None

    for epoch in range(start_epoch + 1, trial.epochs + 1):
        started = time.perf_counter()
        model.train()
        loss_sum, images = 0.0, 0
        for image, mask in _batches(ray.train.get_dataset_shard("train"), trial, device, True):
            if startup_s is None:
                startup_s = time.time() - config["launched_at"]
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
        train_time = time.perf_counter() - started
        loss_sum, images = _sum_across_workers([loss_sum, images], device)

        matrix = _evaluate(net, ray.train.get_dataset_shard("val"), trial, info, normalize, device)
        scores = matrix.compute()
        metrics = {
            "epoch": epoch,
            "train_loss": loss_sum / max(images, 1),
            "val_miou": scores["miou"],
            "val_dice": scores["dice"],
            "val_pixel_acc": scores["pixel_acc"],
            **{f"val_iou_{c}": iou for c, iou in zip(info.classes, scores["iou"], strict=True)},
            "epoch_time_s": time.perf_counter() - started,
            "images_per_s": images / max(train_time, 1e-9),
            "num_params": num_params,
            "lr": scheduler.get_last_lr()[0],
            "startup_s": startup_s,
            placement.RESULT_KEY: placement.current_group_id(),
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
                save_checkpoint(Path(tmp), net, meta, metrics=metrics, train_state=train_state)
                _write_pictures(Path(tmp), net, config.get("overlay"), scores, info)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


class _Normalizer:
    """Scales 0..1 images by the dataset's per-channel mean and std."""

    def __init__(self, info: DatasetInfo, device: torch.device) -> None:
        self.mean = torch.tensor(info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(info.std, device=device).view(1, -1, 1, 1).clamp_min(1e-6)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return (image - self.mean) / self.std


def _batches(
    shard: Any, trial: TrialConfig, device: torch.device, training: bool
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (image float N,C,H,W in 0..1, mask long N,H,W) on `device` from a Ray Data shard."""
    batches = shard.iter_batches(
        batch_size=trial.batch_size,
        batch_format="numpy",
        drop_last=training,
        local_shuffle_buffer_size=4 * trial.batch_size if training else None,
        local_shuffle_seed=trial.seed if training else None,
    )
    for batch in _data_stream(batches):
        image = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(device)
        mask = torch.from_numpy(np.ascontiguousarray(batch["mask"])).to(device)
        yield image.permute(0, 3, 1, 2).float().div_(255), mask.long()


def _data_stream(batches: Any) -> Iterator[dict[str, np.ndarray]]:
    """The shard's batches; a failure to read or decode them is the data's (Ray Data already
    retried its tasks), so it becomes a one-line UserError that fails the trial, never retried."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            raise UserError(f"reading the data failed: {last_line(err)}") from None
        yield batch


@torch.no_grad()
def _evaluate(
    net: nn.Module,
    shard: Any,
    trial: TrialConfig,
    info: DatasetInfo,
    normalize: _Normalizer,
    device: torch.device,
) -> ConfusionMatrix:
    net.eval()
    matrix = ConfusionMatrix(info.num_classes, ignore_index=info.ignore_index)
    on_gpu = device.type == "cuda"
    for image, mask in _batches(shard, trial, device, False):
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=on_gpu):
            logits = net(normalize(image))
        matrix.update(logits.argmax(1), mask)
    matrix.all_reduce()
    return matrix


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
    """The epoch's overlays (fixed val images | truth | prediction), confusion matrix, IoUs."""
    if overlay:
        images, masks = overlay["image"], overlay["mask"]
        device = next(net.parameters()).device
        batch = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
        net.eval()
        preds = net(_Normalizer(info, device)(batch)).argmax(1).cpu().numpy()
        picture = render_overlays(
            images, masks, preds, classes=info.classes, ignore_index=info.ignore_index
        )
        Image.fromarray(picture).save(directory / OVERLAYS_FILE)
    plot_confusion(np.asarray(scores["matrix"]), info.classes, directory / CONFUSION_FILE)
    write_class_iou_csv(scores["iou"], info.classes, directory / CLASS_IOU_FILE)
