"""Does a search pay? segsearch search + refit against the U-Net a user would train, on real data.

ISBI 2012 membranes (bench/isbi.py: 18 train, 6 val, 6 test images, trained at --size), per seed:

- TPE+ASHA: a search over SPACE (--trials trials of up to --trial-epochs epochs, ASHA) whose
  first trial is the baseline's configuration (`enqueue:`), then the best configuration refit for
  --refit-epochs epochs on the train split (or train+val: --refit-on), from its trial's best
  checkpoint or from scratch (--refit-from);
- random: the same space and refit, random sampling, no early stopping, as many whole trials as
  fit in the TPE+ASHA search's spent compute;
- baseline: the hand-configured U-Net (CE, AdamW, flips) given the TPE+ASHA search + refit's
  whole compute as epochs of the train split (or of train+val: --baseline-on).

Compute is image-epochs (epochs trained × training images), counted from what each search
reports it spent: a refit from a checkpoint counts its own epochs, the checkpoint's were counted
in the search. Every model is scored by `segsearch evaluate` on the held-out test split at the
images' own 512×512 resolution. "To reach" is the image-epochs a search had spent, in the order
its epochs were reported, when it first matched random search's best val mIoU.

    python bench/search_quality.py [--seeds 3] [--size 128] [--trials 6] [--trial-epochs 12]
                                   [--refit-epochs 30] [--refit-from checkpoint|scratch]
                                   [--refit-on train|train+val] [--baseline-on train|train+val]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from isbi import ingest_isbi
from search_efficiency import epoch_order

from segsearch.ray_setup import init_ray
from segsearch.search.tuner import SearchResult, run_search
from segsearch.space import parse_space

METRIC = "val_miou"
BASELINE = {
    "batch_size": 4,
    "model.arch": "unet",
    "model.depth": 4,
    "model.width": 16,
    "model.upsample": "transpose",
    "loss.kind": "ce",
    "optim.name": "adamw",
    "optim.lr": 1.0e-3,
    "optim.schedule": "cosine",
    "aug.flip": True,
}
SPACE = {
    "model.arch": {"choice": ["fcn", "unet", "resunet"]},
    "model.depth": {"int": [3, 4]},
    "model.width": {"choice": [8, 16]},
    "model.fcn_skips": {"choice": ["16s", "8s"], "when": {"model.arch": "fcn"}},
    "model.upsample": {"choice": ["transpose", "bilinear"]},
    "loss.kind": {"choice": ["ce", "weighted_ce", "border_ce", "dice", "dice_squared", "ce_dice"]},
    "optim.lr": {"float": [3.0e-4, 1.0e-2], "log": True},
    "aug.flip": {"choice": [True, False]},
    "aug.elastic": {"choice": [True, False]},
}
#: The baseline as the search's first trial: its values of SPACE's parameters.
ENQUEUED = {**{key: value for key, value in BASELINE.items() if key in SPACE}, "aug.elastic": False}


@dataclass(frozen=True)
class Outcome:
    """One search (or the baseline) reduced to what the tables show."""

    label: str
    test_miou: float
    best_val: float
    image_epochs: float
    wall_s: float
    epochs: list[tuple[str, float]]
    refit_image_epochs: float = 0.0

    def image_epochs_to_reach(self, target: float, train_images: int) -> float | None:
        for spent, (_, score) in enumerate(self.epochs, start=1):
            if score >= target:
                return spent * train_images
        return None


def space(name: str, *, sampler: str, seed: int, args: argparse.Namespace, trials: int) -> dict:
    asha = {"kind": "asha", "grace_period": max(1, args.trial_epochs // 3), "reduction_factor": 3}
    return {
        "name": name,
        "trials": trials,
        "max_concurrent": 2,
        "epochs": args.trial_epochs,
        "sampler": {"kind": sampler, "seed": seed},
        "scheduler": asha if sampler == "tpe" else {"kind": "none"},
        "refit": {
            "epochs": args.refit_epochs,
            "top_k": 1,
            "on": args.refit_on,
            "from": args.refit_from,
        },
        "fixed": {"batch_size": 4, "image_size": [args.size, args.size], "seed": seed},
        "space": SPACE,
        "enqueue": [ENQUEUED],
    }


def baseline_space(
    name: str, *, seed: int, image_epochs: float, size: int, on: str, splits: dict[str, int]
) -> dict:
    """The baseline given `image_epochs`: all of them on the train split, or (train+val) one
    epoch on train, then the rest as a refit on train+val from that epoch's weights."""
    fixed = {**BASELINE, "image_size": [size, size], "seed": seed}
    raw = {"name": name, "trials": 1, "scheduler": {"kind": "none"}, "fixed": fixed}
    if on == "train":
        return {**raw, "epochs": round(image_epochs / splits["train"])}
    images = splits["train"] + splits["val"]
    refit = round((image_epochs - splits["train"]) / images)
    return {**raw, "epochs": 1, "refit": {"epochs": refit, "on": on, "from": "checkpoint"}}


def run(label: str, raw: dict[str, Any], *, dataset: str, tmp: str) -> Outcome:
    """One search on a fresh local Ray, as `segsearch search` runs it."""
    import ray

    started = time.perf_counter()
    init_ray()
    try:
        result: SearchResult = run_search(
            parse_space(raw, source=label),
            dataset=dataset,
            storage=f"{tmp}/runs",
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            echo=lambda _: None,
        )
    finally:
        ray.shutdown()
    if result.test is None:
        raise SystemExit(f"{label}: the search ended without a model scored on the test split")
    return Outcome(
        label=label,
        test_miou=result.test.miou,
        best_val=result.best_metric if result.best_metric is not None else math.nan,
        image_epochs=result.compute.total_image_epochs,
        wall_s=time.perf_counter() - started,
        epochs=epoch_order(result.trials),
        refit_image_epochs=result.compute.refit_image_epochs,
    )


def seed_table(seed: int, outcomes: list[Outcome], *, train_images: int) -> str:
    target = next(o for o in outcomes if o.label == "random").best_val
    lines = [
        f"seed {seed:<6} {'test mIoU':>9} {'best val':>8} {'img-epochs':>10} "
        f"{'to reach':>8} {'refit %':>7} {'wall s':>7}"
    ]
    for o in outcomes:
        reach = o.image_epochs_to_reach(target, train_images) if o.label != "baseline" else None
        share = (
            f"{100 * o.refit_image_epochs / o.image_epochs:.0f}" if o.label != "baseline" else "-"
        )
        lines.append(
            f"{o.label:<11} {o.test_miou:>9.4f} {o.best_val:>8.4f} {o.image_epochs:>10.0f} "
            f"{'-' if o.label == 'baseline' else _reach(reach):>8} {share:>7} {o.wall_s:>7.0f}"
        )
    return "\n".join(lines)


def _reach(spent: float | None) -> str:
    return "never" if spent is None else f"{spent:.0f}"


def summary(rows: dict[str, list[Outcome]]) -> str:
    lines = [f"mean ± standard deviation over {len(next(iter(rows.values())))} seeds"]
    for label, outcomes in rows.items():
        tests = [o.test_miou for o in outcomes]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        compute = statistics.mean(o.image_epochs for o in outcomes)
        lines.append(
            f"  {label:<11} test mIoU {statistics.mean(tests):.4f} ± {spread:.4f}   "
            f"image-epochs {compute:.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="training image side in pixels")
    parser.add_argument("--trials", type=int, default=6, help="TPE+ASHA trials")
    parser.add_argument("--trial-epochs", type=int, default=12, help="epochs per trial at most")
    parser.add_argument("--refit-epochs", type=int, default=30)
    parser.add_argument(
        "--refit-from",
        choices=["checkpoint", "scratch"],
        default="checkpoint",
        help="start the refit from the trial's best checkpoint, or train it anew",
    )
    parser.add_argument(
        "--refit-on",
        choices=["train", "train+val"],
        default="train",
        help="the refit's training images",
    )
    parser.add_argument(
        "--baseline-on",
        choices=["train", "train+val"],
        default="train",
        help="the baseline's training images (train+val: one epoch on train, then train+val)",
    )
    args = parser.parse_args()
    started = time.perf_counter()
    rows: dict[str, list[Outcome]] = {"TPE+ASHA": [], "random": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="segsearch-quality-") as tmp:
        dataset = f"{tmp}/isbi"
        splits = ingest_isbi(dataset)
        train_images = splits["train"]
        print(f"ISBI 2012: {splits}, trained at {args.size}x{args.size}; {vars(args)}", flush=True)
        for seed in range(args.seeds):
            tpe = run(
                "TPE+ASHA",
                space(f"q-tpe-{seed}", sampler="tpe", seed=seed, args=args, trials=args.trials),
                dataset=dataset,
                tmp=tmp,
            )
            search_epochs = (tpe.image_epochs - tpe.refit_image_epochs) / train_images
            random_trials = max(1, math.floor(search_epochs / args.trial_epochs))
            random = run(
                "random",
                space(
                    f"q-random-{seed}", sampler="random", seed=seed, args=args, trials=random_trials
                ),
                dataset=dataset,
                tmp=tmp,
            )
            baseline = run(
                "baseline",
                baseline_space(
                    f"q-baseline-{seed}",
                    seed=seed,
                    image_epochs=tpe.image_epochs,
                    size=args.size,
                    on=args.baseline_on,
                    splits=splits,
                ),
                dataset=dataset,
                tmp=tmp,
            )
            outcomes = [tpe, random, baseline]
            for outcome in outcomes:
                rows[outcome.label].append(outcome)
            print(seed_table(seed, outcomes, train_images=train_images), flush=True)
    print(summary(rows))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
