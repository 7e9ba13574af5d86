"""One trial of a search: what every trial shares, and the Tune trainable that runs it, in its
own process (one worker) or as a Ray Train job (several); a failed run resumes from its last
checkpoint, bad data is never trained on again."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from segsearch.config import TrialConfig
from segsearch.data.format import DatasetInfo
from segsearch.data.shards import OpenedDataset
from segsearch.data.trial_data import SearchData, TrialData
from segsearch.errors import UserError, last_line, user_error_in
from segsearch.search.budget import BudgetStopper, Ledger, TrialCosts
from segsearch.search.capacity import in_trial_process
from segsearch.search.failover import TrialReport, failure_reason
from segsearch.search.placement import ReleasePlacementGroups
from segsearch.search.progress import TrialProgress, print_line
from segsearch.space import ResourcesSpec, nest

#: Validation images drawn in each trial's overlay picture.
OVERLAY_IMAGES = 4
#: Times run_trial starts a failed Train run again (from its last checkpoint); a UserError (bad
#: data found mid-trial) is never retried.
TRAIN_RETRIES = 1
#: Times Tune starts a failed trial again from its last checkpoint. A one-worker trial's process
#: is its worker; a multi-worker trial's process drives its Train run, which restarts failed
#: workers itself (run_trial), but that process can be lost with its node all the same.
TUNE_RETRIES = 1
#: Checkpoints a Train run keeps besides its latest (which resumes it): the best by the search's
#: metric, so a trial offers the model of its best epoch, not of its last.
CHECKPOINTS_KEPT = 2
#: A trial's result history as Tune writes it in the trial's folder.
TRIAL_HISTORY_FILES = ("result.json", "progress.csv")


@dataclass(frozen=True)
class TrialContext:
    """What every trial of one search shares; shipped once through the object store."""

    search_name: str
    dataset: OpenedDataset
    storage: str
    epochs: int
    resources: ResourcesSpec
    data: SearchData
    overlay: dict[str, list[np.ndarray]] = field(default_factory=dict)
    metric: str = "val_miou"
    mode: str = "max"
    #: Whether each trial times its model after its first epoch (an objective needs it).
    measure_cost: bool = False
    #: The splits a trial trains on; with "val" among them (a refit on train+val) nothing is
    #: held out, and the run keeps its latest checkpoints instead of its best.
    train_splits: tuple[str, ...] = ("train",)
    #: A refit's starting weights: `config_key(config)` → the checkpoint its trial starts from.
    start_from: dict[str, str] = field(default_factory=dict)

    @property
    def held_out(self) -> bool:
        """Whether val is kept out of training, so its scores rank epochs and trials."""
        return "val" not in self.train_splits

    def training_info(self) -> DatasetInfo:
        """The DatasetInfo one trial trains with: its `train` counts the images of every
        training split (which sizes the lr schedule)."""
        info = self.dataset.info
        images = sum(info.splits[split] for split in self.train_splits)
        return replace(info, splits={**info.splits, "train": images})

    def checkpoint_config(self) -> Any:
        """Keep the latest checkpoint (resume) and the best by the metric (promotion)."""
        import ray.train

        if not self.held_out:
            return ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT)
        return ray.train.CheckpointConfig(
            num_to_keep=CHECKPOINTS_KEPT,
            checkpoint_score_attribute=self.metric,
            checkpoint_score_order=self.mode,
        )


class KeepTrialHistory(Callback):
    """Brings back a resumed trial's earlier results before Tune appends new ones to them.

    Tune appends every result to result.json and progress.csv in a staging folder on the driver
    and uploads that folder over the trial's folder in storage. A resumed search (a fresh Ray, or
    another machine) starts with an empty staging folder, so without this the upload replaced the
    trial's earlier epochs with the ones after the resume.
    """

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        import pyarrow.fs

        trial.init_local_path()
        filesystem = trial.storage.storage_filesystem
        for name in TRIAL_HISTORY_FILES:
            local = Path(trial.local_path, name)
            remote = f"{trial.storage.trial_fs_path}/{name}"
            try:
                stored = filesystem.get_file_info(remote).type == pyarrow.fs.FileType.File
                if stored and not local.exists():
                    pyarrow.fs.copy_files(remote, str(local), source_filesystem=filesystem)
            except OSError as err:  # storage unreachable: say so, and let the search go on
                print_line(f"warning: trial {trial.trial_id}: earlier {name} not restored ({err})")


def run_config(
    name: str,
    *,
    storage: str,
    resources: ResourcesSpec,
    metric: str,
    epochs: int,
    tune_callback: Callback,
    echo: Callable[[str], None],
    ledger: Ledger | None = None,
) -> Any:
    """Tune's RunConfig of a search or of its refit: Tune's retries of a trial, its costs (and
    the budget's hard limit with a `ledger`), one line per trial event, MLflow, placement groups
    released, and each trial's history kept."""
    import ray.tune

    return ray.tune.RunConfig(
        name=name,
        storage_path=storage,
        failure_config=ray.tune.FailureConfig(max_failures=TUNE_RETRIES),
        stop=BudgetStopper(ledger) if ledger is not None else None,
        callbacks=[
            TrialCosts(resources, ledger),
            TrialProgress(metric=metric, epochs=epochs, echo=echo),
            tune_callback,
            ReleasePlacementGroups(),
            KeepTrialHistory(),
        ],
        verbose=0,
    )


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune's trainable: train one trial in this process (one worker) or as a Ray Train job.

    A one-worker trial trains here, in the process (and with the resources) Tune gave the
    trial: no Train controller or worker group to start, and a reused process has torch
    imported already. Tune retries it once (`TUNE_RETRIES`) from its last checkpoint.

    A multi-worker trial is a Train run (DDP); failover.TrialReport relays its reports. A failed
    Train run starts again from its last checkpoint (same run name), at most TRAIN_RETRIES
    times.

    Either way a failure caused by a UserError (bad data met mid-trial) is raised as that one
    line and never trained again, since running it again would meet the same data.
    """
    timings = {"entered": time.time()}
    import ray.tune

    import segsearch.search.train  # noqa: F401  (torch and the models: once per process)

    timings["imported"] = time.time()
    trial = TrialConfig.from_dict({**nest(config), "epochs": context.epochs})
    trial_id = ray.tune.get_context().get_trial_id()
    start = context.start_from.get(config_key(config))
    if in_trial_process(context.resources):
        _train_here(trial, trial_id, context, timings, start)
        return
    from ray.train import TrainingFailedError

    reason = None
    for attempt in range(TRAIN_RETRIES + 1):
        report = TrialReport(restarts=attempt, reason=reason)
        try:
            _trainer(trial, trial_id, context, timings, start, report).fit()
            return
        except TrainingFailedError as err:
            found = user_error_in(err)
            if found is not None:
                raise UserError(str(found)) from None
            if attempt == TRAIN_RETRIES:
                raise
            reason = failure_reason(err)


def trainable(context: TrialContext) -> Any:
    """Tune's trainable for the trials of `context`: run_trial with the context shipped once,
    holding the worker's resources when the trial trains in its own process."""
    import ray.tune

    from segsearch.search.capacity import trial_resources

    function = ray.tune.with_parameters(run_trial, context=context)
    resources = trial_resources(context.resources)
    return function if resources is None else ray.tune.with_resources(function, resources)


def _train_here(
    trial: TrialConfig,
    trial_id: str,
    context: TrialContext,
    timings: dict[str, float],
    start: str | None,
) -> None:
    """A one-worker trial in this process, resumed from its RunFolder's last checkpoint.

    A data error is kept there for this driver's job: Tune's retry fails at once with the same
    line, while `--resume` (a new job, maybe after the data was fixed) trains again.
    """
    import ray

    from segsearch.search.train import train
    from segsearch.search.worker import RunFolder, TrialProcessWorker, trial_device

    run = RunFolder(
        f"{_runs_folder(context)}/{_run_name(trial_id)}",
        metric=context.metric if context.held_out else None,
        mode=context.mode,
    )
    job = ray.get_runtime_context().get_job_id()
    earlier = run.bad_data(job)
    if earlier is not None:
        raise UserError(earlier)
    try:
        data, info = _trial_data(trial, context)
        timings["data"] = time.time()
        device = trial_device(context.resources.gpus_per_worker)
        worker = TrialProcessWorker(run=run, device=device)
        train(_loop_config(trial, context, timings, data, info, start), worker)
    except UserError as err:
        run.mark_bad_data(str(err), job)
        raise


def _trainer(
    trial: TrialConfig,
    trial_id: str,
    context: TrialContext,
    timings: dict[str, float],
    start: str | None,
    report: TrialReport,
) -> Any:
    """The trial's TorchTrainer; named after the trial, so a new one resumes the same run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from segsearch.search.train import train_loop_per_worker

    data, info = _trial_data(trial, context)
    timings["data"] = time.time()
    wanted = context.resources
    resources = {"CPU": wanted.cpus_per_worker}
    if wanted.gpus_per_worker:
        resources["GPU"] = wanted.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=_loop_config(trial, context, timings, data, info, start),
        scaling_config=ray.train.ScalingConfig(
            num_workers=wanted.workers,
            use_gpu=wanted.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=wanted.placement_strategy,
        ),
        datasets=data.trainer_datasets(wanted.workers),
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        run_config=ray.train.RunConfig(
            name=_run_name(trial_id),
            storage_path=_runs_folder(context),
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=context.checkpoint_config(),
            callbacks=[report],
        ),
    )


def _trial_data(trial: TrialConfig, context: TrialContext) -> tuple[TrialData, DatasetInfo]:
    """Where the trial's batches come from (`train` the union of its training splits) and the
    DatasetInfo that counts them."""
    data = context.data.for_trial(
        image_size=trial.image_size,
        batch_size=trial.batch_size,
        seed=trial.seed,
        train_splits=context.train_splits,
    )
    return data, context.training_info()


def _loop_config(
    trial: TrialConfig,
    context: TrialContext,
    timings: dict[str, float],
    data: TrialData,
    info: DatasetInfo,
    start: str | None,
) -> dict[str, Any]:
    """`train.train`'s config (see there)."""
    return {
        "start_from": start,
        "trial": trial,
        "dataset": context.dataset.uri,
        "dataset_info": info,
        "data": data,
        "overlay": overlay_at(context.overlay, trial.image_size),
        "launched_at": timings["entered"],
        "timings": dict(timings),
        "measure_cost": context.measure_cost,
    }


def config_key(config: Mapping[str, Any]) -> str:
    """A trial config as text, the same for equal configs (a refit finds its start by it)."""
    return json.dumps(dict(config), sort_keys=True, default=str)


def _runs_folder(context: TrialContext) -> str:
    """Where the search's trials keep their runs' checkpoints (Train's storage_path)."""
    return f"{context.storage.rstrip('/')}/{context.search_name}-train"


def _run_name(trial_id: str) -> str:
    """A trial's run: its Train run's name, or, for a one-worker trial, its RunFolder's."""
    return f"train-{trial_id}"


def overlay_batch(dataset: OpenedDataset) -> dict[str, list[np.ndarray]]:
    """A fixed handful of validation images (at their own size) every trial draws its overlay
    picture from, resized to the trial's own image_size (`overlay_at`)."""
    from segsearch.data.ray_data import load_splits

    val = load_splits(dataset)["val"]
    try:
        batch = val.limit(OVERLAY_IMAGES).take_batch(OVERLAY_IMAGES, batch_format="numpy")
    except Exception as err:  # a shard that cannot be read or decoded: the data's fault
        reason = last_line(err)
        raise UserError(f"reading the val split of {dataset.uri} failed: {reason}") from None
    return {"image": list(batch["image"]), "mask": list(batch["mask"])}


def overlay_at(
    overlay: dict[str, list[np.ndarray]], image_size: tuple[int, int] | None
) -> dict[str, np.ndarray]:
    """The overlay images and masks as one batch at the trial's image size (the first image's
    size when the trial trains at each image's own size)."""
    from segsearch.data.ray_data import resize_pair

    if not overlay:
        return {}
    images, masks = overlay["image"], overlay["mask"]
    size = image_size or images[0].shape[:2]
    pairs = [resize_pair(image, mask, size) for image, mask in zip(images, masks, strict=True)]
    return {"image": np.stack([p[0] for p in pairs]), "mask": np.stack([p[1] for p in pairs])}
