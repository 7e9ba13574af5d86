"""Best epoch, refit and the final test-split score: real Tune + Train + MLflow (SQLite), tiny
local data."""

from __future__ import annotations

import itertools
import math
import re

import pytest
from mlflow import MlflowClient

from segsearch.checkpoint import load_model
from segsearch.data.demo import DEMO_CLASSES, generate_demo_samples
from segsearch.data.ingest import write_dataset
from segsearch.errors import UserError
from segsearch.search.epochs import best_row
from segsearch.search.progress import format_table
from segsearch.search.refit import Compute, checkpoint_uri, spent
from segsearch.search.tuner import run_search
from segsearch.serve.predict import load_network
from segsearch.serve.promote import promote
from segsearch.space import RefitSpec, ResourcesSpec, parse_refit, parse_space

TRAIN, VAL, TEST = 12, 4, 3


@pytest.fixture(scope="module")
def dataset_with_test(tmp_path_factory) -> str:
    """Demo data with a test split whose images have another size than train's (28×36)."""
    dest = str(tmp_path_factory.mktemp("data") / "withtest")
    samples = itertools.chain(
        generate_demo_samples(n=TRAIN, size=(32, 32), seed=3, split="train"),
        generate_demo_samples(n=VAL, size=(32, 32), seed=3, split="val"),
        generate_demo_samples(n=TEST, size=(28, 36), seed=3, split="test"),
    )
    write_dataset(dest, samples, classes=DEMO_CLASSES)
    return dest


def _space(name: str, **overrides) -> dict:
    space = {
        "name": name,
        "trials": 1,
        "epochs": 3,
        "scheduler": {"kind": "none"},
        "sampler": {"kind": "random", "seed": 0},
        "fixed": {
            "batch_size": 4,
            "image_size": [32, 32],
            "model.depth": 2,
            "model.width": 4,
            "optim.schedule": "cosine",
        },
        "space": {"model.arch": {"choice": ["fcn", "unet"]}},
    }
    space.update(overrides)
    return space


def test_refit_from_the_command_line_and_the_space():
    assert parse_refit("30") == RefitSpec(epochs=30)
    assert parse_refit("30:2") == RefitSpec(epochs=30, top_k=2)
    assert parse_refit("30:1:train+val") == RefitSpec(epochs=30, on="train+val")
    for text, says in (
        ("", "give EPOCHS[:TOP_K[:train|train+val]]"),
        ("ten", "epochs must be a whole number"),
        ("3:x", "top_k must be a whole number"),
        ("0", "epochs: Input should be greater than or equal to 1"),
        ("3:1:test", "on: Input should be 'train' or 'train+val'"),
        ("3:1:train:4", "give EPOCHS"),
    ):
        with pytest.raises(UserError, match=re.escape(says)):
            parse_refit(text)
    spec = parse_space(_space("s", refit={"epochs": 5, "top_k": 2, "on": "train+val"}))
    assert spec.refit == RefitSpec(epochs=5, top_k=2, on="train+val")
    assert parse_space(_space("s")).refit is None
    with pytest.raises(UserError, match=r"<space>: refit.top_k: Input should be greater"):
        parse_space(_space("s", refit={"epochs": 5, "top_k": 0}))
    with pytest.raises(UserError, match=r"refit.epochs: Field required"):
        parse_space(_space("s", refit={"top_k": 1}))


def test_best_row_takes_the_latest_of_equal_scores_and_never_nan():
    history = [
        {"epoch": 1, "m": 0.5},
        {"epoch": 2, "m": math.nan},
        {"epoch": 3, "m": 0.7},
        {"epoch": 4, "m": 0.7},
        {"epoch": 5, "m": 0.2},
    ]
    assert best_row(history, metric="m", mode="max")["epoch"] == 4  # the one Train keeps
    assert best_row(history, metric="m", mode="min")["epoch"] == 5
    assert best_row([{"epoch": 1, "m": math.nan}], metric="m", mode="max") is None
    table = format_table(
        [
            {"trial_id": "a", "m": 0.7, "best_epoch": 4, "last": 0.2, "epochs": 5, "config": {}},
            {
                "trial_id": "b",
                "m": None,
                "best_epoch": None,
                "last": None,
                "epochs": 1,
                "config": {},
            },
        ],
        metric="m",
    ).splitlines()
    assert table[0].split() == ["trial", "m", "best", "epoch", "last", "epochs", "params"]
    assert table[1].split() == ["a", "0.7000", "4", "0.2000", "5"]
    assert table[2].split() == ["b", "nan", "-", "nan", "1"]


def test_compute_figures_and_checkpoint_uris():
    compute = Compute(
        search_image_epochs=120,
        search_wall_s=10,
        search_worker_s=8,
        refit_image_epochs=60,
        refit_wall_s=5,
        refit_worker_s=4,
        train_images=12,
    )
    metrics = compute.metrics()
    assert metrics["compute_total_image_epochs"] == 180
    assert metrics["compute_baseline_epochs"] == 15
    assert metrics["compute_total_wall_s"] == 15 and metrics["compute_total_worker_s"] == 12
    assert "in all 180 = 15 epochs of the train split" in compute.describe()
    resumed = {  # a resumed trial reports its last epoch again
        "history": [
            {"epoch": 1, "epoch_time_s": 2.0},
            {"epoch": 2, "epoch_time_s": 3.0},
            {"epoch": 2, "epoch_time_s": 3.0},
        ]
    }
    stopped = {"history": [{"epoch": 1, "epoch_time_s": math.nan}]}
    two_workers = ResourcesSpec(workers=2)
    assert spent([resumed, stopped], images=10, resources=two_workers) == (30.0, 10.0)
    assert checkpoint_uri("bucket/runs/x/checkpoint_1", "s3://bucket/runs") == (
        "s3://bucket/runs/x/checkpoint_1"
    )
    assert checkpoint_uri("/tmp/runs/checkpoint_1", "/tmp/runs") == "/tmp/runs/checkpoint_1"
    assert checkpoint_uri("s3://b/c", "s3://b") == "s3://b/c"


def _runs_by_role(uri: str, name: str) -> dict[str, list]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id])
    roles: dict[str, list] = {}
    for run in runs:
        roles.setdefault(run.data.tags.get("segsearch.role"), []).append(run)
    return roles


@pytest.mark.slow
def test_the_best_epoch_counts_and_the_refit_is_promoted(ray_cluster, dataset_with_test, tmp_path):
    """Scored by `lr`, which the cosine schedule lowers every epoch, a trial's best epoch is its
    first: its score, checkpoint and logged model must be epoch 1's, not epoch 3's; the refit
    (on train) picks its own best epoch the same way and is what promote takes."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = _space("best-epoch", metric="lr", refit={"epochs": 2, "top_k": 1, "on": "train"})
    lines: list[str] = []
    result = run_search(
        parse_space(space),
        dataset=dataset_with_test,
        storage=str(tmp_path / "runs"),
        tracking_uri=uri,
        echo=lines.append,
    )

    (trial,) = result.trials
    history = [row["lr"] for row in trial["history"]]
    assert len(history) == 3 and history[0] > history[1] > history[2]
    assert trial["best_epoch"] == 1 and trial["lr"] == pytest.approx(history[0])
    assert trial["last"] == pytest.approx(history[2])
    assert result.best_metric == pytest.approx(history[0])
    assert load_model(result.best_checkpoint)[1]["epoch"] == 1
    (refit,) = result.refit
    assert refit["refit_of"] == trial["trial_id"] and refit["rank"] == 1
    assert refit["epochs"] == 2 and refit["best_epoch"] == 1
    assert load_model(result.final_checkpoint)[1]["epoch"] == 1
    assert load_model(result.final_checkpoint)[1]["config"]["epochs"] == 2

    roles = _runs_by_role(uri, "best-epoch")
    (parent,), (trial_run,), (refit_run,) = roles["search"], roles["trial"], roles["refit"]
    assert trial_run.data.metrics["best_epoch"] == 1
    assert trial_run.data.metrics["best_lr"] == pytest.approx(history[0])
    assert trial_run.data.metrics["lr"] == pytest.approx(history[2])  # MLflow keeps the last
    _, meta = load_network(trial_run.data.tags["segsearch.model_uri"], tracking_uri=uri)
    assert meta["epoch"] == 1
    tags = refit_run.data.tags
    assert tags["mlflow.parentRunId"] == parent.info.run_id
    assert (tags["segsearch.refit_of"], tags["segsearch.refit_rank"]) == (trial["trial_id"], "1")
    assert tags["segsearch.refit_on"] == "train" and refit_run.data.params["epochs"] == "2"
    assert refit_run.data.metrics["best_epoch"] == 1
    assert refit_run.data.metrics["search_lr"] == pytest.approx(history[0])
    assert parent.data.tags["segsearch.refit_run_id"] == refit_run.info.run_id
    assert parent.data.tags["segsearch.refit_model_uri"] == tags["segsearch.model_uri"]
    assert parent.data.metrics["compute_search_image_epochs"] == 3 * TRAIN
    assert parent.data.metrics["compute_refit_image_epochs"] == 2 * TRAIN
    assert parent.data.metrics["compute_baseline_epochs"] == 5
    assert parent.data.metrics["compute_search_worker_s"] > 0
    assert result.compute.total_image_epochs == 5 * TRAIN
    assert any(line.startswith("compute: search 36 image-epochs") for line in lines)

    promotion = promote("best-epoch", model_name="best-epoch-seg", metric="lr", tracking_uri=uri)
    assert promotion.run_id == refit_run.info.run_id
    assert promotion.value == pytest.approx(refit["lr"])


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_refit_on_train_and_val_is_scored_on_the_test_split(
    ray_cluster, dataset_with_test, tmp_path
):
    """A refit on train+val has no held-out val: its runs log no val scores, the refit of the
    best trial is the final model, scored on the test split at the images' own size on the
    parent run, and promote registers it by that test score."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    space = _space(
        "trainval", trials=2, epochs=1, refit={"epochs": 1, "top_k": 2, "on": "train+val"}
    )
    lines: list[str] = []
    result = run_search(
        parse_space(space),
        dataset=dataset_with_test,
        storage=str(tmp_path / "runs"),
        tracking_uri=uri,
        echo=lines.append,
    )

    assert [row["rank"] for row in result.refit] == [1, 2]
    assert [row["refit_of"] for row in result.refit] == [t["trial_id"] for t in result.trials]
    assert all(row["val_miou"] is None for row in result.refit)
    assert result.test is not None and result.test.split == "test"
    assert result.test.images == TEST and result.test.confusion.sum() == TEST * 28 * 36
    roles = _runs_by_role(uri, "trainval")
    (parent,) = roles["search"]
    refits = {run.data.tags["segsearch.refit_rank"]: run for run in roles["refit"]}
    assert set(refits) == {"1", "2"}
    for run in refits.values():
        assert run.data.tags["segsearch.refit_on"] == "train+val"
        assert not [name for name in run.data.metrics if name.startswith("val_")]
        assert "best_epoch" not in run.data.metrics
    assert parent.data.metrics["test_miou"] == pytest.approx(result.test.miou)
    assert refits["1"].data.metrics["test_miou"] == pytest.approx(result.test.miou)
    files = MlflowClient(uri).list_artifacts(parent.info.run_id, "evaluation/test")
    assert "evaluation/test/confusion.png" in {a.path for a in files}
    assert parent.data.metrics["compute_refit_image_epochs"] == 2 * (TRAIN + VAL)
    assert any("split test: 3 images at native resolution" in line for line in lines)

    promotion = promote("trainval", model_name="trainval-seg", tracking_uri=uri)
    assert promotion.run_id == refits["1"].info.run_id
    assert (promotion.metric, promotion.value) == ("test_miou", pytest.approx(result.test.miou))
