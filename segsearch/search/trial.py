"""One trial of a search: what every trial shares, and the Tune trainable that runs it as a Ray
Train job (a new Train run resumes the old one after a failure; bad data is never retried)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from ray.tune import Callback

from segsearch.config import TrialConfig
from segsearch.data.shards import OpenedDataset
from segsearch.errors import UserError, last_line, user_error_in
from segsearch.search.failover import TrialReport, failure_reason
from segsearch.search.progress import print_line
from segsearch.space import ResourcesSpec, nest

#: Validation images drawn in each trial's overlay picture.
OVERLAY_IMAGES = 4
#: Times run_trial starts a failed Train run again (from its last checkpoint); a UserError (bad
#: data found mid-trial) is never retried.
TRAIN_RETRIES = 1
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
    overlay: dict[str, list[np.ndarray]] = field(default_factory=dict)


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


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """Tune's trainable: run one trial as a Ray Train job and let TuneReportCallback relay it.

    A failed Train run starts again from its last checkpoint (same run name), at most
    TRAIN_RETRIES times; a failure caused by a UserError (bad data met mid-trial) is raised at
    once as that one line, since running it again would meet the same data.
    """
    import ray.tune
    from ray.train import TrainingFailedError

    trial = TrialConfig.from_dict({**nest(config), "epochs": context.epochs})
    trial_id = ray.tune.get_context().get_trial_id()
    reason = None
    for attempt in range(TRAIN_RETRIES + 1):
        report = TrialReport(restarts=attempt, reason=reason)
        try:
            _trainer(trial, trial_id, context, report).fit()
            return
        except TrainingFailedError as err:
            found = user_error_in(err)
            if found is not None:
                raise UserError(str(found)) from None
            if attempt == TRAIN_RETRIES:
                raise
            reason = failure_reason(err)


def _trainer(trial: TrialConfig, trial_id: str, context: TrialContext, report: TrialReport) -> Any:
    """The trial's TorchTrainer; named after the trial, so a new one resumes the same run."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from segsearch.data.ray_data import load_splits
    from segsearch.search.train import train_loop_per_worker

    datasets = load_splits(context.dataset, image_size=trial.image_size)
    wanted = context.resources
    resources = {"CPU": wanted.cpus_per_worker}
    if wanted.gpus_per_worker:
        resources["GPU"] = wanted.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "trial": trial,
            "dataset": context.dataset.uri,
            "dataset_info": context.dataset.info,
            "overlay": overlay_at(context.overlay, trial.image_size),
            "launched_at": time.time(),
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=wanted.workers,
            use_gpu=wanted.gpus_per_worker > 0,
            resources_per_worker=resources,
            placement_strategy=wanted.placement_strategy,
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split="all"),
        run_config=ray.train.RunConfig(
            name=f"train-{trial_id}",
            storage_path=f"{context.storage.rstrip('/')}/{context.search_name}-train",
            failure_config=ray.train.FailureConfig(max_failures=0),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=[report],
        ),
    )


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
