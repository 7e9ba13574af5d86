"""P1 and P4: what Ray Train costs a trial.

P1: a trial's training throughput (images/s) inside Ray Tune + Ray Train, beside the same model,
data, augmentation and number of steps in a plain PyTorch loop, as a ratio.
P4: seconds from a trial's start to its first training step.

    python bench/overhead.py [--epochs 3] [--size 64] [--width 16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
import pyarrow.parquet as pq
import torch

from segsearch.data.augment import build_augment
from segsearch.data.demo import make_demo_dataset
from segsearch.data.images import decode_image
from segsearch.losses import build_loss
from segsearch.models import build_model
from segsearch.search.tuner import run_search
from segsearch.space import parse_space


def plain_loop(root: str, *, model_cfg: dict, epochs: int, batch_size: int) -> float:
    """Images/s of a plain single-process PyTorch loop over the same decoded training images."""
    table = pq.read_table(f"{root}/train")
    images = np.stack([decode_image(b) for b in table["image"].to_pylist()])
    masks = np.stack([decode_image(b)[..., 0] for b in table["mask"].to_pylist()])
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_model(model_cfg, in_channels=images.shape[-1], num_classes=4)
    loss_fn = build_loss({"kind": "ce"}, num_classes=4)
    augment = build_augment({"flip": True})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    steps = len(images) // batch_size
    model.train()
    started, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for step in range(steps):
            sl = slice(step * batch_size, (step + 1) * batch_size)
            image = torch.from_numpy(images[sl]).permute(0, 3, 1, 2).float().div_(255)
            mask = torch.from_numpy(masks[sl]).long()
            image, mask = augment(image, mask)
            loss = loss_fn(model(image), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            seen += len(image)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=256)
    args = parser.parse_args()
    model_cfg = {"arch": "unet", "depth": 3, "width": args.width}
    batch_size = 16
    with tempfile.TemporaryDirectory() as tmp:
        root = f"{tmp}/demo"
        make_demo_dataset(root, n_train=args.images, n_val=32, size=(args.size, args.size))
        spec = parse_space(
            {
                "name": "overhead",
                "trials": 1,
                "epochs": args.epochs,
                "scheduler": {"kind": "none"},
                "fixed": {
                    "batch_size": batch_size,
                    "image_size": [args.size, args.size],
                    "model": model_cfg,
                    "loss.kind": "ce",
                    "optim.lr": 1e-3,
                    "optim.schedule": "constant",
                    "aug.flip": True,
                },
            }
        )
        result = run_search(
            spec,
            dataset=root,
            storage=f"{tmp}/runs",
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            echo=lambda _: None,
        )
        rows = result.trials[0]["history"]
        in_ray = statistics.median(r["images_per_s"] for r in rows)
        startup = rows[0]["startup_s"]
        plain = plain_loop(root, model_cfg=model_cfg, epochs=args.epochs, batch_size=batch_size)
    print(f"model: U-Net depth 3 width {args.width}, {args.size}x{args.size}, batch {batch_size}")
    print(f"P1 Ray Train images/s (median epoch): {in_ray:.1f}")
    print(f"P1 plain PyTorch images/s:            {plain:.1f}")
    print(f"P1 ratio Ray Train / plain:           {in_ray / plain:.2f}")
    print(f"P4 trial start → first training step: {startup:.1f} s")


if __name__ == "__main__":
    main()
