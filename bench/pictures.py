"""What a trial's per-epoch pictures cost rank 0: overlays (a forward pass on the fixed validation
images + blending), the confusion picture and the class IoU table, written into a checkpoint
folder as `train.py` does after every epoch. Median over repeats, in ms.

    python bench/pictures.py [--repeats 20]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from segsearch.data.format import DatasetInfo
from segsearch.metrics import ConfusionMatrix
from segsearch.models import build_model
from segsearch.search.train import _write_pictures

#: (name, classes, image size, model): the demo search's scale and an 11-class street scene.
CASES = (
    ("demo: 4 classes, 48x48, unet w16", 4, (48, 48), {"arch": "unet", "depth": 3, "width": 16}),
    ("street: 11 classes, 96x128, unet w32", 11, (96, 128), {"arch": "unet", "width": 32}),
)
OVERLAY_IMAGES = 4


def case_ms(num_classes: int, size: tuple[int, int], model_cfg: dict, repeats: int) -> float:
    classes = tuple(f"class_{i}" for i in range(num_classes))
    info = DatasetInfo(
        classes=classes,
        ignore_index=255,
        splits={"train": 1, "val": 1},
        class_pixel_counts=(1,) * num_classes,
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        channels=3,
    )
    rng = np.random.default_rng(0)
    overlay = {
        "image": rng.integers(0, 256, (OVERLAY_IMAGES, *size, 3), dtype=np.uint8),
        "mask": rng.integers(0, num_classes, (OVERLAY_IMAGES, *size), dtype=np.uint8),
    }
    net = build_model(model_cfg, in_channels=3, num_classes=num_classes)
    matrix = ConfusionMatrix(num_classes, ignore_index=255)
    matrix.update(
        torch.randint(0, num_classes, (2, *size)), torch.randint(0, num_classes, (2, *size))
    )
    scores = matrix.compute()
    times = []
    for _ in range(repeats + 1):
        with tempfile.TemporaryDirectory() as tmp:
            started = time.perf_counter()
            _write_pictures(Path(tmp), net, overlay, scores, info)
            times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name, num_classes, size, model_cfg in CASES:
        print(f"{name}: {case_ms(num_classes, size, model_cfg, args.repeats):.1f} ms per epoch")


if __name__ == "__main__":
    main()
