"""`segsearch predict` images/s against a plain torch forward of the same model on the same images.

The model: a U-Net checkpoint (random weights: speed does not depend on them) written in the
trial checkpoint layout. The images: PNGs in a folder, the demo dataset's kind. `predict` reads,
decodes, resizes, normalises, runs the network, resizes back and writes a PNG per mask; the
plain loop runs only the network (normalised tensors already in memory, batch for batch), so
the ratio is what everything around the forward pass costs (1.0 = nothing).

    python bench/predict.py [--images 256] [--size 64] [--width 16] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from segsearch.checkpoint import save_model
from segsearch.data.demo import generate_demo_samples
from segsearch.models import build_model
from segsearch.serve.predict import predict


def write_images(folder: Path, count: int, size: int) -> list[np.ndarray]:
    folder.mkdir(parents=True)
    images = []
    samples = generate_demo_samples(n=count, size=(size, size), seed=0, split="val")
    for index, (_, _, image, _) in enumerate(samples):
        Image.fromarray(image).save(folder / f"{index:05d}.png")
        images.append(image)
    return images


def plain_forward(net: torch.nn.Module, images: list[np.ndarray], batch_size: int) -> float:
    """Images/s of the network alone over the same images, batch for batch."""
    batches = [
        torch.from_numpy(np.stack(images[i : i + batch_size])).permute(0, 3, 1, 2).float() / 255
        for i in range(0, len(images), batch_size)
    ]
    with torch.no_grad():
        net(batches[0])  # warm-up, as predict's first batch pays for it too
        started = time.perf_counter()
        for batch in batches:
            net(batch).argmax(1)
    return len(images) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = {"arch": "unet", "depth": 3, "width": args.width}
    net = build_model(config, in_channels=3, num_classes=4).eval()
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp, "images"), args.images, args.size)
        meta = {
            "model": config,
            "in_channels": 3,
            "num_classes": 4,
            "classes": ["background", "a", "b", "c"],
            "ignore_index": 255,
            "mean": [0.5, 0.5, 0.5],
            "std": [0.25, 0.25, 0.25],
            "image_size": [args.size, args.size],
        }
        save_model(Path(tmp, "model"), net, meta)
        started = time.perf_counter()
        count = predict(
            str(Path(tmp, "model")),
            str(Path(tmp, "images")),
            str(Path(tmp, "out")),
            batch_size=args.batch_size,
            device="cpu",
        )
        served = count / (time.perf_counter() - started)
    plain = plain_forward(net, images, args.batch_size)
    print(
        f"model: U-Net depth 3 width {args.width}, {args.size}x{args.size}, batch {args.batch_size}"
    )
    print(f"segsearch predict (files in, PNG masks out): {served:.1f} images/s")
    print(f"plain torch forward:                         {plain:.1f} images/s")
    print(f"predict ratio predict / plain:               {served / plain:.2f}")


if __name__ == "__main__":
    main()
