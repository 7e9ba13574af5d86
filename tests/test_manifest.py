"""The reproducibility manifest: what a trial writes into each checkpoint and logs to MLflow."""

from __future__ import annotations

import hashlib
import json
import subprocess
from importlib import metadata
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from segsearch.checkpoint import MANIFEST_FILE, PICTURE_FILES, save_checkpoint
from segsearch.config import TrialConfig
from segsearch.data.fingerprint import dataset_fingerprint
from segsearch.data.format import read_dataset_info
from segsearch.data.ingest import write_dataset
from segsearch.manifest import FORMAT, trial_manifest
from segsearch.models import build_model
from tests.test_checkpoint import CLASSES, toy_batch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    images, masks = toy_batch(5, 24, seed=2)
    samples = [("train" if i < 3 else "val", f"s{i}", images[i], masks[i]) for i in range(5)]
    root = str(tmp_path_factory.mktemp("data") / "squares")
    write_dataset(root, samples, classes=CLASSES)
    return root


def test_manifest_records_config_seed_data_versions_commit_and_device(dataset):
    trial = TrialConfig.from_dict({"seed": 7, "image_size": [24, 24], "model": {"arch": "fcn"}})
    info = read_dataset_info(dataset)
    manifest = json.loads(
        json.dumps(
            trial_manifest(
                trial, dataset=dataset, splits=info.splits, device=torch.device("cpu"), workers=2
            )
        )
    )
    assert manifest["format"] == FORMAT
    assert TrialConfig.from_dict(manifest["trial"]) == trial
    assert manifest["seeds"] == {"trial": 7}

    data = manifest["dataset"]
    assert data["uri"] == dataset
    assert data["fingerprint"] == dataset_fingerprint(dataset, info.splits)
    info_bytes = (Path(dataset) / "dataset.json").read_bytes()
    assert data["dataset_json_sha256"] == hashlib.sha256(info_bytes).hexdigest()
    shards = sorted(Path(dataset).rglob("*.parquet"))
    assert sorted(s["size"] for s in data["shards"]) == sorted(p.stat().st_size for p in shards)
    assert {s["split"] for s in data["shards"]} == {"train", "val"}
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in shards) == 5

    versions = manifest["packages"]
    for name in ("torch", "ray", "optuna", "mlflow", "segsearch"):
        assert versions[name] == metadata.version(name)
    assert versions["cuda"] == torch.version.cuda

    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert manifest["git"]["commit"] == head and isinstance(manifest["git"]["dirty"], bool)
    assert manifest["devices"]["type"] == "cpu" and manifest["devices"]["workers"] == 2
    assert manifest["devices"]["name"]


def test_checkpoint_holds_the_manifest_and_tracking_logs_it(tmp_path):
    net = build_model({"arch": "fcn", "depth": 2, "width": 4}, in_channels=3, num_classes=3)
    manifest = {"format": FORMAT, "seeds": {"trial": 1}}
    save_checkpoint(tmp_path, net, {"model": {}}, metrics={}, train_state={}, manifest=manifest)
    assert json.loads((tmp_path / MANIFEST_FILE).read_text()) == manifest
    assert MANIFEST_FILE in PICTURE_FILES  # the files tracking logs to the trial's run
