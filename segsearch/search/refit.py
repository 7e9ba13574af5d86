"""After the search: train its best configurations again at full fidelity, count the compute
spent, and score the model it ends with on the dataset's `test` split.

A refit is a second Tune run over the same trainable (`run_trial`, one Ray Train run per trial)
with its configurations fixed (`FixedConfigs`) and the refit's epochs and training splits,
tracked as `refit` runs under the search's parent run.
"""

from __future__ import annotations

import math
import pickle
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from ray.tune.search import Searcher

from segsearch.data.format import DatasetInfo
from segsearch.search.epochs import trial_rows
from segsearch.search.trial import (
    TrialContext,
    config_key,
    run_config,
    trainable,
)
from segsearch.space import RefitSpec, ResourcesSpec
from segsearch.tracking import RefitPhase, SearchTracker
from segsearch.values import is_number

#: A search's refit is the Tune experiment `<search name><REFIT_SUFFIX>` beside the search's.
REFIT_SUFFIX = "-refit"
#: The split a search's final model is scored on, when the dataset has it.
TEST_SPLIT = "test"


def refit_path(storage: str, search_name: str) -> str:
    return f"{storage.rstrip('/')}/{search_name}{REFIT_SUFFIX}"


def refit_phase(rows: Sequence[Mapping[str, Any]], refit: RefitSpec, metric: str) -> RefitPhase:
    """The top_k scored trials of the search (rows best first) as the refit's sources."""
    scored = [row for row in rows if row[metric] is not None and row["error"] is None]
    sources = tuple(
        (row["trial_id"], dict(row["config"]), row[metric]) for row in scored[: refit.top_k]
    )
    return RefitPhase(epochs=refit.epochs, on=refit.on, sources=sources)


def refit_starts(
    rows: Sequence[Mapping[str, Any]], phase: RefitPhase, refit: RefitSpec, storage: str
) -> dict[str, str]:
    """With `from: checkpoint`, each source config's (`config_key`) best-epoch checkpoint URI,
    which its refit starts from; empty with `from: scratch`."""
    if refit.start != "checkpoint":
        return {}
    checkpoints = {row["trial_id"]: row["checkpoint"] for row in rows if row["checkpoint"]}
    return {
        config_key(config): checkpoint_uri(checkpoints[trial_id], storage)
        for trial_id, config, _ in phase.sources
        if trial_id in checkpoints
    }


def refit_tuner(
    phase: RefitPhase,
    context: TrialContext,
    *,
    name: str,
    storage: str,
    tracker: SearchTracker,
    concurrency: int,
    restore: bool,
    echo: Callable[[str], None],
    starts: Mapping[str, str] | None = None,
) -> Any:
    """The Tuner that trains the phase's configurations for its epochs (on train, or train+val),
    each from its trial's checkpoint where `starts` (`refit_starts`) has one.

    A failed refit trial is retried once as a search's trial is (`TUNE_RETRIES`, run_trial);
    `--resume` restores an interrupted refit from its own experiment folder.
    """
    import ray.tune

    splits = ("train",) if phase.held_out else ("train", "val")
    refit_context = replace(
        context,
        search_name=f"{name}{REFIT_SUFFIX}",
        epochs=phase.epochs,
        train_splits=splits,
        start_from=dict(starts or {}),
    )
    function = trainable(refit_context)
    path = refit_path(storage, name)
    if restore:
        echo(f"resuming the refit of {name!r} from {path}")
        return ray.tune.Tuner.restore(
            path, trainable=function, resume_unfinished=True, resume_errored=True
        )
    configs = [dict(config) for _, config, _ in phase.sources]
    start = "their trials' best checkpoints" if starts else "scratch"
    echo(
        f"refit: {len(configs)} best configuration(s) for {phase.epochs} epochs on {phase.on}, "
        f"from {start}"
    )
    return ray.tune.Tuner(
        function,
        tune_config=ray.tune.TuneConfig(
            search_alg=FixedConfigs(configs),
            num_samples=len(configs),
            max_concurrent_trials=concurrency,
            reuse_actors=True,
        ),
        run_config=run_config(
            f"{name}{REFIT_SUFFIX}",
            storage=storage,
            resources=context.resources,
            metric=context.metric,
            epochs=phase.epochs,
            tune_callback=tracker.tune_callback(),
            echo=echo,
        ),
    )


class FixedConfigs(Searcher):
    """Suggests each of the given trial configurations once, as they are, then no more.

    Tune's own `points_to_evaluate` will not do: it sets each key of a point into the param
    space, which must have them all, and a conditional parameter absent from one configuration
    would then come back into it.
    """

    def __init__(self, configs: Sequence[Mapping[str, Any]]) -> None:
        super().__init__()
        self._configs = [dict(config) for config in configs]
        self._given = 0

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        if self._given >= len(self._configs):
            return Searcher.FINISHED
        self._given += 1
        return dict(self._configs[self._given - 1])

    def on_trial_complete(self, trial_id: str, result: Any = None, error: bool = False) -> None:
        """Nothing to learn: the configurations are fixed."""

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as handle:
            pickle.dump({"configs": self._configs, "given": self._given}, handle)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as handle:
            state = pickle.load(handle)
        self._configs, self._given = state["configs"], state["given"]


def refit_rows(grid: Any, phase: RefitPhase, *, metric: str, mode: str) -> list[dict[str, Any]]:
    """The refit trials as rows with their source (`refit_of`, `rank`): best first when val was
    held out, else in the order of their sources (no val score to rank them by)."""
    rows = trial_rows(grid, metric=metric, mode=mode, held_out=phase.held_out)
    for row in rows:
        row["rank"] = phase.rank_of(row["config"])
        row["refit_of"] = phase.sources[row["rank"] - 1][0] if row["rank"] else None
    if not phase.held_out:
        rows.sort(key=lambda row: row["rank"] or math.inf)
    return rows


def chosen_refit(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The refit whose model the search ends with (and promote takes): the first finished one
    with a checkpoint (rows are best first)."""
    return next((r for r in rows if r["error"] is None and r["checkpoint"]), None)


@dataclass(frozen=True)
class Compute:
    """What a search (and its refit) cost, to compare with a baseline given the same total:
    image-epochs (epochs run × training images), wall seconds, and worker seconds (Σ of every
    epoch's time × workers per trial: GPU-seconds with one GPU per worker)."""

    search_image_epochs: float
    search_wall_s: float
    search_worker_s: float
    refit_image_epochs: float = 0.0
    refit_wall_s: float = 0.0
    refit_worker_s: float = 0.0
    train_images: int = 0

    @property
    def total_image_epochs(self) -> float:
        return self.search_image_epochs + self.refit_image_epochs

    def metrics(self) -> dict[str, float]:
        """The parent run's `compute_*` metrics; `compute_baseline_epochs` is how many epochs a
        single model on the train split gets for the same image-epochs."""
        values = {
            "search_image_epochs": self.search_image_epochs,
            "refit_image_epochs": self.refit_image_epochs,
            "total_image_epochs": self.total_image_epochs,
            "search_wall_s": self.search_wall_s,
            "refit_wall_s": self.refit_wall_s,
            "total_wall_s": self.search_wall_s + self.refit_wall_s,
            "search_worker_s": self.search_worker_s,
            "refit_worker_s": self.refit_worker_s,
            "total_worker_s": self.search_worker_s + self.refit_worker_s,
        }
        if self.train_images:
            values["baseline_epochs"] = self.total_image_epochs / self.train_images
        return {f"compute_{key}": value for key, value in values.items()}

    def describe(self) -> str:
        """One line for the search's output."""
        line = (
            f"compute: search {self.search_image_epochs:g} image-epochs, "
            f"{self.search_wall_s:.0f} s wall, {self.search_worker_s:.0f} worker-s"
        )
        if self.refit_image_epochs:
            line += (
                f"; refit {self.refit_image_epochs:g} image-epochs, {self.refit_wall_s:.0f} s "
                f"wall, {self.refit_worker_s:.0f} worker-s"
            )
        if self.train_images:
            baseline = self.total_image_epochs / self.train_images
            line += f"; in all {self.total_image_epochs:g} = {baseline:g} epochs of the train split"
        return line


def spent(
    rows: Sequence[Mapping[str, Any]], *, images: int, resources: ResourcesSpec
) -> tuple[float, float]:
    """(image-epochs, worker seconds) of the trials' reported epochs (`images` per epoch); an
    epoch reported twice (a resumed trial repeats its last) counts once."""
    epochs = 0
    seconds = 0.0
    for row in rows:
        times = {epoch.get("epoch"): epoch.get("epoch_time_s") for epoch in row["history"]}
        epochs += len(times)
        seconds += sum(float(t) for t in times.values() if is_number(t) and math.isfinite(t))
    return float(epochs * images), seconds * resources.workers


def training_images(info: DatasetInfo, on: str) -> int:
    """Images in one epoch of training on `on` (train, or train+val)."""
    return sum(info.splits.get(split, 0) for split in on.split("+"))


def checkpoint_uri(path: str, storage: str) -> str:
    """A checkpoint path as Tune reports it (without a scheme on S3) as a URI `evaluate` opens."""
    if "://" in path or "://" not in storage:
        return path
    return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"


def evaluate_on_test(
    checkpoint: str, dataset: str, info: DatasetInfo, echo: Callable[[str], None]
) -> Any:
    """The final model's Evaluation on the `test` split at native resolution; None when the
    dataset has no test split (or it cannot be scored: then a warning says why)."""
    from segsearch.errors import UserError, first_line
    from segsearch.serve.evaluate import evaluate

    if not info.splits.get(TEST_SPLIT):
        return None
    try:
        return evaluate(checkpoint, dataset, split=TEST_SPLIT, log=False)
    except Exception as err:  # the search is done: its result stands without this figure
        reason = str(err) if isinstance(err, UserError) else first_line(err)
        echo(f"warning: the final model was not scored on the {TEST_SPLIT} split: {reason}")
        return None
