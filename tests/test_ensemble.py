"""Ensembles in `segsearch predict` and `evaluate`: mean softmax at each image's own size."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from segsearch.checkpoint import load_model
from segsearch.data.images import read_image_file
from segsearch.data.ingest import write_dataset
from segsearch.serve.ensemble import load_models
from tests.test_checkpoint import (
    CLASSES,
    one_torch_thread,  # noqa: F401 (an autouse fixture)
    toy_batch,
    train_tiny_checkpoint,
)
from tests.test_predict import expected_mask, image_folder, read_png, run_cli
from tests.test_promote import Trial, make_search


@pytest.fixture(scope="module")
def members(tmp_path_factory) -> list[Path]:
    """Two models: the second trained with another seed and fed 24×24 inputs, not 32×32."""
    folders = [tmp_path_factory.mktemp(f"member{seed}") for seed in (0, 1)]
    train_tiny_checkpoint(folders[0], seed=0)
    meta = train_tiny_checkpoint(folders[1], seed=1)
    (folders[1] / "trial.json").write_text(json.dumps({**meta, "image_size": [24, 24]}))
    return folders


def hand_probabilities(checkpoint: Path, image: np.ndarray) -> torch.Tensor:
    """One model's softmax K,H,W at the image's size, step by step as the contract says."""
    net, meta = load_model(checkpoint)
    pixels = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    batch = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255
    batch = F.interpolate(
        batch, size=meta["image_size"], mode="bilinear", align_corners=False, antialias=True
    )
    mean, std = torch.tensor(meta["mean"]).view(1, -1, 1, 1), torch.tensor(meta["std"])
    with torch.no_grad():
        logits = net((batch - mean) / std.view(1, -1, 1, 1))
    logits = F.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
    return logits[0].softmax(0)


def hand_ensemble(checkpoints: list[Path], image: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
    """The members' mean probabilities and their argmax."""
    mean = sum(hand_probabilities(c, image) for c in checkpoints) / len(checkpoints)
    return mean, mean.argmax(0).numpy().astype(np.uint8)


def test_ensemble_masks_are_the_hand_computed_mean_and_differ_from_each_member(tmp_path, members):
    files = image_folder(tmp_path / "in")
    out = tmp_path / "out"
    args = ("predict", *map(str, members), str(tmp_path / "in"), str(out), "--batch-size", "2")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    assert "wrote 3 masks" in result.output and "(ensemble of 2 models)" in result.output
    ensemble, _ = load_models([str(m) for m in members])
    differs = [0, 0]
    for name, path in files.items():
        image = read_image_file(path)
        probabilities, want = hand_ensemble(members, image)
        mask = read_png(out / "masks" / f"{name}.png")
        np.testing.assert_array_equal(mask, want)
        torch.testing.assert_close(
            ensemble.probabilities([image])[0], probabilities, rtol=0, atol=1e-6
        )
        for index, member in enumerate(members):
            differs[index] += int((mask != expected_mask(member, image)).sum())
    assert all(differs), f"pixels where the ensemble differs from each member: {differs}"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    images, masks = toy_batch(5, 36, seed=8)
    samples = [("train" if i < 2 else "val", f"s{i}", images[i], masks[i]) for i in range(5)]
    root = str(tmp_path_factory.mktemp("data") / "squares")
    write_dataset(root, samples, classes=CLASSES)
    return root


def test_evaluate_scores_the_ensemble_on_its_own_masks(members, dataset):
    uris = [str(m) for m in members]
    result = run_cli("evaluate", *uris, dataset, "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    scores = json.loads(result.output)
    assert scores["model_uri"] == " + ".join(uris) and scores["images"] == 3
    images, masks = toy_batch(5, 36, seed=8)
    confusion = np.zeros((3, 3), dtype=np.int64)
    for image, truth in zip(images[2:], masks[2:], strict=True):
        _, predicted = hand_ensemble(members, image)
        np.add.at(confusion, (truth.ravel(), predicted.ravel()), 1)
    np.testing.assert_array_equal(np.array(scores["confusion"]), confusion)
    text = run_cli("evaluate", *uris, dataset, "--split", "val")
    assert "not logged: an ensemble has no MLflow run of its own" in text.output


def test_top_k_of_a_search_is_the_ensemble_of_its_best_logged_models(tmp_path, members):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    trials = [
        Trial("t1", (0.3, 0.6), members[0]),
        Trial("t2", (0.5, 0.8), members[1]),
        Trial("t3", (0.9,)),  # best, but no model: not a member
    ]
    make_search(uri, "toy", trials)
    files = image_folder(tmp_path / "in")
    common = ("--search", "toy", "--tracking-uri", uri, str(tmp_path / "in"))
    result = run_cli("predict", "--top-k", "2", *common, str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    for name, path in files.items():
        mask = read_png(tmp_path / "out" / "masks" / f"{name}.png")
        np.testing.assert_array_equal(mask, hand_ensemble(members, read_image_file(path))[1])
    best = run_cli("predict", "--top-k", "1", *common, str(tmp_path / "best"))
    assert best.exit_code == 0, best.output
    image = read_image_file(files["a"])
    expected = expected_mask(members[1], image)
    np.testing.assert_array_equal(read_png(tmp_path / "best" / "masks" / "a.png"), expected)
    too_many = run_cli("predict", "--top-k", "3", *common, str(tmp_path / "none"))
    assert too_many.exit_code == 2
    assert "has 2 finished trial(s) with a logged model" in too_many.stderr


def test_bad_ensemble_input_is_one_line_and_exit_2(tmp_path, members):
    other = tmp_path / "four-classes"
    train_tiny_checkpoint(other, classes=(*CLASSES, "blue"))
    folder = tmp_path / "in"
    image_folder(folder)
    cases = [
        (("predict", str(folder), str(tmp_path / "o")), "give MODEL_URI"),
        (("predict", "--top-k", "2", str(folder), str(tmp_path / "o")), "go together"),
        (
            ("predict", str(members[0]), "--top-k", "2", "--search", "s", str(folder), "o"),
            "not both",
        ),
        (
            ("predict", str(members[0]), str(other), str(folder), str(tmp_path / "o")),
            "an ensemble needs models of the same classes",
        ),
    ]
    for args, message in cases:
        result = run_cli(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
