"""The Python API, for notebooks and scripts: the CLI's commands as functions with typed results.

    import segsearch
    result = segsearch.search("search_spaces/demo.yaml", dataset="data/demo", trials=4)
    result.to_dataframe()

Each call leaves the process as it found it: environment variables, the working directory, the
root logger, the levels of the Ray, MLflow and Optuna loggers segsearch quiets, Ray Data's
progress-bar settings and MLflow's global tracking URI are put back when it returns or raises.
What stays on purpose: a local Ray started by `search` keeps running for the next call
(`ray.shutdown()` ends it), as Ray Tune leaves it. Progress lines are log records of the
`segsearch` logger, shown during the call unless `quiet=True`. Errors are `segsearch.UserError`
(bad input; `ServiceUnavailable` for an unreachable S3, MLflow or Ray) and `SearchInterrupted`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from segsearch.console import console
from segsearch.errors import UserError

if TYPE_CHECKING:
    from segsearch.data.format import DatasetInfo
    from segsearch.search.plan import SearchPlan
    from segsearch.search.tuner import SearchResult
    from segsearch.serve.evaluate import Evaluation
    from segsearch.serve.predictor import MaskPredictor
    from segsearch.serve.promote import Promotion
    from segsearch.space import SearchSpec
    from segsearch.tracking.catalog import BestTrial, SearchSummary

__all__ = [
    "Model",
    "best",
    "evaluate",
    "ingest",
    "load_model",
    "plan",
    "predict",
    "predict_files",
    "promote",
    "search",
    "searches",
]

#: Loggers whose levels segsearch changes during a call (Ray's, MLflow's, Optuna's).
_TOUCHED_LOGGERS = (
    "ray",
    "ray.tune",
    "ray.tune.tune",
    "ray.train",
    "ray.data",
    "mlflow",
    "optuna",
    "ray.dashboard.modules.dashboard_sdk",
    "ray.dashboard.modules.job.sdk",
    "ray._private.runtime_env.packaging",
)
_MLFLOW = ("mlflow",)
_SEARCH = ("ray.tune", "ray.train", "ray.data", "mlflow", "optuna")


def search(
    space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpec,
    *,
    dataset: str,
    name: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    storage: str | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
    resume: bool = False,
    dashboard: bool = False,
    quiet: bool = False,
) -> SearchResult:
    """Run (or `resume`) a search: `space` is a YAML file, a mapping like its content, or a
    SearchSpec; the rest as `segsearch search`. Raises SearchInterrupted on Ctrl-C (the kernel's
    interrupt button): `resume=True` continues it."""
    from segsearch.console import echo
    from segsearch.search.tuner import run_search

    spec, path = _spec(space, name=name, trials=trials, epochs=epochs)
    with _kept_process_state(_SEARCH), console(-1 if quiet else 0):
        return run_search(
            spec,
            dataset=dataset,
            storage=storage,
            resume=resume,
            address=address,
            tracking_uri=tracking_uri,
            space_path=path,
            echo=echo,
            dashboard=dashboard,
        )


def plan(
    space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpec,
    *,
    dataset: str,
    name: str | None = None,
    trials: int | None = None,
    epochs: int | None = None,
    address: str | None = None,
    tracking_uri: str | None = None,
) -> SearchPlan:
    """What `search` would run (`segsearch search --dry-run`): checks, sampled configs and
    resources."""
    from segsearch.search.plan import plan_search

    spec, _ = _spec(space, name=name, trials=trials, epochs=epochs)
    with _kept_process_state(_SEARCH):
        return plan_search(spec, dataset=dataset, address=address, tracking_uri=tracking_uri)


def ingest(
    images: str | os.PathLike[str],
    masks: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    classes: Sequence[str] | str,
    val_fraction: float = 0.2,
    seed: int = 0,
    shard_size_mb: float = 256,
    colors: Sequence[str] | str | None = None,
    ignore_index: int = 255,
    overwrite: bool = False,
) -> DatasetInfo:
    """Pair images with masks and write a dataset at `dest` (`segsearch ingest`)."""
    from segsearch.data.ingest import ingest as run_ingest

    with _kept_process_state():
        return run_ingest(
            images,
            masks,
            dest,
            classes=classes,
            val_fraction=val_fraction,
            seed=seed,
            shard_size_mb=shard_size_mb,
            colors=colors,
            ignore_index=ignore_index,
            overwrite=overwrite,
        )


def promote(
    search_name: str,
    *,
    model_name: str,
    alias: str = "champion",
    metric: str = "val_miou",
    mode: str = "max",
    force: bool = False,
    tracking_uri: str | None = None,
) -> Promotion:
    """Register the search's best finished trial and point `alias` at it (`segsearch promote`)."""
    from segsearch.serve.promote import promote as run_promote

    with _kept_process_state(_MLFLOW):
        return run_promote(
            search_name,
            model_name=model_name,
            alias=alias,
            metric=metric,
            mode=mode,
            force=force,
            tracking_uri=tracking_uri,
        )


def evaluate(
    model_uri: str,
    dataset: str,
    *,
    split: str = "test",
    tracking_uri: str | None = None,
    batch_size: int = 8,
    device: str = "auto",
    log: bool = True,
) -> Evaluation:
    """Score a model on a split at native resolution (`segsearch evaluate`)."""
    from segsearch.serve.evaluate import evaluate as run_evaluate

    with _kept_process_state(_MLFLOW):
        return run_evaluate(
            model_uri,
            dataset,
            split=split,
            tracking_uri=tracking_uri,
            batch_size=batch_size,
            device=device,
            log=log,
        )


def searches(*, tracking_uri: str | None = None) -> list[SearchSummary]:
    """The searches in the tracking store, newest first (`segsearch list`)."""
    from segsearch.tracking.catalog import list_searches

    with _kept_process_state(_MLFLOW):
        return list_searches(tracking_uri=tracking_uri)


def best(search_name: str, *, tracking_uri: str | None = None) -> BestTrial:
    """The best trial of a search, with its run and model (`segsearch best`)."""
    from segsearch.tracking.catalog import best_trial

    with _kept_process_state(_MLFLOW):
        return best_trial(search_name, tracking_uri=tracking_uri)


@dataclass(frozen=True, eq=False)
class Model:
    """A trained model ready to segment images in memory: uint8 arrays (H,W,C or H,W) or PIL
    images in, class-id masks (H,W uint8, the image's size) out."""

    uri: str
    classes: tuple[str, ...]
    predictor: MaskPredictor

    def predict(self, image: Any) -> np.ndarray:
        """The class-id mask of one image."""
        return self.predict_many([image])[0]

    def predict_many(self, images: Sequence[Any]) -> list[np.ndarray]:
        """Masks of several images, batched where their network input shapes agree."""
        from segsearch.serve.predict import shape_batches
        from segsearch.serve.predictor import predict_masks

        arrays = [_as_image(image) for image in images]
        masks: list[np.ndarray] = []
        shape = self.predictor.input_shape
        for batch in shape_batches(arrays, shape, 8):
            masks.extend(predict_masks(self.predictor, batch))
        return masks

    def overlay(self, image: Any, mask: np.ndarray | None = None) -> np.ndarray:
        """The image (RGB uint8) with its mask's classes blended in, to show in a notebook."""
        from segsearch.visualize import overlay

        array = _as_image(image)
        labels = self.predict(array) if mask is None else mask
        return overlay(array, labels, num_classes=len(self.classes))


def load_model(model_uri: str, *, tracking_uri: str | None = None, device: str = "auto") -> Model:
    """A Model from models:/NAME@alias, models:/NAME/VERSION, runs:/ID/model or a checkpoint
    directory (local or s3://)."""
    from segsearch.serve.predict import load_network, pick_device
    from segsearch.serve.predictor import MaskPredictor

    with _kept_process_state(_MLFLOW):
        net, meta = load_network(model_uri, tracking_uri=tracking_uri)
        predictor = MaskPredictor(net, meta).eval().to(pick_device(device))
    classes = tuple(str(name) for name in meta["classes"])
    return Model(uri=model_uri, classes=classes, predictor=predictor)


def predict(
    model_uri: str, image: Any, *, tracking_uri: str | None = None, device: str = "auto"
) -> np.ndarray:
    """The class-id mask of one image (array, PIL image or image file path), with the model at
    `model_uri`; `load_model` once for many images."""
    return load_model(model_uri, tracking_uri=tracking_uri, device=device).predict(image)


def predict_files(
    model_uri: str,
    source: str,
    dest: str,
    *,
    overlay: bool = False,
    batch_size: int = 8,
    device: str = "auto",
    tracking_uri: str | None = None,
) -> int:
    """Segment a folder of images or a dataset into DEST/masks (`segsearch predict`); the count."""
    from segsearch.serve.predict import predict as run_predict

    with _kept_process_state(_MLFLOW):
        return run_predict(
            model_uri,
            source,
            dest,
            overlay=overlay,
            batch_size=batch_size,
            device=device,
            tracking_uri=tracking_uri,
        )


def _spec(
    space: str | os.PathLike[str] | Mapping[str, Any] | SearchSpec, **overrides: Any
) -> tuple[SearchSpec, Path | None]:
    """The SearchSpec (with overrides) and its file, if it came from one."""
    from segsearch.space import SearchSpec, load_space, parse_space

    if isinstance(space, SearchSpec):
        spec, path = space, None
    elif isinstance(space, Mapping):
        spec, path = parse_space(space), None
    else:
        path = Path(space)
        spec = load_space(path)
    return spec.with_overrides(**overrides), path


def _as_image(image: Any) -> np.ndarray:
    """An image as H,W,C uint8: a numpy array (H,W or H,W,C), a PIL image or a file path."""
    from segsearch.data.images import decode_image

    if isinstance(image, str | os.PathLike):
        try:
            return decode_image(Path(image).read_bytes())
        except OSError as err:
            raise UserError(f"{image}: cannot read the image ({err.strerror})") from None
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.dtype != np.uint8:
        raise UserError(
            f"an image must be uint8 H,W or H,W,C, got {array.dtype} of shape {array.shape}"
        )
    return array[:, :, :3] if array.shape[2] == 4 else array


@contextlib.contextmanager
def _kept_process_state(libraries: Sequence[str] = ()) -> Iterator[None]:
    """Put back, after the block, what segsearch changes process-wide while it works.

    `libraries` are imported first, so that what they set up on import (their loggers) is the
    state kept, not undone.
    """
    for module in libraries:
        importlib.import_module(module)
    environ = dict(os.environ)
    cwd = os.getcwd()
    root = logging.getLogger()
    root_state = (root.level, list(root.handlers), root.disabled)
    levels = {name: logging.getLogger(name).level for name in _TOUCHED_LOGGERS}
    with contextlib.ExitStack() as stack:
        stack.callback(_restore_environ, environ)
        stack.enter_context(_kept_library_state())
        try:
            yield
        finally:
            if os.getcwd() != cwd:
                os.chdir(cwd)
            root.setLevel(root_state[0])
            root.handlers[:] = root_state[1]
            root.disabled = root_state[2]
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def _kept_library_state() -> Iterator[None]:
    """Ray Data's progress-bar settings and MLflow's global tracking URI, when loaded."""
    import sys

    saved: list[tuple[Any, str, Any]] = []
    if "ray.data" in sys.modules:
        from ray.data import DataContext

        context = DataContext.get_current()
        for flag in ("enable_progress_bars", "enable_operator_progress_bars"):
            saved.append((context, flag, getattr(context, flag)))
        saved.append((context, "print_on_execution_start", context.print_on_execution_start))
    tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
    uri = getattr(tracking, "_tracking_uri", None)
    try:
        yield
    finally:
        for owner, flag, value in saved:
            setattr(owner, flag, value)
        tracking = sys.modules.get("mlflow.tracking._tracking_service.utils")
        if tracking is not None and tracking._tracking_uri != uri:
            tracking.set_tracking_uri(uri)  # None unsets it, as before the call


def _restore_environ(saved: dict[str, str]) -> None:
    for key in set(os.environ) - set(saved):
        del os.environ[key]
    for key, value in saved.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
