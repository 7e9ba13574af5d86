"""P3: what TPE + ASHA buys over random search at the same compute.

On the demo dataset, for each sampler seed, two searches over the space of
search_spaces/demo.yaml (same parameters, fixed values, concurrency and ASHA reduction factor; only
the sampler, the scheduler and the trial count differ, and every trial gets `--epochs` epochs):

- random search without early stopping: budget / epochs trials, each trained to the end, so it
  spends exactly the budget;
- TPE + ASHA: ceil(budget / grace) trials. Every trial runs at least `grace` epochs, so this
  search is sure to spend at least the budget, usually more. The demo's grace period is sized for
  its longer trials; here it scales with the short ones (`--grace`, default half of `--epochs`),
  so ASHA has a rung below the last epoch.

Compute is counted in epochs, the unit both searches spend. Each search's epoch reports are put in
the order they happened (Tune's report timestamp, 1 s resolution; ties by trial then epoch) and
cut off after `budget` epochs. That prefix is exactly what a search stopped once it had spent the
budget would have seen: ASHA's stop decisions and TPE's suggestions only ever depend on results
reported before them. The epochs after the cut-off are reported separately and never count toward
"best within budget". An epoch still running at the cut-off is not counted, for both searches.

Per seed, the table shows the best val_miou among the epochs within the budget (any epoch of any
trial: the best model each search had seen) and the epochs each search needed to first reach
random search's best. TPE + ASHA may need more than the budget; then the epochs past the cut-off
(the same search carried on) tell how many, or it says it did not get there at all.

Optuna's TPE draws its first 10 trials (n_startup_trials) from a RandomSampler seeded with its own
seed, so with one seed both searches try the same first configurations: the comparison is paired,
and at small budgets the difference it shows is mostly ASHA's.

    python bench/search_efficiency.py [--budget 24] [--seeds 3] [--epochs 4] [--grace 2] [--size 48]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import yaml

from segsearch.data.demo import make_demo_dataset
from segsearch.ray_setup import init_ray
from segsearch.search.tuner import run_search
from segsearch.space import SchedulerSpec, packaged_space, parse_space

METRIC = "val_miou"


@dataclass(frozen=True)
class Run:
    """One finished search, reduced to the order in which it spent its epochs."""

    label: str
    trials: int
    failed: int
    epochs: list[tuple[str, float]]  # (trial id, metric) of each epoch, in the order reported
    wall_s: float

    def best_within(self, budget: int) -> float:
        return max((score for _, score in self.epochs[:budget]), default=math.nan)

    def epochs_to_reach(self, target: float) -> int | None:
        """How many epochs this search had spent when it first reported `target` or better."""
        for spent, (_, score) in enumerate(self.epochs, start=1):
            if score >= target:
                return spent
        return None

    def trials_within(self, budget: int) -> int:
        return len({trial for trial, _ in self.epochs[:budget]})


def demo_space(
    *, name: str, sampler: str, seed: int, grace: int | None, trials: int, epochs: int, size: int
) -> dict[str, Any]:
    """The demo search space with the sampler, trials and sizes of one P3 search; ASHA with
    `grace` as its grace period, or no early stopping when `grace` is None."""
    raw = yaml.safe_load(packaged_space("demo.yaml").read_text())
    scheduler = (
        {**raw.get("scheduler", {}), "kind": "asha", "grace_period": grace}
        if grace is not None
        else {"kind": "none"}
    )
    return {
        **raw,
        "name": name,
        "trials": trials,
        "epochs": epochs,
        "sampler": {"kind": sampler, "seed": seed},
        "scheduler": scheduler,
        "fixed": {**raw.get("fixed", {}), "image_size": [size, size]},
    }


def epoch_order(trials: list[dict[str, Any]]) -> list[tuple[str, float]]:
    """(trial id, metric) of every reported epoch of a search, in the order they were reported."""
    epochs = []
    for row in trials:
        for report in row["history"]:
            score = report.get(METRIC)
            score = -math.inf if score is None or math.isnan(score) else float(score)
            key = (report["timestamp"], row["trial_id"], report["training_iteration"])
            epochs.append((key, row["trial_id"], score))
    epochs.sort(key=lambda e: e[0])
    return [(trial, score) for _, trial, score in epochs]


def run_one(label: str, space: dict[str, Any], *, dataset: str, tmp: str) -> Run:
    """Run one search on a fresh local Ray instance, as `segsearch search` starts it."""
    import ray

    started = time.perf_counter()
    init_ray()
    try:
        result = run_search(
            parse_space(space, source=label),
            dataset=dataset,
            storage=f"{tmp}/runs",
            tracking_uri=f"sqlite:///{tmp}/mlflow.db",
            echo=lambda _: None,
        )
    finally:
        ray.shutdown()
    wall = time.perf_counter() - started
    return Run(
        label=label,
        trials=len(result.trials),
        failed=sum(1 for t in result.trials if t["error"]),
        epochs=epoch_order(result.trials),
        wall_s=wall,
    )


def seed_table(seed: int, budget: int, runs: list[Run], *, target: float) -> str:
    header = (
        f"{'seed ' + str(seed):<18} {'trials':>6} {'in budget':>9} {'epochs':>6} "
        f"{'failed':>6} {'best@' + str(budget):>8} {'to reach':>8} {'wall s':>7}"
    )
    lines = [header]
    for run in runs:
        reach = run.epochs_to_reach(target)
        lines.append(
            f"{run.label:<18} {run.trials:>6} {run.trials_within(budget):>9} "
            f"{len(run.epochs):>6} {run.failed:>6} {run.best_within(budget):>8.4f} "
            f"{_reach(reach, budget):>8} {run.wall_s:>7.0f}"
        )
    lines.append(f"  target (random search's best within {budget} epochs): {target:.4f}")
    return "\n".join(lines)


def _reach(spent: int | None, budget: int) -> str:
    if spent is None:
        return "never"
    return f"{spent}" if spent <= budget else f"{spent}*"


def summary(results: dict[str, list[tuple[float, int | None]]], *, budget: int) -> str:
    lines = [
        f"summary over {len(next(iter(results.values())))} seeds, budget {budget} epochs "
        f"(* = past the budget)"
    ]
    for label, rows in results.items():
        bests = [best for best, _ in rows]
        reached = [spent for _, spent in rows if spent is not None]
        spread = statistics.stdev(bests) if len(bests) > 1 else 0.0
        reach = f"{statistics.mean(reached):.1f}" if reached else "n/a"
        lines.append(
            f"  {label:<18} mean best {METRIC} {statistics.mean(bests):.4f} ± {spread:.4f}   "
            f"mean epochs to reach random's best {reach} (reached in {len(reached)}/{len(rows)})"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, default=24, help="total epochs per search")
    parser.add_argument("--seeds", type=int, default=3, help="sampler seeds 0..N-1")
    parser.add_argument("--epochs", type=int, default=4, help="epochs per trial (ASHA's max_t)")
    parser.add_argument("--grace", type=int, help="ASHA grace period (default: epochs // 2)")
    parser.add_argument("--size", type=int, default=48, help="demo image side in pixels")
    args = parser.parse_args()
    grace = max(1, args.epochs // 2) if args.grace is None else args.grace
    if args.epochs < 1 or args.seeds < 1 or args.budget < args.epochs:
        parser.error("need --epochs >= 1, --seeds >= 1 and --budget >= --epochs")
    if not 1 <= grace <= args.epochs:
        parser.error(f"--grace must be between 1 and --epochs {args.epochs}, got {grace}")
    if args.budget % args.epochs:
        parser.error(f"--budget {args.budget} must be a multiple of --epochs {args.epochs}")
    asha_trials = math.ceil(args.budget / grace)
    random_trials = args.budget // args.epochs
    factor = (
        yaml.safe_load(packaged_space("demo.yaml").read_text())
        .get("scheduler", {})
        .get("reduction_factor", SchedulerSpec().reduction_factor)
    )

    started = time.perf_counter()
    results: dict[str, list[tuple[float, int | None]]] = {"TPE+ASHA": [], "random (no stop)": []}
    with tempfile.TemporaryDirectory(prefix="segsearch-p3-") as tmp:
        dataset = f"{tmp}/demo"
        make_demo_dataset(dataset, size=(args.size, args.size))
        print(
            f"P3: demo dataset {args.size}x{args.size}, space search_spaces/demo.yaml, "
            f"{args.epochs} epochs/trial, budget {args.budget} epochs; "
            f"TPE+ASHA {asha_trials} trials (grace {grace}, reduction factor {factor}), "
            f"random {random_trials} trials",
            flush=True,
        )
        for seed in range(args.seeds):
            common = {"seed": seed, "epochs": args.epochs, "size": args.size}
            asha = run_one(
                "TPE+ASHA",
                demo_space(
                    name=f"p3-tpe-asha-{seed}",
                    sampler="tpe",
                    grace=grace,
                    trials=asha_trials,
                    **common,
                ),
                dataset=dataset,
                tmp=tmp,
            )
            random = run_one(
                "random (no stop)",
                demo_space(
                    name=f"p3-random-{seed}",
                    sampler="random",
                    grace=None,
                    trials=random_trials,
                    **common,
                ),
                dataset=dataset,
                tmp=tmp,
            )
            target = random.best_within(args.budget)
            for run in (asha, random):
                results[run.label].append(
                    (run.best_within(args.budget), run.epochs_to_reach(target))
                )
            print(seed_table(seed, args.budget, [asha, random], target=target), flush=True)
    print(summary(results, budget=args.budget))
    print(f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
