"""Where `train.train` runs: what the training loop asks of its place (rank, device,
checkpoint, report), from a Ray Train worker of a multi-worker trial or from a one-worker
trial's own Tune process.

A one-worker trial needs no Train controller, worker group or DDP: its Tune trial holds the
worker's resources and trains in its own process (Ray Train V2's local mode does the same with
`ScalingConfig(num_workers=0)`, but its `report` keeps only the last metrics in memory: nothing
reaches Tune, no checkpoint is persisted, and `get_checkpoint` never finds the last run's).
Its checkpoints go where a Train run of the same name keeps its own (`RunFolder`), and each
report names its checkpoint in `checkpoint_path` as TuneReportCallback does, so tracking,
resuming and the search's result read both paths alike.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import ray.train
import torch
from torch import nn

from segsearch.data.storage import filesystem_for, join
from segsearch.values import is_number

#: Checkpoints a one-worker trial keeps besides its latest, as Train's CheckpointConfig does:
#: the best by the search's metric (the last ones when nothing is held out to score them).
CHECKPOINTS_KEPT = 2
#: The result key naming a report's checkpoint, as TuneReportCallback names it.
CHECKPOINT_PATH_KEY = "checkpoint_path"


class Worker(Protocol):
    """What the training loop needs from where it runs."""

    rank: int
    world: int
    device: torch.device
    placement_group: str | None

    def prepare_model(self, model: nn.Module) -> nn.Module: ...

    def checkpoint(self) -> ray.train.Checkpoint | None: ...

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None: ...


@dataclass
class RayTrainWorker:
    """A worker of a Ray Train run (DDP over its worker group)."""

    rank: int
    world: int
    device: torch.device
    placement_group: str | None

    def prepare_model(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint)


def ray_train_worker() -> RayTrainWorker:
    """This Ray Train worker's place in its run."""
    import ray.train.torch

    from segsearch.search import placement

    context = ray.train.get_context()
    return RayTrainWorker(
        rank=context.get_world_rank(),
        world=context.get_world_size(),
        device=ray.train.torch.get_device(),
        placement_group=placement.current_group_id(),
    )


class RunFolder:
    """A one-worker trial's checkpoints in storage: `checkpoint_<epoch>` folders and a small
    `latest_checkpoint.json` written after each is complete, so a process killed while one
    uploads resumes from the one before.

    With a `metric`, the CHECKPOINTS_KEPT best epochs by it (the later of equal ones) are kept
    besides the latest, so the trial offers its best epoch's model, as a Train run does with
    `checkpoint_score_attribute`; without one, the last CHECKPOINTS_KEPT.
    """

    LATEST = "latest_checkpoint.json"
    BAD_DATA = "bad_data.json"

    def __init__(self, uri: str, *, metric: str | None = None, mode: str = "max") -> None:
        self.filesystem, self.root = filesystem_for(uri)
        self.metric = metric
        self.mode = mode

    def latest(self) -> ray.train.Checkpoint | None:
        """The last complete checkpoint, or None before the first."""
        text = self._read(self.LATEST)
        if text is None:
            return None
        return ray.train.Checkpoint(json.loads(text)["path"], filesystem=self.filesystem)

    def save(self, directory: str, epoch: int, score: float | None = None) -> str:
        """Upload a local checkpoint folder as this epoch's (scored `score` by the metric);
        its path in storage."""
        import pyarrow.fs

        path = join(self.root, f"checkpoint_{epoch:06d}")
        self.filesystem.create_dir(path, recursive=True)
        pyarrow.fs.copy_files(directory, path, destination_filesystem=self.filesystem)
        scores = {**self._scores(), str(epoch): score}
        self._write(self.LATEST, json.dumps({"path": path, "epoch": epoch, "scores": scores}))
        self._prune(keep=self._kept(scores, latest=epoch))
        return path

    def _scores(self) -> dict[str, float | None]:
        """Each kept epoch's score, as the last save recorded them."""
        text = self._read(self.LATEST)
        return json.loads(text).get("scores", {}) if text else {}

    def _kept(self, scores: dict[str, float | None], *, latest: int) -> set[int]:
        """The latest epoch and the CHECKPOINTS_KEPT best (or last) ones."""
        epochs = sorted(int(epoch) for epoch in scores)
        if self.metric is None:
            return {latest, *epochs[-CHECKPOINTS_KEPT:]}
        sign = 1.0 if self.mode == "max" else -1.0
        scored = [e for e in epochs if is_number(scores[str(e)]) and not math.isnan(scores[str(e)])]
        ranked = sorted(scored, key=lambda e: (sign * scores[str(e)], e), reverse=True)
        return {latest, *ranked[:CHECKPOINTS_KEPT]}

    def bad_data(self, job: str) -> str | None:
        """The one-line data error an earlier attempt of this trial met in the same Ray job."""
        text = self._read(self.BAD_DATA)
        if text is None:
            return None
        found = json.loads(text)
        return found["error"] if found["job"] == job else None

    def mark_bad_data(self, line: str, job: str) -> None:
        """Remember a data error, so Tune's retry of the trial in this job fails at once."""
        self._write(self.BAD_DATA, json.dumps({"error": line, "job": job}))

    def _prune(self, keep: set[int]) -> None:
        import pyarrow.fs

        listing = self.filesystem.get_file_info(pyarrow.fs.FileSelector(self.root))
        for info in listing:
            epoch = Path(info.path).name.removeprefix("checkpoint_")
            is_folder = info.type == pyarrow.fs.FileType.Directory
            if is_folder and epoch.isdigit() and int(epoch) not in keep:
                self.filesystem.delete_dir(info.path)

    def _read(self, name: str) -> str | None:
        try:
            with self.filesystem.open_input_stream(join(self.root, name)) as stream:
                return stream.readall().decode()
        except FileNotFoundError:
            return None

    def _write(self, name: str, text: str) -> None:
        """Write whole or not at all: a local file is written aside and renamed over it."""
        self.filesystem.create_dir(self.root, recursive=True)
        aside = join(self.root, f".{name}.part")
        with self.filesystem.open_output_stream(aside) as stream:
            stream.write(text.encode())
        self.filesystem.move(aside, join(self.root, name))


@dataclass
class TrialProcessWorker:
    """The only worker of a one-worker trial: the Tune trial's own process, which holds the
    worker's resources; reports go to Tune, checkpoints to the trial's RunFolder."""

    run: RunFolder
    device: torch.device
    rank: int = 0
    world: int = 1
    placement_group: str | None = None  # Tune's own group: never released by the search

    def __post_init__(self) -> None:
        self._restored = self.run.latest()

    def prepare_model(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def checkpoint(self) -> ray.train.Checkpoint | None:
        return self._restored

    def report(self, metrics: dict[str, Any], checkpoint: ray.train.Checkpoint | None) -> None:
        import ray.tune

        result = dict(metrics)
        if checkpoint is self._restored and checkpoint is not None:
            result[CHECKPOINT_PATH_KEY] = checkpoint.path
        elif checkpoint is not None:
            score = metrics.get(self.run.metric) if self.run.metric else None
            epoch = int(metrics["epoch"])
            result[CHECKPOINT_PATH_KEY] = self.run.save(checkpoint.path, epoch, score=score)
        ray.tune.report(result)


def trial_device(gpus: float) -> torch.device:
    """The device of a one-worker trial's process: the GPU Ray gave it (CUDA_VISIBLE_DEVICES
    lists only that one), else the CPU."""
    if gpus > 0 and torch.cuda.is_available():
        torch.cuda.set_device(0)
        return torch.device("cuda", 0)
    return torch.device("cpu")
