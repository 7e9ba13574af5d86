"""Does a search pay? segsearch search + refit against the U-Net a user would train, on real data.

ISBI 2012 membranes (bench/isbi.py: 18 train, 6 val, 6 test images, trained at --size), per seed:

- TPE+ASHA: a search over SPACE and the training sizes --search-sizes (--trials trials of up to
  --trial-epochs epochs, ASHA) whose first trials are the baseline's configuration at each of
  those sizes (`enqueue:`), then its best --refit-top-k configurations refit for --refit-epochs
  epochs on the train split (or train+val: --refit-on), from their trials' best checkpoints or
  from scratch (--refit-from); the refit best by val is the search's model;
- random (unless --skip-random): the same space and refit, random sampling, no early stopping,
  as many whole trials as fit in the TPE+ASHA search's spent compute;
- baseline: the hand-configured U-Net (CE, AdamW, flips) given the TPE+ASHA search + refit's
  whole compute as epochs of the train split (or of train+val: --baseline-on).

Every search trains on random --size × --size windows (`aug.crop`) of images resized to the
size it draws, validates and predicts on whole images: a step costs the same at every drawn
size. Compute is image-epochs at --size (epochs trained × training images × the pixels trained
on per image / --size²), counted from the epochs each search reports: a refit from a checkpoint
counts its own epochs, the checkpoint's were counted in the search. Every trial is counted at
the baseline's per-pixel cost, although most of the space's networks are narrower or shallower
than the baseline's, so the count favours the baseline. Wall time (validation on whole images at
the drawn size, every epoch, costs more at larger sizes) is shown beside it. Every model is
scored by `segsearch evaluate` on the held-out test split at the images' own 512×512
resolution. "To reach" is the image-epochs a search had spent, in the order its epochs were
reported, when it first matched random search's best val mIoU.

    python bench/search_quality.py [--seeds 3] [--size 128] [--search-sizes 128,256]
                                   [--trials 6] [--trial-epochs 12] [--refit-epochs 30]
                                   [--refit-top-k 2]
                                   [--refit-from checkpoint|scratch] [--refit-on train|train+val]
                                   [--baseline-on train|train+val] [--skip-random]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

from isbi import ingest_isbi
from search_efficiency import epoch_order

from segsearch.config import check_image_size
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
    epoch_cost: dict[str, float]
    refit_image_epochs: float = 0.0
    #: The configuration of the model the search ended with (`SearchResult.final`).
    chosen: dict[str, Any] = field(default_factory=dict)

    def image_epochs_to_reach(self, target: float, cost: dict[str, float]) -> float | None:
        """Image-epochs spent, in report order, when an epoch first scored `target`; `cost` is
        each trial's image-epochs per epoch."""
        spent = 0.0
        for trial, score in self.epochs:
            spent += cost[trial]
            if score >= target:
                return spent
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
            "top_k": args.refit_top_k,
            "on": args.refit_on,
            "from": args.refit_from,
        },
        "fixed": {"batch_size": 4, "seed": seed, "aug.crop": [args.size, args.size]},
        "space": {**SPACE, "image_size": {"choice": [_text(size) for size in args.search_sizes]}},
        "enqueue": [{**ENQUEUED, "image_size": _text(side)} for side in args.search_sizes],
    }


def sides(text: str) -> list[int]:
    """Square image sides from the command line: "128,256" → [128, 256]."""
    return [int(side) for side in text.split(",")]


def _text(side: int) -> str:
    return f"{side}x{side}"


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


def run(
    label: str, raw: dict[str, Any], *, dataset: str, tmp: str, size: int, splits: dict[str, int]
) -> Outcome:
    """One search on a fresh local Ray, as `segsearch search` runs it; image-epochs at `size`."""
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
    fixed = raw["fixed"]
    refit_on = raw.get("refit", {}).get("on", "train")
    refit_images = splits["train"] + (splits["val"] if refit_on == "train+val" else 0)
    cost = {
        row["trial_id"]: splits["train"] * _pixel_share(row["config"], fixed, size)
        for row in result.trials
    }
    search = sum(cost[row["trial_id"]] * _epochs(row) for row in result.trials)
    refit = sum(
        refit_images * _pixel_share(row["config"], fixed, size) * _epochs(row)
        for row in result.refit
    )
    return Outcome(
        label=label,
        test_miou=result.test.miou,
        best_val=result.best_metric if result.best_metric is not None else math.nan,
        image_epochs=search + refit,
        wall_s=time.perf_counter() - started,
        epochs=epoch_order(result.trials),
        epoch_cost=cost,
        refit_image_epochs=refit,
        chosen=result.final["config"] if result.final else {},
    )


def _pixel_share(config: dict[str, Any], fixed: dict[str, Any], size: int) -> float:
    """The pixels a trial trains on per image (its crop, else its image_size), over `size`²."""
    trained = config.get("aug.crop", fixed.get("aug.crop")) or config.get(
        "image_size", fixed.get("image_size")
    )
    height, width = check_image_size(trained)
    return height * width / size**2


def _epochs(row: dict[str, Any]) -> int:
    """Epochs a trial reported (one repeated by a resume counts once)."""
    return len({report.get("epoch") for report in row["history"]})


def seed_table(seed: int, outcomes: list[Outcome]) -> str:
    random = next((o for o in outcomes if o.label == "random"), None)
    lines = [
        f"seed {seed:<6} {'test mIoU':>9} {'best val':>8} {'img-epochs':>10} "
        f"{'to reach':>8} {'refit %':>7} {'wall s':>7}"
    ]
    for o in outcomes:
        searched = o.label != "baseline"
        reach = (
            _reach(o.image_epochs_to_reach(random.best_val, o.epoch_cost))
            if searched and random is not None
            else "-"
        )
        share = f"{100 * o.refit_image_epochs / o.image_epochs:.0f}" if searched else "-"
        lines.append(
            f"{o.label:<11} {o.test_miou:>9.4f} {o.best_val:>8.4f} {o.image_epochs:>10.0f} "
            f"{reach:>8} {share:>7} {o.wall_s:>7.0f}"
        )
    return "\n".join(lines)


def _reach(spent: float | None) -> str:
    return "never" if spent is None else f"{spent:.0f}"


def summary(rows: dict[str, list[Outcome]]) -> str:
    lines = [f"mean ± standard deviation over {len(next(iter(rows.values())))} seeds"]
    for label, outcomes in rows.items():
        if not outcomes:
            continue
        tests = [o.test_miou for o in outcomes]
        spread = statistics.stdev(tests) if len(tests) > 1 else 0.0
        compute = statistics.mean(o.image_epochs for o in outcomes)
        wall = statistics.mean(o.wall_s for o in outcomes)
        lines.append(
            f"  {label:<11} test mIoU {statistics.mean(tests):.4f} ± {spread:.4f}   "
            f"image-epochs {compute:.0f}   wall {wall:.0f} s"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--size", type=int, default=128, help="training image side in pixels")
    parser.add_argument(
        "--search-sizes",
        type=sides,
        default=None,
        help="square training sides the searches draw from, comma-separated "
        "(default: --size and twice --size)",
    )
    parser.add_argument("--trials", type=int, default=6, help="TPE+ASHA trials")
    parser.add_argument("--trial-epochs", type=int, default=12, help="epochs per trial at most")
    parser.add_argument("--refit-epochs", type=int, default=30)
    parser.add_argument(
        "--refit-top-k",
        type=int,
        default=2,
        help="refit the search's best K configurations; the best by val is the search's model",
    )
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
    parser.add_argument("--skip-random", action="store_true", help="no random-search arm")
    args = parser.parse_args()
    args.search_sizes = args.search_sizes or [args.size, 2 * args.size]
    started = time.perf_counter()
    rows: dict[str, list[Outcome]] = {"TPE+ASHA": [], "random": [], "baseline": []}
    with tempfile.TemporaryDirectory(prefix="segsearch-quality-") as tmp:
        dataset = f"{tmp}/isbi"
        splits = ingest_isbi(dataset)
        print(f"ISBI 2012: {splits}; {vars(args)}", flush=True)
        for seed in range(args.seeds):
            outcomes = [
                run(
                    "TPE+ASHA",
                    space(f"q-tpe-{seed}", sampler="tpe", seed=seed, args=args, trials=args.trials),
                    dataset=dataset,
                    tmp=tmp,
                    size=args.size,
                    splits=splits,
                )
            ]
            tpe = outcomes[0]
            if not args.skip_random:
                # As many whole trials (each on --size crops) as the TPE+ASHA search spent.
                per_trial = args.trial_epochs * splits["train"]
                trials = max(1, math.floor((tpe.image_epochs - tpe.refit_image_epochs) / per_trial))
                outcomes.append(
                    run(
                        "random",
                        space(
                            f"q-random-{seed}",
                            sampler="random",
                            seed=seed,
                            args=args,
                            trials=trials,
                        ),
                        dataset=dataset,
                        tmp=tmp,
                        size=args.size,
                        splits=splits,
                    )
                )
            outcomes.append(
                run(
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
                    size=args.size,
                    splits=splits,
                )
            )
            for outcome in outcomes:
                rows[outcome.label].append(outcome)
            print(seed_table(seed, outcomes), flush=True)
            for outcome in outcomes[:-1]:
                print(f"  {outcome.label} chose {outcome.chosen}", flush=True)
    print(summary(rows))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
