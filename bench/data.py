"""Data throughput: decode per CPU core against its limit, epochs from S3, cores to feed a GPU.

Ingests a real dataset (default ../shared/data/isbi2012-membrane: 512² grayscale PNG) with
segsearch into a moto S3 server started here, twice: its PNGs as they are, and the same pictures
as JPEG (quality 90), each repeated --copies times. Prints images/s:
- decode per CPU core (images per CPU-second of one process, so other load does not count):
  segsearch's decode of a row group (`decode_row_group`: image and mask, resized to 256² and
  512², JPEG through PIL's draft when shrinking) against the limit, a plain loop of pyarrow
  (read the same local shards) + PIL (open, draft, resize, np.asarray);
- a search's epochs from S3 at --size: epoch 1 (decode once into Ray's object store, all CPUs)
  against later epochs (batches gathered from the object store), and the stream of Ray Data that
  decodes every epoch (what a search falls back to when the data does not fit);
- the CPU cores a node needs to feed one GPU at --gpu-rate images/s with a 3× margin, when every
  epoch is decoded (streamed) and when only the first is (cached).

    python bench/data.py [--data DIR] [--copies 4] [--size 256] [--batch 8] [--epochs 4]
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from segsearch.data.format import shard_paths
from segsearch.data.ray_data import decode_row_group, split_stream
from segsearch.data.shards import open_dataset
from segsearch.data.storage import filesystem_for
from segsearch.data.trial_data import SearchData

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-membrane"
MARGIN = 3


def start_s3() -> str:
    """moto's S3 server on 127.0.0.1 and the standard AWS variables pointing at it."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench-secret",
        AWS_REGION="us-east-1",
    )
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-data")
    return "s3://bench-data"


def picture_folder(data: Path, out: Path, fmt: str, copies: int) -> tuple[Path, Path]:
    """images/ and masks/ of `data`, each picture `copies` times, images saved as `fmt`."""
    images, masks = out / fmt / "images", out / fmt / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    for source in sorted((data / "images").glob("*.png")):
        picture = Image.open(source)
        for copy in range(copies):
            name = f"{copy}-{source.stem}"
            if fmt == "jpeg":
                picture.save(images / f"{name}.jpg", quality=90)
            else:
                shutil.copy(source, images / f"{name}.png")
            shutil.copy(data / "masks" / source.name, masks / f"{name}.png")
    return images, masks


def local_copy(uri: str) -> str:
    """The dataset's shards and dataset.json copied to a local folder (decode without S3)."""
    local = tempfile.mkdtemp(prefix="segsearch-bench-")
    s3, root = filesystem_for(uri)
    pafs.copy_files(
        root, local, source_filesystem=s3, destination_filesystem=pafs.LocalFileSystem()
    )
    return local


def segsearch_decode(local: str, size: tuple[int, int], channels: int) -> float:
    """images per CPU-second of segsearch's own decoding of every train row group."""
    opened = open_dataset(local)
    fs = pafs.LocalFileSystem()
    started, images = time.process_time(), 0
    for unit in opened.units["train"]:
        images += len(decode_row_group(unit, filesystem=fs, channels=channels, size=size)["id"])
    return images / (time.process_time() - started)


def plain_decode(local: str, size: tuple[int, int]) -> float:
    """images per CPU-second of pyarrow + PIL in a plain loop: the limit of one core."""
    wanted = (size[1], size[0])
    started, images = time.process_time(), 0
    for path in shard_paths(pafs.LocalFileSystem(), local, "train"):
        table = pq.read_table(path, columns=["image", "mask"])
        for image_bytes, mask_bytes in zip(
            table.column("image").to_pylist(), table.column("mask").to_pylist(), strict=True
        ):
            with Image.open(io.BytesIO(image_bytes)) as picture:
                picture.draft(picture.mode, wanted)
                np.asarray(picture.resize(wanted, Image.BILINEAR))
            with Image.open(io.BytesIO(mask_bytes)) as mask:
                np.asarray(mask.resize(wanted, Image.NEAREST))
            images += 1
    return images / (time.process_time() - started)


def cached_epochs(uri: str, size: tuple[int, int], batch: int, epochs: int) -> list[float]:
    """images/s per epoch of a search's train split: decoded once (epoch 1), then gathered."""
    opened = open_dataset(uri)
    started = time.perf_counter()
    search = SearchData.build(opened, image_sizes={size})
    data = search.for_trial(image_size=size, batch_size=batch, seed=0)
    rates = []
    for epoch in range(1, epochs + 1):
        images = sum(len(b["id"]) for b in data.batches("train", rank=0, world=1, epoch=epoch))
        rates.append(images / (time.perf_counter() - started))
        started = time.perf_counter()
    return rates


def streamed_epochs(uri: str, size: tuple[int, int], batch: int, epochs: int) -> list[float]:
    """images/s per epoch of the train split through Ray Data, decoded every epoch."""
    train = split_stream(open_dataset(uri), "train", size=size)
    rates = []
    for _ in range(epochs):
        started, images = time.perf_counter(), 0
        for rows in train.iter_batches(batch_size=batch, batch_format="numpy"):
            images += len(rows["id"])
        rates.append(images / (time.perf_counter() - started))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--gpu-rate", type=float, default=500.0)
    args = parser.parse_args()
    if not (args.data / "images").is_dir():
        sys.exit(f"no dataset at {args.data} (expects images/ and masks/)")

    from segsearch.data.ingest import ingest
    from segsearch.ray_setup import init_ray

    bucket = start_s3()
    folders = Path(tempfile.mkdtemp(prefix="segsearch-bench-pictures-"))
    uris, decode = {}, {}
    for fmt in ("png", "jpeg"):
        images, masks = picture_folder(args.data, folders, fmt, args.copies)
        uris[fmt] = f"{bucket}/{fmt}"
        info = ingest(
            images, masks, uris[fmt],
            classes=["membrane", "cell"], colors="0;255", val_fraction=0.2,
        )  # fmt: skip
        local = local_copy(uris[fmt])
        for side in (256, 512):
            size = (side, side)
            decode[fmt, side] = (
                segsearch_decode(local, size, info.channels),
                plain_decode(local, size),
            )
    size = (args.size, args.size)
    init_ray()
    cached = cached_epochs(uris["png"], size, args.batch, args.epochs)
    streamed = streamed_epochs(uris["png"], size, args.batch, args.epochs)

    load = os.getloadavg()
    print(
        f"{args.data.name} ×{args.copies}: {info.splits['train']} train images 512² "
        f"{info.channels}-channel; {os.cpu_count()} cores, load average "
        f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    )
    print("| decode (image + mask, resized), per CPU-second | segsearch | pyarrow + PIL | ratio |")
    print("|---|---:|---:|---:|")
    for (fmt, side), (ours, limit) in decode.items():
        print(f"| {fmt.upper()} 512² → {side}² | {ours:.0f} | {limit:.0f} | {ours / limit:.2f} |")
    later = statistics.mean(cached[1:])
    print(f"\n| train split from S3 at {args.size}², batch {args.batch} | images/s |")
    print("|---|---:|")
    print(f"| decoded once: epoch 1 (decode into the object store) | {cached[0]:.0f} |")
    print(f"| decoded once: epochs 2-{args.epochs} (from the object store) | {later:.0f} |")
    print(f"| streamed (Ray Data): epoch 1 | {streamed[0]:.0f} |")
    print(f"| streamed (Ray Data): epochs 2-{args.epochs} | {statistics.mean(streamed[1:]):.0f} |")
    print(f"epoch 1 / later epochs, decoded once: {later / cached[0]:.1f}× slower")
    png = decode["png", args.size][0] if ("png", args.size) in decode else None
    if png:
        print(
            f"a GPU epoch at {args.gpu_rate:.0f} images/s and epoch 1 within 2× of it: decoding "
            f"at {args.gpu_rate:.0f} images/s, {args.gpu_rate / png:.1f} cores (PNG → {args.size}²)"
        )
    need = MARGIN * args.gpu_rate
    print(f"\ncores to feed one GPU at {args.gpu_rate:.0f} images/s with a {MARGIN}× margin:")
    for (fmt, side), (ours, _) in decode.items():
        print(
            f"- {fmt.upper()} → {side}²: {need / ours:.1f} cores decoding every epoch; "
            f"cached: epoch 1 only, later epochs {need / later:.2f} cores gathering"
        )


if __name__ == "__main__":
    main()
