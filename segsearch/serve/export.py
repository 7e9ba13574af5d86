"""`segsearch export`: a model as one ONNX, TorchScript or torch.export (pt2) file, checked.

What is written is the model's `MaskPredictor` (resize to the trained size, normalise, net, resize
back) with one input and two outputs, any batch size, height and width:
- `images`: uint8 (N,H,W,C), C the model's channels;
- `masks`: int64 (N,H,W), the argmax of the logits; `logits`: float32 (N,K,H,W) at the input's size.

Nothing is kept unchecked: the written file is loaded back in its own runtime (onnxruntime,
`torch.jit.load`, `torch.export.load`) and run on real images of the model's dataset, each at its
own size and cropped to another one (a file fixed to one input size fails), and on a batch of them.
Its masks must equal PyTorch's on at least 99.9 % of the pixels and every logit must be within
LOGIT_ATOL + LOGIT_RTOL·|logit| of PyTorch's. A file that fails is not written to OUT.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from segsearch.errors import UserError, first_line
from segsearch.serve.predictor import MaskPredictor, fit_channels

__all__ = [
    "FORMATS",
    "Check",
    "ExportFailed",
    "Exported",
    "check_file",
    "check_images",
    "export",
    "write_file",
]

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
"""Format → the file suffix it is written with."""
MIN_MASK_AGREEMENT = 0.999
LOGIT_ATOL = 1e-3
LOGIT_RTOL = 1e-3
CHECK_IMAGES = 8
EXAMPLE_SHAPE = (2, 64, 96)
"""Example input N,H,W for tracing: N > 1 and H != W keep the three dimensions apart."""
INPUT, OUTPUTS = "images", ("masks", "logits")
_Runner = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class ExportFailed(Exception):
    """The export could not be written, or did not match PyTorch: failed work, not bad input."""


@dataclass(frozen=True)
class Check:
    """How an exported file's outputs compare with PyTorch's on the check images."""

    inputs: int
    pixels: int
    mask_agreement: float
    max_logit_diff: float
    logits_within: bool

    @property
    def passed(self) -> bool:
        return self.mask_agreement >= MIN_MASK_AGREEMENT and self.logits_within

    def describe(self) -> str:
        """One line: both figures and what they had to meet."""
        return (
            f"masks equal on {100 * self.mask_agreement:.3f} % of {self.pixels} pixels "
            f"(need ≥ {100 * MIN_MASK_AGREEMENT:g} %), logits differ by up to "
            f"{self.max_logit_diff:.3g} (allowed {LOGIT_ATOL:g} + {LOGIT_RTOL:g}·|logit|), "
            f"over {self.inputs} inputs"
        )


@dataclass(frozen=True)
class Exported:
    """A checked export: where it went, in which format, and how it compared."""

    out: str
    fmt: str
    check: Check
    dataset: str
    split: str


def export(
    model_uri: str,
    out: str,
    *,
    fmt: str,
    dataset: str | None = None,
    images: int = CHECK_IMAGES,
    tracking_uri: str | None = None,
) -> Exported:
    """Write the model's predictor to `out` (local or s3://) in `fmt`, once it passed its check.

    The check images come from `dataset`, else the dataset the model was trained on.
    """
    from segsearch.serve.predict import load_network

    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if images < 1:
        raise UserError(f"--check-images must be at least 1, got {images}")
    if Path(out).is_dir():
        raise UserError(
            f"{out} is a folder; give the file to write, e.g. {out}/model{FORMATS[fmt]}"
        )
    net, meta = load_network(model_uri, tracking_uri=tracking_uri)
    predictor = MaskPredictor(net, meta).eval()
    source = dataset or meta.get("dataset")
    if not source:
        raise UserError(f"model {model_uri} names no dataset; pass --dataset for the check images")
    split, samples = check_images(source, images, given=dataset is not None)
    with tempfile.TemporaryDirectory(prefix="segsearch-export-") as tmp:
        path = Path(tmp) / f"model{FORMATS[fmt]}"
        write_file(predictor, path, fmt)
        check = check_file(path, fmt, predictor, samples)
        if not check.passed:
            raise ExportFailed(
                f"{fmt} export of {model_uri} failed its check on {source} ({split}): "
                f"{check.describe()}"
            )
        _publish(path, out)
    return Exported(out=out, fmt=fmt, check=check, dataset=source, split=split)


def check_images(dataset: str, count: int, *, given: bool = True) -> tuple[str, list[np.ndarray]]:
    """The split used (val when it has images) and up to `count` of its images, in shard order."""
    from segsearch.data.format import read_dataset_info
    from segsearch.data.images import decode_image
    from segsearch.serve.predict import split_rows

    hint = "" if given else " (the model's dataset; pass --dataset with images like it)"
    try:
        info = read_dataset_info(dataset)
        splits = [name for name, size in info.splits.items() if size]
        if not splits:
            raise UserError(f"{dataset} has no images")
        split = "val" if "val" in splits else splits[0]
        rows = itertools.islice(split_rows(dataset, split, columns=("image",)), count)
        return split, [decode_image(row["image"]) for _, row in rows]
    except UserError as err:
        raise UserError(f"check images: {err}{hint}") from None


def write_file(predictor: MaskPredictor, path: Path, fmt: str) -> None:
    """Export the predictor, with dynamic batch, height and width, to one local file."""
    module = _Outputs(predictor.cpu().eval()).eval()
    rng = np.random.default_rng(0)
    example = torch.from_numpy(
        rng.integers(0, 256, (*EXAMPLE_SHAPE, predictor.channels), dtype=np.uint8)
    )
    try:
        with warnings.catch_warnings():
            # torch 2.13's own exporters trip their pytree deprecation (LeafSpec): not the user's.
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            _write(module, example, path, fmt)
    except (UserError, ExportFailed):
        raise
    except Exception as err:
        raise ExportFailed(f"{fmt} export failed: {first_line(err)}") from err


def _write(module: nn.Module, example: torch.Tensor, path: Path, fmt: str) -> None:
    if fmt == "onnx":
        _write_onnx(module, example, path)
    elif fmt == "torchscript":
        with torch.no_grad():
            torch.jit.trace(module, (example,)).save(str(path))
    else:
        program = torch.export.export(module, (example,), dynamic_shapes=_dynamic_shapes())
        torch.export.save(program, str(path))


def check_file(
    path: Path, fmt: str, predictor: MaskPredictor, images: Sequence[np.ndarray]
) -> Check:
    """Run the file in its runtime and the predictor in PyTorch on the same inputs; compare."""
    run = _runner(path, fmt)
    module = _Outputs(predictor.cpu().eval()).eval()
    equal = pixels = inputs = 0
    max_diff, within = 0.0, True
    for batch in _check_inputs([fit_channels(image, predictor.channels) for image in images]):
        with torch.no_grad():
            want_masks, want_logits = (t.numpy() for t in module(torch.from_numpy(batch)))
        try:
            masks, logits = run(batch)
        except Exception as err:
            raise ExportFailed(
                f"{fmt} file fails on an input of shape {batch.shape}: {first_line(err)}"
            ) from err
        if masks.shape != want_masks.shape or logits.shape != want_logits.shape:
            raise ExportFailed(
                f"{fmt} file gives masks {masks.shape} and logits {logits.shape} for input "
                f"{batch.shape}; PyTorch gives {want_masks.shape} and {want_logits.shape}"
            )
        equal += int((masks == want_masks).sum())
        pixels += want_masks.size
        inputs += len(batch)
        diff = np.abs(logits.astype(np.float64) - want_logits)
        max_diff = max(max_diff, float(diff.max()))
        within = within and bool((diff <= LOGIT_ATOL + LOGIT_RTOL * np.abs(want_logits)).all())
    return Check(
        inputs=inputs,
        pixels=pixels,
        mask_agreement=equal / pixels,
        max_logit_diff=max_diff,
        logits_within=within,
    )


class _Outputs(nn.Module):
    """The predictor with both outputs: class ids and the logits they are the argmax of."""

    def __init__(self, predictor: MaskPredictor) -> None:
        super().__init__()
        self.predictor = predictor

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.predictor.logits(images)
        return logits.argmax(1), logits


def _dynamic_shapes() -> tuple[dict[int, object], ...]:
    from torch.export import Dim

    return ({0: Dim("batch"), 1: Dim("height"), 2: Dim("width")},)


def _write_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.onnx's exporter (torch.export based); it needs the `onnx` extra (onnxscript)."""
    _require("onnxscript", "ONNX export")
    # It warns once per torchvision operator it cannot register; segsearch uses none of them.
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration.level
    registration.setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            module,
            (example,),
            dynamic_shapes=_dynamic_shapes(),
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            external_data=False,
            verbose=False,
        )
    finally:
        registration.setLevel(level)
    program.save(str(path))


def _runner(path: Path, fmt: str) -> _Runner:
    """A function running the exported file on a uint8 batch, in the file's own runtime."""
    if fmt == "onnx":
        ort = _require("onnxruntime", "checking an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda batch: tuple(session.run(list(OUTPUTS), {INPUT: batch}))
    if fmt == "torchscript":
        module = torch.jit.load(str(path), map_location="cpu")
    else:
        module = torch.export.load(str(path)).module()

    def run(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            masks, logits = module(torch.from_numpy(batch))
        return masks.numpy(), logits.numpy()

    return run


def _check_inputs(images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Each image alone, each cropped to about 3/4 × 2/3 of its size, and the images of the
    first one's size (up to 4) as one batch."""
    batches = [image[None] for image in images]
    for image in images:
        height, width = image.shape[:2]
        batches.append(image[None, : max(1, 3 * height // 4), : max(1, 2 * width // 3)])
    same = [image for image in images if image.shape == images[0].shape][:4]
    if len(same) > 1:
        batches.append(np.stack(same))
    return [np.array(batch, order="C") for batch in batches]


def _require(module: str, what: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(
            f"{what} needs {module}: install segsearch with the onnx extra "
            "(pip install 'segsearch[onnx]')"
        ) from None


def _publish(path: Path, out: str) -> None:
    """Copy the checked file to `out`: a local path (replaced whole, never half-written) or s3://."""
    from segsearch.data.storage import filesystem_for, is_s3, storage_errors

    if is_s3(out):
        filesystem, key = filesystem_for(out)
        with storage_errors(out), filesystem.open_output_stream(key) as stream:
            stream.write(path.read_bytes())
        return
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.partial")
    shutil.copyfile(path, partial)
    os.replace(partial, target)
