"""Data throughput: S3 Parquet → Ray Data → decoded, augmented batches, against what training eats.

Ingests a real dataset (default ../shared/data/isbi2012-membrane) with segsearch into a moto S3
server started here, copies the very same shards to a local folder, and prints images/s for:
- ingest to S3 (decode, map mask grey values, write Parquet, statistics);
- pyarrow's local read + decode + resize of those shards, one process, no Ray (the baseline);
- Ray Data from S3 (`load_splits`, resize to --size), as numpy batches, then as float tensors
  augmented with `segsearch.data.augment` (flip, jitter, scale, elastic, colour): the training
  input path. Epoch 1 includes Ray Data's start-up; later epochs are the steady state;
- one training worker's consumption: forward + backward + AdamW step of a width-32 U-Net on
  (--batch, C, --size, --size) on this machine's CPU.

    python bench/data.py [--data DIR] [--size 256] [--batch 8] [--epochs 6] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import torch

from segsearch.data.format import shard_paths
from segsearch.data.ray_data import decode_batch, load_splits
from segsearch.data.storage import filesystem_for

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "isbi2012-membrane"
AUGMENT = {"flip": True, "jitter_px": 16, "scale": 0.2, "elastic": True, "color": 0.2}


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
    return "s3://bench-data/isbi"


def local_read_decode(root: str, size: tuple[int, int], epochs: int) -> float:
    """images/s of pyarrow reading the local shards and decoding + resizing every row."""
    fs = pafs.LocalFileSystem()
    paths = shard_paths(fs, root, "train")
    images = 0
    started = time.perf_counter()
    for _ in range(epochs):
        for path in paths:
            table = pq.read_table(path, columns=["id", "image", "mask"])
            batch = {name: table.column(name).to_pylist() for name in table.column_names}
            images += len(decode_batch(batch, channels=1, size=size)["image"])
    return images / (time.perf_counter() - started)


def ray_epochs(uri: str, size: tuple[int, int], batch: int, epochs: int, augment) -> list[float]:
    """images/s per epoch of the train split from S3 through Ray Data (+ augmentation)."""
    train = load_splits(uri, image_size=size)["train"]
    generator = torch.Generator().manual_seed(0)
    rates = []
    for _ in range(epochs):
        images = 0
        started = time.perf_counter()
        for rows in train.iter_batches(batch_size=batch, batch_format="numpy"):
            if augment is not None:
                image = torch.from_numpy(rows["image"]).permute(0, 3, 1, 2).float().div_(255)
                mask = torch.from_numpy(rows["mask"]).long()
                augment(image, mask, generator=generator)
            images += len(rows["image"])
        rates.append(images / (time.perf_counter() - started))
    return rates


def training_consumption(size: tuple[int, int], batch: int, channels: int, steps: int) -> float:
    """images/s one CPU training worker consumes: U-Net width 32, fwd + bwd + AdamW step."""
    from segsearch.models import build_model

    torch.manual_seed(0)
    model = build_model({"arch": "unet", "width": 32}, in_channels=channels, num_classes=2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    image = torch.rand(batch, channels, *size)
    mask = torch.randint(0, 2, (batch, *size))
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(image), mask).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - started)
    return batch / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not (args.data / "images").is_dir():
        sys.exit(f"no dataset at {args.data} (expects images/ and masks/)")
    torch.set_num_threads(args.threads)
    size = (args.size, args.size)

    from segsearch.data.augment import build_augment
    from segsearch.data.ingest import ingest
    from segsearch.ray_setup import init_ray

    uri = start_s3()
    started = time.perf_counter()
    info = ingest(
        args.data / "images", args.data / "masks", uri,
        classes=["membrane", "cell"], colors="0;255", val_fraction=0.2,
    )  # fmt: skip
    ingest_rate = sum(info.splits.values()) / (time.perf_counter() - started)

    local = tempfile.mkdtemp(prefix="segsearch-bench-")
    s3, s3_root = filesystem_for(uri)
    pafs.copy_files(
        s3_root, local, source_filesystem=s3, destination_filesystem=pafs.LocalFileSystem()
    )
    local_rate = local_read_decode(local, size, args.epochs)

    init_ray()
    decoded = ray_epochs(uri, size, args.batch, args.epochs, None)
    augment = build_augment(AUGMENT, ignore_index=info.ignore_index)
    augmented = ray_epochs(uri, size, args.batch, args.epochs, augment)
    consumed = training_consumption(size, args.batch, info.channels, args.train_steps)

    steady = statistics.mean(augmented[1:]) if len(augmented) > 1 else augmented[0]
    print(
        f"{args.data.name}: {info.splits['train']} train images {info.channels}-channel, "
        f"resized to {args.size}x{args.size}, batch {args.batch}, {args.epochs} epochs; "
        f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}, torch threads "
        f"{args.threads}"
    )
    print("| path | images/s |")
    print("|---|---:|")
    print(f"| ingest to S3 (moto), whole dataset | {ingest_rate:.0f} |")
    print(f"| pyarrow local read + decode + resize (no Ray) | {local_rate:.0f} |")
    print(f"| Ray Data from S3, decoded, epoch 1 (cold) | {decoded[0]:.0f} |")
    print(f"| Ray Data from S3, decoded, epochs 2+ | {statistics.mean(decoded[1:]):.0f} |")
    print(f"| Ray Data from S3, decoded + augmented, epoch 1 | {augmented[0]:.0f} |")
    print(f"| Ray Data from S3, decoded + augmented, epochs 2+ | {steady:.0f} |")
    print(f"| one training worker consumes (U-Net w32, CPU) | {consumed:.1f} |")
    print(
        f"ratio S3 + Ray Data + augment / local pyarrow: {steady / local_rate:.2f}; "
        f"data / training consumption: {steady / consumed:.0f}x"
    )


if __name__ == "__main__":
    main()
