"""Masks from a trained model: images in, one PNG of class ids per image out, the input's size.

The model comes from the registry (models:/NAME@alias, models:/NAME/3), a run (runs:/ID/model)
or a checkpoint directory (local or s3://); the images from a folder (local or s3://) or a
segsearch Parquet dataset. Each image is resized to the size the model was trained at, normalised
with the training mean/std, and the logits are resized back (bilinear) before the argmax.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

from segsearch.checkpoint import load_model
from segsearch.errors import UserError, first_line
from segsearch.serve.mlflow_model import load_logged_model
from segsearch.visualize import overlay as blend

MASKS_DIR = "masks"
OVERLAYS_DIR = "overlays"

T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One image to segment; `name` is the output path relative to OUTPUT, without suffix."""

    name: str
    image: np.ndarray


def load_network(
    model_uri: str, *, tracking_uri: str | None = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The network (eval mode) and trial.json of models:/…, runs:/… or a checkpoint directory."""
    if model_uri.startswith(("models:/", "runs:/")):
        return load_logged_model(model_uri, tracking_uri=tracking_uri)
    return load_model(model_uri)


def predict(
    model_uri: str | Sequence[str],
    source: str,
    dest: str,
    *,
    overlay: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    tracking_uri: str | None = None,
) -> int:
    """Write DEST/masks/<name>.png (and DEST/overlays/<name>.png) per input image; the count.

    Several model URIs predict as an ensemble (segsearch.serve.ensemble): their softmax
    probabilities are averaged at each image's own size.
    """
    from segsearch.serve.ensemble import load_models

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    target = pick_device(device)
    items = iter_inputs(source)
    first = next(items, None)
    if first is None:
        raise UserError(f"no images in {source} (PNG, JPEG or TIFF files, or a segsearch dataset)")
    uris = [model_uri] if isinstance(model_uri, str) else list(model_uri)
    predictor, _ = load_models(uris, tracking_uri=tracking_uri)
    predictor = predictor.to(target)
    writer = _Writer(dest)
    count = 0
    inputs = _chain(first, items)
    for batch in shape_batches(inputs, lambda item: predictor.input_shape(item.image), batch_size):
        for item, mask in zip(batch, predictor.masks([i.image for i in batch]), strict=True):
            writer.write(posixpath.join(MASKS_DIR, item.name + ".png"), mask)
            if overlay:
                picture = blend(item.image, mask, num_classes=predictor.num_classes)
                writer.write(posixpath.join(OVERLAYS_DIR, item.name + ".png"), picture)
            count += 1
    return count


def pick_device(name: str) -> torch.device:
    """auto → cuda when there is a GPU, else cpu; asking for cuda without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to torch; use --device cpu")
    if name not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def iter_inputs(source: str) -> Iterator[Item]:
    """Images of a folder (recursive, local or s3://) or every split of a segsearch dataset."""
    import pyarrow.fs as pafs

    from segsearch.data.format import INFO_FILE
    from segsearch.data.storage import filesystem_for, join, storage_errors

    filesystem, root = filesystem_for(source)
    with storage_errors(source):
        kind = filesystem.get_file_info(root).type
        has_info = kind == pafs.FileType.Directory and (
            filesystem.get_file_info(join(root, INFO_FILE)).type == pafs.FileType.File
        )
    if kind != pafs.FileType.Directory:
        raise UserError(f"input {source} is not a folder of images or a segsearch dataset")
    if has_info:
        return _dataset_items(source)
    return _folder_items(source, filesystem, root)


def _folder_items(source: str, filesystem: Any, root: str) -> Iterator[Item]:
    import pyarrow.fs as pafs

    from segsearch.data.images import IMAGE_SUFFIXES
    from segsearch.data.storage import storage_errors

    with storage_errors(source):
        infos = filesystem.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(
        info.path
        for info in infos
        if info.type == pafs.FileType.File and info.base_name.lower().endswith(IMAGE_SUFFIXES)
    )
    names: dict[str, str] = {}
    for path in files:
        name = posixpath.splitext(posixpath.relpath(path, root))[0]
        if name in names:
            raise UserError(
                f"{names[name]} and {path} would both write {name}.png; rename one of them"
            )
        names[name] = path
    for name, path in names.items():
        with storage_errors(source), filesystem.open_input_stream(path) as stream:
            data = stream.read()
        yield Item(name, _decode(data, path))


def _dataset_items(source: str) -> Iterator[Item]:
    from segsearch.data.format import read_dataset_info

    info = read_dataset_info(source)
    for split in info.splits:
        for where, row in split_rows(source, split, columns=("id", "image")):
            sample_id = row["id"]
            if sample_id.startswith("/") or ".." in sample_id.split("/"):
                raise UserError(f"{where}: not a safe file name")
            yield Item(posixpath.join(split, sample_id), _decode(row["image"], where))


def split_rows(
    source: str, split: str, *, columns: Sequence[str]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """Rows of one split of a dataset as dicts of `columns` (`id` included), in shard order.

    Each comes with where it was read (`<shard> id '<id>'`) for error messages. Read in batches
    of 64 rows, so a split of any size streams.
    """
    import pyarrow.parquet as pq

    from segsearch.data.format import shard_paths
    from segsearch.data.storage import filesystem_for, storage_errors

    filesystem, root = filesystem_for(source)
    names = list(dict.fromkeys(["id", *columns]))
    with storage_errors(source):
        shards = shard_paths(filesystem, root, split)
    for shard in shards:
        with storage_errors(source), filesystem.open_input_file(shard) as handle:
            for table in pq.ParquetFile(handle).iter_batches(batch_size=64, columns=names):
                for row in table.to_pylist():
                    yield f"{shard} id {row['id']!r}", row


def _decode(data: bytes, where: str) -> np.ndarray:
    from segsearch.data.images import decode_image

    try:
        return decode_image(data)
    except UserError:
        raise
    except Exception as err:
        raise UserError(f"{where}: unreadable image ({first_line(err)})") from None


def _chain(first: Item, rest: Iterable[Item]) -> Iterator[Item]:
    yield first
    yield from rest


def shape_batches(
    items: Iterable[T], shape: Callable[[T], tuple[int, ...]], size: int
) -> Iterator[list[T]]:
    """Runs of up to `size` consecutive items of one `shape` (their network input shape).

    A model with a trained image_size takes full batches whatever the images' sizes; one run at
    native size batches each run of equal sizes and holds at most one batch in memory.
    """
    batch: list[T] = []
    for item in items:
        if batch and (len(batch) == size or shape(item) != shape(batch[0])):
            yield batch
            batch = []
        batch.append(item)
    if batch:
        yield batch


class _Writer:
    """PNG files under a local or s3:// destination, creating folders as needed."""

    def __init__(self, dest: str) -> None:
        from segsearch.data.storage import filesystem_for

        self.dest = dest
        self.filesystem, self.root = filesystem_for(dest)
        self._made: set[str] = set()

    def write(self, relative: str, array: np.ndarray) -> None:
        from segsearch.data.images import encode_png
        from segsearch.data.storage import join, storage_errors

        path = join(self.root, relative)
        parent = posixpath.dirname(path)
        with storage_errors(self.dest):
            if parent not in self._made:
                self.filesystem.create_dir(parent, recursive=True)
                self._made.add(parent)
            with self.filesystem.open_output_stream(path) as stream:
                stream.write(encode_png(array))
