"""`segsearch evaluate`: scores at native resolution, checked against numpy, and logged to MLflow.

The model is trained at 32×32 on classes 0-2 of four (blue is never a target, so never
predicted); the test split has images of two other sizes, and masks with the dataset's ignore
index (9, not the default 255) on a band and on scattered pixels.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from segsearch.data.ingest import write_dataset
from segsearch.serve.evaluate import evaluate
from segsearch.serve.mlflow_model import log_model
from segsearch.tracking._runs import global_tracking_uri
from tests.test_checkpoint import (
    CLASSES,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    toy_batch,
    train_tiny_checkpoint,
)
from tests.test_predict import expected_mask, run_cli

FOUR = [*CLASSES, "blue"]
IGNORE = 9


def _masked(mask: np.ndarray, seed: int) -> np.ndarray:
    """The mask with a 3-pixel left band and ~10% scattered pixels set to the ignore index."""
    mask = mask.copy()
    mask[:, :3] = IGNORE
    mask[np.random.default_rng(seed).random(mask.shape) < 0.1] = IGNORE
    return mask


def _samples():
    """train/val 40×40; test two 40×40 and two 28×44 (neither is the model's 32×32)."""
    square, square_masks = toy_batch(6, 40, seed=11)
    wide, wide_masks = toy_batch(2, 44, seed=12)
    for index in range(2):
        yield "train", f"t{index}", square[index], square_masks[index]
        yield "val", f"v{index}", square[2 + index], _masked(square_masks[2 + index], index)
        yield "test", f"sq{index}", square[4 + index], _masked(square_masks[4 + index], 10 + index)
        yield "test", f"wide{index}", wide[index][:28], _masked(wide_masks[index][:28], 20 + index)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("checkpoint")
    train_tiny_checkpoint(directory, classes=FOUR)
    return directory


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("data") / "ds")
    write_dataset(path, _samples(), classes=FOUR, ignore_index=IGNORE)
    return path


def numpy_scores(split: str, checkpoint: Path) -> dict:
    """Confusion counts and scores by hand, from the hand-made predictions of test_predict."""
    k = len(FOUR)
    matrix = np.zeros((k, k), dtype=np.int64)
    for sample_split, _, image, mask in _samples():
        if sample_split != split:
            continue
        prediction = expected_mask(checkpoint, image)
        assert prediction.shape == mask.shape
        keep = mask != IGNORE
        np.add.at(matrix, (mask[keep].astype(int), prediction[keep].astype(int)), 1)
    tp = np.diag(matrix).astype(float)
    truth, predicted = matrix.sum(1), matrix.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (truth + predicted - tp)
        dice = 2 * tp / (truth + predicted)
    return {
        "matrix": matrix,
        "iou": iou,
        "dice": dice,
        "miou": np.nanmean(iou),
        "mdice": np.nanmean(dice),
        "pixel_acc": tp.sum() / matrix.sum(),
    }


def test_scores_match_numpy_at_native_resolution(checkpoint, dataset):
    expected = numpy_scores("test", checkpoint)
    assert math.isnan(expected["iou"][3]), "blue must be absent from masks and predictions"
    assert (np.count_nonzero(np.diag(expected["matrix"])[:3]) == 3) and expected["miou"] < 1

    result = evaluate(str(checkpoint), dataset, split="test", batch_size=3, device="cpu")
    assert (result.split, result.images, result.ignore_index, result.run_id) == (
        "test",
        4,
        IGNORE,
        None,
    )
    np.testing.assert_array_equal(result.confusion, expected["matrix"])
    np.testing.assert_allclose(list(result.iou.values()), expected["iou"], atol=1e-6)
    np.testing.assert_allclose(list(result.dice_per_class.values()), expected["dice"], atol=1e-6)
    assert result.miou == pytest.approx(expected["miou"], abs=1e-6)
    assert result.dice == pytest.approx(expected["mdice"], abs=1e-6)
    assert result.pixel_acc == pytest.approx(expected["pixel_acc"], abs=1e-6)
    assert list(result.iou) == FOUR and math.isnan(result.iou["blue"])

    one_by_one = evaluate(str(checkpoint), dataset, split="test", batch_size=1, device="cpu")
    np.testing.assert_array_equal(one_by_one.confusion, result.confusion)


def test_cli_table_json_and_bad_split(checkpoint, dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    expected = numpy_scores("test", checkpoint)
    table = run_cli("evaluate", str(checkpoint), dataset)
    assert table.exit_code == 0, table.output
    lines = table.output.splitlines()
    assert lines[0] == (
        f"{checkpoint} on {dataset}, split test: 4 images at native resolution (ignore index 9)"
    )
    assert lines[2].split() == ["class", "IoU", "Dice", "pixels", "predicted"]
    assert lines[6].split() == ["blue", "n/a", "n/a", "0", "0"]
    assert f"mIoU {expected['miou']:.4f}  Dice {expected['mdice']:.4f}" in table.output
    assert f"not logged: {checkpoint} has no MLflow run" in table.output
    assert not list(tmp_path.iterdir()), "a checkpoint folder must not touch MLflow"

    as_json = run_cli("evaluate", str(checkpoint), dataset, "--json")
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output)
    assert data["iou"]["blue"] is None and data["dice_per_class"]["blue"] is None
    assert data["miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert data["confusion"] == expected["matrix"].tolist()
    assert (data["split"], data["images"], data["run_id"]) == ("test", 4, None)

    val = run_cli("evaluate", str(checkpoint), dataset, "--split", "val", "--json")
    assert val.exit_code == 0, val.output
    assert json.loads(val.output)["confusion"] == numpy_scores("val", checkpoint)["matrix"].tolist()

    three = tmp_path / "three"
    kept = (sample for sample in _samples() if sample[0] != "test")
    write_dataset(three, kept, classes=CLASSES, ignore_index=IGNORE)
    short = tmp_path / "short"
    write_dataset(short, _samples(), classes=FOUR, ignore_index=IGNORE)
    info = json.loads((short / "dataset.json").read_text())
    (short / "dataset.json").write_text(
        json.dumps({**info, "splits": {**info["splits"], "test": 5}})
    )
    cases = [
        (
            (str(short),),
            f"error: {short}: split 'test' has 4 images in its shards, dataset.json says 5",
        ),
        (
            (dataset, "--split", "holdout"),
            f"error: {dataset} has no split 'holdout'; its splits: test, train, val",
        ),
        (
            (str(three), "--split", "val"),
            f"error: model {checkpoint} predicts classes {FOUR}, but {three} has {CLASSES}",
        ),
        ((str(tmp_path / "nothing"),), "error: no dataset at"),
    ]
    for args, message in cases:
        result = run_cli("evaluate", str(checkpoint), *args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def test_mlflow_models_get_scores_and_files_on_their_run(checkpoint, dataset, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.create_experiment("toy", artifact_location=(tmp_path / "mlruns").as_uri())
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "val_miou", 0.25, step=1)
    with global_tracking_uri(uri):
        model_uri = log_model(str(checkpoint), run_id=run_id)
    client.set_terminated(run_id)
    expected = numpy_scores("test", checkpoint)

    result = run_cli("evaluate", f"runs:/{run_id}/model", dataset, "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    assert f"logged to run {run_id}: test_miou, test_dice, test_pixel_acc; files in " in (
        result.output
    )
    metrics = client.get_run(run_id).data.metrics
    assert metrics["test_miou"] == pytest.approx(expected["miou"], abs=1e-6)
    assert metrics["test_dice"] == pytest.approx(expected["mdice"], abs=1e-6)
    assert metrics["test_pixel_acc"] == pytest.approx(expected["pixel_acc"], abs=1e-6)
    files = {item.path for item in client.list_artifacts(run_id, "evaluation/test")}
    assert files == {
        "evaluation/test/confusion.png",
        "evaluation/test/per_class.csv",
        "evaluation/test/evaluation.json",
    }
    local = Path(client.download_artifacts(run_id, "evaluation/test", str(tmp_path / "got")))
    with open(local / "per_class.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["class"] for row in rows] == FOUR
    assert rows[3] == {"class": "blue", "iou": "", "dice": "", "pixels": "0", "predicted": "0"}
    assert float(rows[1]["iou"]) == pytest.approx(expected["iou"][1], abs=1e-6)
    logged = json.loads((local / "evaluation.json").read_text())
    assert logged["model_uri"] == f"runs:/{run_id}/model" and logged["run_id"] == run_id

    client.create_registered_model("toy-seg")
    model_id = model_uri.removeprefix("models:/")
    with global_tracking_uri(uri):  # MLflow's registry looks the model up through the global URI
        version = client.create_model_version(
            "toy-seg", model_uri, run_id=run_id, model_id=model_id
        )
    client.set_registered_model_alias("toy-seg", "champion", version.version)
    registered = run_cli(
        "evaluate", "models:/toy-seg@champion", dataset, "--split", "val", "--tracking-uri", uri
    )
    assert registered.exit_code == 0, registered.output
    history = client.get_metric_history(run_id, "val_miou")
    assert [m.value for m in history] == [0.25], "training's val_miou must stay as it was"
    val = numpy_scores("val", checkpoint)
    metrics = client.get_run(run_id).data.metrics
    assert metrics["val_native_miou"] == pytest.approx(val["miou"], abs=1e-6)
    assert {i.path for i in client.list_artifacts(run_id, "evaluation")} == {
        "evaluation/test",
        "evaluation/val",
    }
