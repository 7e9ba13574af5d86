"""What a trial pays besides training, measured as the user waits for it.

P4: seconds from the moment Tune starts a trial (the driver's "trial … started") to its first
training step, and where they go, from timestamps the trial reports (`startup_at`): for a
one-worker trial in a fresh process, the next one in the process Tune reuses, and a two-worker
DDP trial (Ray Train).
P1: whole-epoch wall time (train + validation + checkpoint + report, from one epoch's start to
the next's) inside Ray Tune, against a plain PyTorch loop doing the same train + validation on
the same model and decoded data, as a ratio (1.0 = no overhead); and the train steps' images/s.
Search: for the demo search (search_spaces/demo.yaml on the demo dataset, as `segsearch demo`),
the trials' plain-loop compute (epochs run × the plain loop's epoch time for the trial's
config) divided by the concurrency, over the search's wall time (1.0 = no overhead).

    python bench/overhead.py [--part trials|search] [--epochs 4] [--size 64] [--width 16]
                             [--images 256] [--no-ddp]

Each part starts its own local Ray, so run them one at a time (`--part`) for the start-up of a
fresh search; both run by default, the search after the trials (Ray already started).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from segsearch.config import TrialConfig
from segsearch.data.augment import build_augment
from segsearch.data.demo import make_demo_dataset
from segsearch.data.format import DatasetInfo, read_dataset_info
from segsearch.data.images import decode_image
from segsearch.data.ray_data import resize_pair
from segsearch.losses import build_loss
from segsearch.metrics import ConfusionMatrix
from segsearch.models import build_model
from segsearch.search.progress import result_epoch
from segsearch.search.train import _lr_factor, _make_optimizer, _Normalizer
from segsearch.search.tuner import SearchResult, run_search, trial_concurrency
from segsearch.space import SearchSpec, load_space, nest, packaged_space, parse_space

#: The start-up stages a trial reports (`startup_at`), in order, and what each one waits for.
STAGES = (
    ("entered", "trial process ready (actor start, context)"),
    ("imported", "imports (torch, training code)"),
    ("data", "data streams built"),
    ("loop", "Train controller + worker group"),
    ("model", "model, optimizer, checkpoint look-up"),
    ("first_batch", "first batch (data stream, decode)"),
    ("first_step", "first training step"),
)


@dataclass
class Run:
    """A finished search, with when each trial started on the driver and its wall time."""

    result: SearchResult
    started_at: dict[str, float]
    wall_s: float


def search(spec: SearchSpec, dataset: str, tmp: str) -> Run:
    """Run a search quietly, noting when the driver starts each trial."""
    started_at: dict[str, float] = {}

    def echo(line: str) -> None:
        words = line.split()
        if len(words) >= 3 and words[0] == "trial" and words[2].startswith("started"):
            started_at[words[1]] = time.time()

    began = time.time()
    result = run_search(
        spec,
        dataset=dataset,
        storage=f"{tmp}/runs",
        tracking_uri=f"sqlite:///{tmp}/mlflow.db",
        echo=echo,
    )
    return Run(result, started_at, time.time() - began)


def startup(row: dict[str, Any], started_at: float) -> list[tuple[str, float]]:
    """(stage, seconds) from the driver's trial start to the first step, from the first epoch's
    `startup_at` timestamps; the stages a path skips take no time."""
    first = row["history"][0]
    stages, last = [], started_at
    for key, label in STAGES:
        at = first.get(f"startup_at/{key}")
        if at is None or (isinstance(at, float) and np.isnan(at)):
            at = last
        stages.append((label, at - last))
        last = at
    return stages


def print_startup(title: str, stages: list[tuple[str, float]]) -> None:
    print(f"P4 {title}: {sum(s for _, s in stages):.1f} s")
    for label, seconds in stages:
        print(f"    {label:<40} {seconds:6.2f} s")


def whole_epochs(row: dict[str, Any]) -> list[float]:
    """Each epoch's wall time but the last: from its start to the next epoch's start."""
    starts = [r["epoch_started_at"] for r in row["history"]]
    return [b - a for a, b in itertools.pairwise(starts)]


@dataclass
class Arrays:
    """A dataset's splits decoded and resized once, as the plain loop's whole input."""

    info: DatasetInfo
    train: tuple[np.ndarray, np.ndarray]
    val: tuple[np.ndarray, np.ndarray]


def load_arrays(root: str, size: tuple[int, int]) -> Arrays:
    def split(name: str) -> tuple[np.ndarray, np.ndarray]:
        table = pq.read_table(f"{root}/{name}")
        pairs = [
            resize_pair(decode_image(image), decode_image(mask)[..., 0], size)
            for image, mask in zip(
                table["image"].to_pylist(), table["mask"].to_pylist(), strict=True
            )
        ]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    return Arrays(read_dataset_info(root), split("train"), split("val"))


def plain_epochs(data: Arrays, trial: TrialConfig, epochs: int) -> list[tuple[float, float]]:
    """(whole epoch, train steps only) seconds per epoch of a plain single-process loop: the
    trial's model, loss, optimizer, schedule, augmentation and normalisation, train (shuffled,
    full batches) + validation."""
    info = data.info
    torch.manual_seed(trial.seed)
    model = build_model(trial.model, in_channels=info.channels, num_classes=info.num_classes)
    loss_fn = build_loss(
        trial.loss,
        num_classes=info.num_classes,
        ignore_index=info.ignore_index,
        class_pixel_counts=info.class_pixel_counts,
    )
    augment = build_augment(trial.aug, ignore_index=info.ignore_index)
    images, masks = data.train
    batch = trial.batch_size
    steps = len(images) // batch
    optimizer = _make_optimizer(trial.optim, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, _lr_factor(trial.optim, steps, trial.epochs)
    )
    normalize = _Normalizer(info, torch.device("cpu"))
    rng = np.random.default_rng(trial.seed)
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        model.train()
        order = rng.permutation(len(images))
        for step in range(steps):
            index = order[step * batch : (step + 1) * batch]
            image = torch.from_numpy(images[index]).permute(0, 3, 1, 2).float().div_(255)
            mask = torch.from_numpy(masks[index]).long()
            image, mask = augment(image, mask)
            loss = loss_fn(model(normalize(image)), mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        trained = time.perf_counter() - started
        _validate(model, data, batch, normalize)
        times.append((time.perf_counter() - started, trained))
    return times


@torch.no_grad()
def _validate(model: torch.nn.Module, data: Arrays, batch: int, normalize: Callable) -> None:
    model.eval()
    matrix = ConfusionMatrix(data.info.num_classes, ignore_index=data.info.ignore_index)
    images, masks = data.val
    for start in range(0, len(images), batch):
        image = torch.from_numpy(images[start : start + batch]).permute(0, 3, 1, 2)
        logits = model(normalize(image.float().div_(255)))
        matrix.update(logits.argmax(1), torch.from_numpy(masks[start : start + batch]).long())
    matrix.compute()


def trial_config(config: dict[str, Any], epochs: int) -> TrialConfig:
    return TrialConfig.from_dict({**nest(config), "epochs": epochs})


def overhead_spec(args: argparse.Namespace, workers: int, trials: int) -> SearchSpec:
    return parse_space(
        {
            "name": f"overhead-{workers}w",
            "trials": trials,
            "max_concurrent": 1,
            "epochs": args.epochs,
            "scheduler": {"kind": "none"},
            "resources": {"workers": workers, "cpus_per_worker": 1},
            "fixed": {
                "batch_size": 16,
                "image_size": [args.size, args.size],
                "model": {"arch": "unet", "depth": 3, "width": args.width},
                "loss.kind": "ce",
                "optim.lr": 1e-3,
                "optim.schedule": "constant",
                "aug.flip": True,
            },
        }
    )


def trial_figures(args: argparse.Namespace, tmp: str) -> None:
    """P4 (one worker, fresh and reused process; two workers) and P1."""
    root = f"{tmp}/data"
    make_demo_dataset(root, n_train=args.images, n_val=32, size=(args.size, args.size))
    one = search(overhead_spec(args, workers=1, trials=2), root, f"{tmp}/one")
    rows = sorted(one.result.trials, key=lambda r: one.started_at[r["trial_id"]])
    print(f"model: U-Net depth 3 width {args.width}, {args.size}x{args.size}, batch 16")
    print_startup(
        "one worker, fresh process", startup(rows[0], one.started_at[rows[0]["trial_id"]])
    )
    print_startup(
        "one worker, reused process", startup(rows[1], one.started_at[rows[1]["trial_id"]])
    )
    if not args.no_ddp:
        two = search(overhead_spec(args, workers=2, trials=1), root, f"{tmp}/two")
        (row,) = two.result.trials
        print_startup("two DDP workers (Ray Train)", startup(row, two.started_at[row["trial_id"]]))

    data = load_arrays(root, (args.size, args.size))
    steps_per_epoch = len(data.train[0]) // 16
    torch.set_num_threads(1)  # as a trial's process with 1 CPU
    trial = trial_config(rows[0]["config"], args.epochs)
    plain_times = plain_epochs(data, trial, args.epochs)[1:]
    plain = statistics.median(whole for whole, _ in plain_times)
    plain_steps = steps_per_epoch * 16 / statistics.median(train for _, train in plain_times)
    in_tune = statistics.median(e for row in rows for e in whole_epochs(row)[1:])
    print(f"P1 whole epoch in Tune (median, not the first): {in_tune:.2f} s")
    print(f"P1 whole epoch, plain PyTorch loop:            {plain:.2f} s")
    print(f"P1 ratio plain / Tune:                         {plain / in_tune:.2f}")
    steps = statistics.median(r["images_per_s"] for row in rows for r in row["history"][1:])
    print(f"P1 train steps in Tune (median):               {steps:.1f} images/s")
    print(f"P1 train steps, plain loop:                    {plain_steps:.1f} images/s")
    print(f"P1 train-step ratio Tune / plain:              {steps / plain_steps:.2f}")


def search_figure(tmp: str) -> None:
    """The demo search's plain-loop compute / concurrency over its wall time."""
    root = f"{tmp}/demo-data"
    make_demo_dataset(root, n_train=256, n_val=48, size=(48, 48))
    spec = load_space(packaged_space("demo.yaml"))
    import ray

    run = search(spec, root, f"{tmp}/demo")
    concurrency, _ = trial_concurrency(spec, ray.cluster_resources())
    data = load_arrays(root, tuple(spec.fixed["image_size"]))
    torch.set_num_threads(int(spec.resources.cpus_per_worker))
    compute = 0.0
    for row in run.result.trials:
        trial = trial_config(row["config"], spec.epochs)
        epoch_s = min(whole for whole, _ in plain_epochs(data, trial, 2))
        compute += result_epoch(row["history"][-1]) * epoch_s
    print(f"search: demo, {len(run.result.trials)} trials, {concurrency} at once")
    print(f"search wall time:                      {run.wall_s:.1f} s")
    print(f"search plain-loop compute / {concurrency}:        {compute / concurrency:.1f} s")
    print(f"search figure (compute / wall):        {compute / concurrency / run.wall_s:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--no-ddp", action="store_true", help="skip the two-worker trial")
    parser.add_argument("--part", choices=("trials", "search"), help="only P4 + P1, or the search")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in (None, "trials"):
            trial_figures(args, tmp)
        if args.part in (None, "search"):
            search_figure(tmp)


if __name__ == "__main__":
    main()
