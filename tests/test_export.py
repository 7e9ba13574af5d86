"""`segsearch export`: ONNX, TorchScript and pt2 files checked against PyTorch on real images."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from segsearch.checkpoint import load_model
from segsearch.data.ingest import write_dataset
from segsearch.serve import export as export_module
from segsearch.serve.export import MIN_MASK_AGREEMENT, check_file, check_images, write_file
from segsearch.serve.predictor import MaskPredictor
from tests.test_checkpoint import (
    CLASSES,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    toy_batch,
    train_tiny_checkpoint,
)
from tests.test_predict import expected_mask, run_cli
from tests.test_promote import Trial, make_search


def _needs(fmt: str) -> None:
    """ONNX export and its check need the `onnx` extra (in the `test` extra, so CI has it)."""
    if fmt == "onnx":
        for module in ("onnx", "onnxscript", "onnxruntime"):
            pytest.importorskip(module)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("checkpoint")
    train_tiny_checkpoint(directory)
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    images, masks = toy_batch(6, 40, seed=6)
    samples = [("train" if i < 2 else "val", f"s{i}", images[i], masks[i]) for i in range(6)]
    root = str(tmp_path_factory.mktemp("data") / "squares")
    write_dataset(root, samples, classes=CLASSES)
    return root


def run_file(path: Path, fmt: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Run an exported file on one image the way a user would, outside segsearch."""
    batch = image[None]
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        masks, logits = session.run(["masks", "logits"], {"images": batch})
        return masks[0], logits[0]
    if fmt == "torchscript":
        module = torch.jit.load(str(path))
    else:
        module = torch.export.load(str(path)).module()
    with torch.no_grad():
        masks, logits = module(torch.from_numpy(batch))
    return masks[0].numpy(), logits[0].numpy()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "pt2"])
def test_export_passes_its_check_and_runs_at_any_size(tmp_path, checkpoint, dataset, fmt):
    _needs(fmt)
    out = tmp_path / "exported" / f"model.{fmt}"
    result = run_cli("export", str(checkpoint), str(out), "--format", fmt, "--dataset", dataset)
    assert result.exit_code == 0, result.output
    assert f"wrote {out} ({fmt}); checked on {dataset} (val)" in result.output
    assert "over 12 inputs" in result.output  # 4 images, 4 crops, one batch of 4
    images, _ = toy_batch(2, 57, seed=9)
    for image in (images[0], images[1][:23, :41]):
        masks, logits = run_file(out, fmt, image)
        want = expected_mask(checkpoint, image)
        assert masks.shape == want.shape and logits.shape == (len(CLASSES), *want.shape)
        assert (masks == want).mean() >= MIN_MASK_AGREEMENT
        np.testing.assert_array_equal(logits.argmax(0), masks)


@pytest.mark.parametrize("fmt", ["onnx"])
def test_file_whose_graph_differs_from_pytorch_fails_its_check(tmp_path, checkpoint, dataset, fmt):
    _needs(fmt)
    net, meta = load_model(checkpoint)
    predictor = MaskPredictor(net, meta).eval()
    path = tmp_path / f"model.{fmt}"
    write_file(predictor, path, fmt)
    _, images = check_images(dataset, 4)
    assert check_file(path, fmt, predictor, images).passed
    _perturb(predictor)
    check = check_file(path, fmt, predictor, images)
    assert not check.passed and not check.logits_within
    assert check.max_logit_diff > 0.01
    assert check.describe().startswith("masks equal on ")


def _perturb(predictor: MaskPredictor) -> None:
    """Shift the PyTorch model's weights: the file written before no longer matches it."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in predictor.net.parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_cli_exits_1_with_one_line_and_writes_nothing_when_the_check_fails(
    tmp_path, checkpoint, dataset, monkeypatch
):
    real_write = export_module.write_file

    def write_then_change_weights(predictor, path, fmt):
        real_write(predictor, path, fmt)
        _perturb(predictor)

    monkeypatch.setattr(export_module, "write_file", write_then_change_weights)
    out = tmp_path / "model.pt2"
    result = run_cli("export", str(checkpoint), str(out), "--dataset", dataset)
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: pt2 export of {checkpoint} failed its check on {dataset}")
    assert "masks equal on " in lines[0] and "logits differ by up to " in lines[0]
    assert f"nothing written to {out}" in lines[0]
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, dataset):
    cases = [
        (("export", str(checkpoint), str(tmp_path / "model.bin")), "cannot tell the format"),
        (("export", str(checkpoint), str(tmp_path), "--format", "pt2"), "is a folder"),
        (
            ("export", str(checkpoint), str(tmp_path / "m.pt2"), "--dataset", str(tmp_path)),
            "check images: ",
        ),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.fixture()
def trained_on_dataset(tmp_path, dataset) -> Path:
    """A checkpoint whose trial.json names the test dataset: promote checks on the model's own."""
    directory = tmp_path / "checkpoint"
    meta = train_tiny_checkpoint(directory)
    (directory / "trial.json").write_text(json.dumps({**meta, "dataset": dataset}))
    return directory


def test_promote_export_attaches_the_checked_file_to_the_version(tmp_path, trained_on_dataset):
    _needs("onnx")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    make_search(uri, "toy", [Trial("t1", (0.4, 0.5), trained_on_dataset)])
    result = run_cli(
        "promote", "toy", "--model-name", "toy-seg", "--tracking-uri", uri, "--export", "onnx"
    )
    assert result.exit_code == 0, result.output
    assert "registered toy-seg version 1" in result.output
    assert "attached export/model.onnx (onnx) to version 1; masks equal on " in result.output

    client = MlflowClient(uri, registry_uri=uri)
    version = client.get_model_version("toy-seg", "1")
    assert version.tags["segsearch.export.onnx"] == "export/model.onnx"
    assert version.tags["segsearch.export.onnx.check"].startswith("masks equal on ")
    location = client.get_model_version_download_uri("toy-seg", "1")
    local = mlflow.artifacts.download_artifacts(
        artifact_uri=f"{location}/export/model.onnx", dst_path=str(tmp_path), tracking_uri=uri
    )
    image = toy_batch(1, 45, seed=11)[0][0]
    masks, _ = run_file(Path(local), "onnx", image)
    assert (masks == expected_mask(trained_on_dataset, image)).mean() >= MIN_MASK_AGREEMENT


def test_promote_export_that_fails_its_check_promotes_nothing(
    tmp_path, trained_on_dataset, monkeypatch
):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    make_search(uri, "toy", [Trial("t1", (0.4, 0.5), trained_on_dataset)])
    real_write = export_module.write_file

    def write_then_change_weights(predictor, path, fmt):
        real_write(predictor, path, fmt)
        _perturb(predictor)

    monkeypatch.setattr(export_module, "write_file", write_then_change_weights)
    result = run_cli(
        "promote", "toy", "--model-name", "toy-seg", "--tracking-uri", uri, "--export", "pt2"
    )
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if "error" in line]  # not MLflow's bars
    assert len(errors) == 1 and errors[0].startswith("error: pt2 export of models:/m-")
    assert errors[0].endswith("; nothing promoted")
    assert MlflowClient(uri, registry_uri=uri).search_registered_models() == []
