"""Image and mask files paired by stem, split into train and val, and checked from their headers.

A pre-split layout (train/ and val/ under both folders) is kept as is; otherwise a seeded fraction
of the pairs becomes the val split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segsearch.data.format import REQUIRED_SPLITS
from segsearch.data.images import IMAGE_SUFFIXES, image_header
from segsearch.data.messages import and_more
from segsearch.errors import UserError


@dataclass(frozen=True)
class Pair:
    """One image file and its mask file, and the split and id they get in the dataset."""

    split: str
    id: str
    image: Path
    mask: Path


def pair_files(images: Path, masks: Path, *, val_fraction: float, seed: int) -> list[Pair]:
    """Pair files by stem; keep a train/ + val/ layout, else split off a seeded val fraction."""
    for folder in (images, masks):
        if not folder.is_dir():
            raise UserError(f"{folder}: not a folder")
    if (images / "train").is_dir():
        splits = sorted(p.name for p in images.iterdir() if p.is_dir() and _image_files(p))
        if _image_files(images):
            raise UserError(
                f"{images}: has both images and split folders; keep images in train/ and val/"
            )
        for split in REQUIRED_SPLITS:
            if split not in splits:
                raise UserError(f"{images / split}: missing or empty (pre-split layout)")
        pairs = []
        for split in splits:
            if not (masks / split).is_dir():
                raise UserError(f"{masks / split}: missing (images has a {split}/ folder)")
            pairs += [
                Pair(split, stem, image, mask)
                for stem, image, mask in _match(images / split, masks / split)
            ]
        return pairs
    matched = _match(images, masks)
    if len(matched) < 2:
        raise UserError(f"{images}: need at least 2 image/mask pairs for a train and a val split")
    order = np.random.default_rng(seed).permutation(len(matched))
    n_val = min(max(1, round(val_fraction * len(matched))), len(matched) - 1)
    val = set(order[:n_val].tolist())
    return [
        Pair("val" if i in val else "train", stem, image, mask)
        for i, (stem, image, mask) in enumerate(matched)
    ]


def _match(images: Path, masks: Path) -> list[tuple[str, Path, Path]]:
    image_files, mask_files = _by_stem(images), _by_stem(masks)
    if not image_files:
        raise UserError(f"{images}: no images ({', '.join(IMAGE_SUFFIXES)})")
    lonely_images = sorted(set(image_files) - set(mask_files))
    if lonely_images:
        raise UserError(
            f"{image_files[lonely_images[0]]}: image without mask in {masks}"
            + and_more(len(lonely_images))
        )
    lonely_masks = sorted(set(mask_files) - set(image_files))
    if lonely_masks:
        raise UserError(
            f"{mask_files[lonely_masks[0]]}: mask without image in {images}"
            + and_more(len(lonely_masks))
        )
    return [(stem, image_files[stem], mask_files[stem]) for stem in sorted(image_files)]


def _by_stem(folder: Path) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _image_files(folder):
        if path.stem in found:
            raise UserError(f"{path}: same name as {found[path.stem].name}; stems must be unique")
        found[path.stem] = path
    return found


def _image_files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def check_headers(pairs: list[Pair]) -> int:
    """Sizes and readability from file headers before writing; returns the dataset's channels."""
    channels = 1
    for pair in pairs:
        height, width, image_channels = image_header(pair.image)
        mask_height, mask_width, _ = image_header(pair.mask)
        if (height, width) != (mask_height, mask_width):
            raise UserError(
                f"{pair.mask}: mask size {mask_width}×{mask_height} differs from image "
                f"{pair.image.name} size {width}×{height}"
            )
        channels = max(channels, image_channels)
    return channels
