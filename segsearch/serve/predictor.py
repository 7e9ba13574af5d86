"""`MaskPredictor`: a trained network with its preprocessing, uint8 images in, class ids out."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segsearch.errors import UserError


class MaskPredictor(nn.Module):
    """uint8 images (N,H,W,C) → class ids (N,H,W): resize, normalise, net, resize back, argmax.

    The same module serves `segsearch predict` and the model logged to MLflow, so the registry's
    pyfunc and the CLI turn an image into the same mask.
    """

    def __init__(self, net: nn.Module, meta: dict[str, Any]) -> None:
        super().__init__()
        self.net = net
        channels = int(meta["in_channels"])
        self.register_buffer(
            "mean", torch.tensor(meta["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        )
        std = torch.tensor(meta["std"], dtype=torch.float32).clamp_min(1e-6)
        self.register_buffer("std", std.view(1, -1, 1, 1))
        if self.mean.shape[1] != channels or self.std.shape[1] != channels:
            raise UserError(f"trial.json: mean/std need {channels} values (in_channels)")
        size = meta.get("image_size")
        self.size: tuple[int, int] | None = (int(size[0]), int(size[1])) if size else None
        self.channels = channels
        self.num_classes = int(meta["num_classes"])

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N,H,W,C → normalised float N,C,h,w at the trained image size.

        Antialiased bilinear, like the PIL resize that fed training (segsearch.data.ray_data).
        """
        batch = images.permute(0, 3, 1, 2).float() / 255.0
        if self.size is not None:
            batch = F.interpolate(
                batch, size=self.size, mode="bilinear", align_corners=False, antialias=True
            )
        return (batch - self.mean) / self.std

    def resize(self, logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        """Logits N,K,h,w → N,K,H,W at the input's size (`resize_logits`).

        Always resized, even to the same size (an exact copy), so that torch.export sees no
        branch on the input's height and width.
        """
        return resize_logits(logits, size)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 N,H,W,C → logits N,K,H,W at the input's size: what the argmax is taken of."""
        return self.resize(self.net(self.prepare(images)), images.shape[1:3])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits(images).argmax(1)

    def masks(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class-id masks (H,W uint8) of images that share a network input shape (one batch)."""
        return predict_masks(self, images)

    def input_shape(self, image: np.ndarray) -> tuple[int, ...]:
        """The network input shape for one image: images with equal ones can share a batch."""
        return self.size if self.size is not None else image.shape[:2]


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Logits N,K,h,w → N,K,H,W (bilinear): how a prediction reaches its mask's own size, the
    same for a trial's val scores (search/train.py) as for `predict` and `evaluate`."""
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


@torch.no_grad()
def predict_masks(predictor: MaskPredictor, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Class-id masks (H,W uint8) for images that share a network input shape, in one batch."""
    return [
        logits.argmax(0).to(torch.uint8).cpu().numpy()
        for logits in predict_logits(predictor, images)
    ]


@torch.no_grad()
def predict_logits(predictor: MaskPredictor, images: Sequence[np.ndarray]) -> list[torch.Tensor]:
    """Logits K,H,W of each image at its own size (on the predictor's device), for images that
    share a network input shape, in one batch."""
    device = predictor.mean.device
    tensors = [
        torch.from_numpy(np.array(fit_channels(image, predictor.channels))) for image in images
    ]
    inputs = torch.cat([predictor.prepare(t[None].to(device)) for t in tensors])
    logits = predictor.net(inputs)
    return [
        predictor.resize(logits[index : index + 1], image.shape[:2])[0]
        for index, image in enumerate(images)
    ]


def fit_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """Gray for a colour model is repeated to 3 channels; colour for a gray model becomes luma."""
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image, 3, axis=2)
    luma = image[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    return np.rint(luma).clip(0, 255).astype(np.uint8)[..., None]
