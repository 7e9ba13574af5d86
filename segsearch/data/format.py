"""The dataset format: Parquet shards per split plus dataset.json, the contract with training.

```
<root>/dataset.json                      written last: without it a dataset is incomplete
<root>/<split>/part-<token>-00000.parquet  id, image (PNG/JPEG), mask (PNG of class ids),
                                           height, width; <token> is unique to one ingest
```
dataset.json (format segsearch/v3) lists each split's shards, so an ingest can write a new
dataset beside the old one and switch by replacing dataset.json alone: a reader sees the old
dataset or the new one, never a mix. It also records, per class, in how many train images the
class occurs and the labelled pixels of those images: median frequency class weights need them.

Older formats still load. segsearch/v2 lacks the image presence (`class_image_counts` and
`class_image_pixels` are None): every use but median weighting works, and that one asks for a
re-ingest, since recovering presence means decoding every train mask. segsearch/v1 also lists
no shards; its shards are the `part-NNNNN.parquet` files of each split folder.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs

from segsearch.data.storage import display_path, filesystem_for, join, storage_errors
from segsearch.errors import UserError
from segsearch.values import is_integer, is_number

FORMAT = "segsearch/v3"
#: Written before dataset.json recorded the images each class occurs in.
FORMAT_V2 = "segsearch/v2"
#: Written before shards were listed in dataset.json: read by listing the split folders.
FORMAT_V1 = "segsearch/v1"
#: dataset.json's per-class image presence (format v3): train images, and their labelled pixels.
PRESENCE_FIELDS = ("class_image_counts", "class_image_pixels")
INFO_FILE = "dataset.json"
#: dataset.json's list of shard files per split (format v2).
SHARDS_FIELD = "shards"
REQUIRED_SPLITS = ("train", "val")
#: A shard of a v1 dataset.
V1_SHARD_PATTERN = re.compile(r"^part-\d{5}\.parquet$")
#: A shard of any ingest, finished or not (v1 names and v2 names with an ingest token).
SHARD_PATTERN = re.compile(r"^part-(?:[0-9a-f]{12}-)?\d{5}\.parquet$")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("image", pa.binary()),
        ("mask", pa.binary()),
        ("height", pa.int32()),
        ("width", pa.int32()),
    ]
)


@dataclass(frozen=True)
class DatasetInfo:
    """What dataset.json says: everything a trial needs to know before it reads a pixel."""

    classes: tuple[str, ...]
    ignore_index: int
    splits: Mapping[str, int]
    class_pixel_counts: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    #: split → shard paths relative to the dataset's root; None for a v1 dataset.
    shards: Mapping[str, tuple[str, ...]] | None = None
    #: per class, the train images where it occurs; None before format v3.
    class_image_counts: tuple[int, ...] | None = None
    #: per class, the labelled pixels of the train images where it occurs; None before v3.
    class_image_pixels: tuple[int, ...] | None = None
    format: str = field(default=FORMAT)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        data = {
            "format": self.format,
            "classes": list(self.classes),
            "ignore_index": self.ignore_index,
            "channels": self.channels,
            "splits": dict(self.splits),
            "class_pixel_counts": list(self.class_pixel_counts),
            "mean": list(self.mean),
            "std": list(self.std),
        }
        if self.class_image_counts is not None and self.class_image_pixels is not None:
            data["class_image_counts"] = list(self.class_image_counts)
            data["class_image_pixels"] = list(self.class_image_pixels)
        if self.shards is not None:
            data[SHARDS_FIELD] = {split: list(paths) for split, paths in self.shards.items()}
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, *, source: str = INFO_FILE) -> DatasetInfo:
        """Validate every field; a bad one fails with a UserError naming `source` and the field."""
        return _parse(data, source)

    @classmethod
    def from_json(cls, text: str, *, source: str = INFO_FILE) -> DatasetInfo:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise UserError(f"{source} is not valid JSON: {err}") from None
        return _parse(data, source)


def read_dataset_info(uri: str) -> DatasetInfo:
    """Read and validate `<uri>/dataset.json`; the one place everything else gets metadata from."""
    fs, root = filesystem_for(uri)
    return _read_info(fs, root, uri.rstrip("/"))


def shard_paths(
    fs: pafs.FileSystem, root: str, split: str, *, info: DatasetInfo | None = None
) -> list[str]:
    """The shard files of one split, in order (filesystem paths): those dataset.json lists, or
    for a v1 dataset the split folder's part-NNNNN.parquet files. Pass the `info` already read,
    so the shards belong to that dataset.json even while an ingest replaces it."""
    if info is None:
        info = _read_info(fs, root, display_path(fs, root))
    if info.shards is not None:
        return [join(root, path) for path in info.shards.get(split, ())]
    selector = pafs.FileSelector(join(root, split), allow_not_found=True)
    files = fs.get_file_info(selector)
    return sorted(
        f.path
        for f in files
        if f.type == pafs.FileType.File and V1_SHARD_PATTERN.match(f.base_name)
    )


def _read_info(fs: pafs.FileSystem, root: str, uri: str) -> DatasetInfo:
    try:
        with storage_errors(uri), fs.open_input_stream(join(root, INFO_FILE)) as stream:
            text = stream.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(f"no dataset at {uri} ({INFO_FILE} missing: incomplete ingest?)") from None
    return DatasetInfo.from_json(text, source=f"{uri}/{INFO_FILE}")


def _parse(data: Any, source: str) -> DatasetInfo:
    def bad(name: str, rule: str) -> UserError:
        value = data.get(name, "<missing>") if isinstance(data, dict) else data
        return UserError(f"{source}: field {name!r} {rule}, got {_short(value)}")

    if not isinstance(data, dict):
        raise UserError(f"{source}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") not in (FORMAT, FORMAT_V2, FORMAT_V1):
        raise bad(
            "format",
            f"must be {FORMAT!r}, {FORMAT_V2!r} or {FORMAT_V1!r} (the formats segsearch reads)",
        )
    classes = data.get("classes")
    if (
        not isinstance(classes, list)
        or not classes
        or not all(isinstance(c, str) and c for c in classes)
        or len(set(classes)) != len(classes)
    ):
        raise bad("classes", "must be a non-empty list of distinct non-empty names")
    ignore_index = data.get("ignore_index")
    if not is_integer(ignore_index) or not len(classes) <= ignore_index <= 255:
        raise bad("ignore_index", f"must be an integer in {len(classes)}..255 (not a class id)")
    channels = data.get("channels")
    if channels not in (1, 3) or isinstance(channels, bool):
        raise bad("channels", "must be 1 or 3")
    splits = data.get("splits")
    if (
        not isinstance(splits, dict)
        or not all(isinstance(k, str) and k and is_integer(v) and v >= 0 for k, v in splits.items())
        or not all(splits.get(name, 0) > 0 for name in REQUIRED_SPLITS)
    ):
        raise bad("splits", "must map split names to image counts, with train and val non-empty")
    counts = data.get("class_pixel_counts")
    if (
        not isinstance(counts, list)
        or len(counts) != len(classes)
        or not all(is_integer(c) and c >= 0 for c in counts)
    ):
        raise bad("class_pixel_counts", f"must be {len(classes)} non-negative integers")
    mean = data.get("mean")
    if not _floats(mean, channels) or not all(0 <= m <= 1 for m in mean):
        raise bad("mean", f"must be {channels} numbers in 0..1")
    std = data.get("std")
    if not _floats(std, channels) or not all(0 <= s <= 1 for s in std):
        raise bad("std", f"must be {channels} numbers in 0..1")
    return DatasetInfo(
        classes=tuple(classes),
        ignore_index=ignore_index,
        splits=dict(splits),
        class_pixel_counts=tuple(counts),
        mean=tuple(float(m) for m in mean),
        std=tuple(float(s) for s in std),
        channels=channels,
        shards=_parse_shards(data, splits, bad) if data["format"] != FORMAT_V1 else None,
        format=data["format"],
        **(_parse_presence(data, counts, splits["train"], bad) if data["format"] == FORMAT else {}),
    )


def _parse_presence(
    data: dict[str, Any], counts: list[int], train_images: int, bad: Callable[[str, str], UserError]
) -> dict[str, tuple[int, ...]]:
    """v3's image presence: a class occurs in some train image exactly when it has pixels; its
    images hold at least its own pixels and at most all labelled pixels."""
    images, pixels = data.get("class_image_counts"), data.get("class_image_pixels")
    if not _counts(images, counts) or not all(n <= train_images for n in images):
        raise bad(
            "class_image_counts",
            f"must be {len(counts)} train image counts ≤ {train_images}, 0 exactly where "
            "class_pixel_counts is",
        )
    total = sum(counts)
    if not _counts(pixels, counts) or not all(
        n <= p <= total for n, p in zip(counts, pixels, strict=True)
    ):
        raise bad(
            "class_image_pixels",
            f"must be {len(counts)} pixel counts, each between the class's own pixels and all "
            f"{total} labelled pixels, 0 exactly where class_pixel_counts is",
        )
    return {"class_image_counts": tuple(images), "class_image_pixels": tuple(pixels)}


def _counts(value: Any, counts: list[int]) -> bool:
    """A list of non-negative integers, one per class, zero exactly where `counts` is."""
    return (
        isinstance(value, list)
        and len(value) == len(counts)
        and all(
            is_integer(v) and v >= 0 and (v > 0) == (n > 0)
            for v, n in zip(value, counts, strict=True)
        )
    )


def _parse_shards(
    data: dict[str, Any], splits: dict[str, int], bad: Callable[[str, str], UserError]
) -> dict[str, tuple[str, ...]]:
    """v2's shard lists: relative paths inside the split's folder, one list per split."""
    shards = data.get(SHARDS_FIELD)
    if not isinstance(shards, dict) or set(shards) != set(splits):
        raise bad("shards", "must map every split to the list of its shard files")
    for split, paths in shards.items():
        if (
            not isinstance(paths, list)
            or (splits[split] > 0) != bool(paths)
            or not all(_is_shard_path(path, split) for path in paths)
        ):
            raise bad("shards", f"must list {split!r}'s shards as '{split}/part-....parquet'")
    return {split: tuple(paths) for split, paths in shards.items()}


def _is_shard_path(path: Any, split: str) -> bool:
    if not isinstance(path, str):
        return False
    folder, _, name = path.partition("/")
    return folder == split and SHARD_PATTERN.match(name) is not None


def _floats(value: Any, length: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == length
        and all(is_number(v) and math.isfinite(v) for v in value)
    )


def _short(value: Any) -> str:
    text = value if value == "<missing>" else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
