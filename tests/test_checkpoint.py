"""Checkpoints: save a really trained model, load it back (local and S3), and refuse bad ones."""

from __future__ import annotations

import json
import pickle
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from segsearch.checkpoint import META_FILE, MODEL_FILE, load_model, save_model
from segsearch.errors import UserError
from segsearch.models import build_model

CLASSES = ["background", "red", "green"]
MEAN, STD = [0.45, 0.4, 0.35], [0.25, 0.25, 0.25]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is ~100x faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def toy_batch(count: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Images with a red and a green square on noise; masks mark them (classes 1 and 2)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), dtype=np.uint8)
    for index in range(count):
        for label, channel in ((1, 0), (2, 1)):
            top, left = rng.integers(0, size // 2, 2)
            side = size // 3
            images[index, top : top + side, left : left + side, channel] = 230
            masks[index, top : top + side, left : left + side] = label
    return images, masks


def train_tiny_checkpoint(
    directory: str | Path,
    *,
    seed: int = 0,
    steps: int = 15,
    arch: str = "unet",
    classes: Sequence[str] = tuple(CLASSES),
) -> dict[str, Any]:
    """Train a tiny model for a few steps in-process and save it as a checkpoint; its meta.

    The toy masks hold classes 0-2 only: classes after those are never a target.
    """
    torch.manual_seed(seed)
    model_cfg = {"arch": arch, "depth": 2, "width": 4}
    net = build_model(model_cfg, in_channels=3, num_classes=len(classes))
    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    images, masks = toy_batch(8, 32, seed)
    inputs = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    inputs = (inputs - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    target = torch.from_numpy(masks).long()
    net.train()
    for _ in range(steps):
        loss = F.cross_entropy(net(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    meta = {
        "model": model_cfg,
        "in_channels": 3,
        "num_classes": len(classes),
        "classes": list(classes),
        "ignore_index": 255,
        "mean": MEAN,
        "std": STD,
        "image_size": [32, 32],
        "dataset": "s3://toy-bucket/squares",
        "config": {"model": model_cfg, "image_size": [32, 32], "batch_size": 8, "seed": seed},
        "epoch": 1,
    }
    save_model(directory, net, meta)
    return meta


def _outputs(net: torch.nn.Module, seed: int = 5) -> torch.Tensor:
    images, _ = toy_batch(2, 32, seed)
    with torch.no_grad():
        return net(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255)


def test_saved_checkpoint_loads_as_the_same_model_in_eval_mode(tmp_path):
    meta = train_tiny_checkpoint(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [MODEL_FILE, META_FILE]
    net, loaded_meta = load_model(str(tmp_path))
    assert loaded_meta == meta
    assert not net.training
    state = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    rebuilt = build_model(meta["model"], in_channels=3, num_classes=3).eval()
    rebuilt.load_state_dict(state)
    torch.testing.assert_close(_outputs(net), _outputs(rebuilt), rtol=0, atol=0)


def test_save_model_unwraps_ddp(tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        net = build_model({"arch": "fcn", "depth": 2, "width": 4}, in_channels=3, num_classes=3)
        wrapped = torch.nn.parallel.DistributedDataParallel(net)
        save_model(tmp_path, wrapped, {"note": "ddp"})
    finally:
        dist.destroy_process_group()
    state = torch.load(tmp_path / MODEL_FILE, weights_only=True)
    assert state.keys() == net.state_dict().keys()
    assert json.loads((tmp_path / META_FILE).read_text()) == {"note": "ddp"}


def test_load_model_from_s3(tmp_path, s3_bucket):
    train_tiny_checkpoint(tmp_path)
    s3 = boto3.client("s3")
    for path in tmp_path.iterdir():
        s3.upload_file(str(path), s3_bucket, f"trials/t1/checkpoint_000001/{path.name}")
    net, meta = load_model(f"s3://{s3_bucket}/trials/t1/checkpoint_000001")
    local, _ = load_model(tmp_path)
    assert meta["classes"] == CLASSES
    torch.testing.assert_close(_outputs(net), _outputs(local), rtol=0, atol=0)
    s3.delete_object(Bucket=s3_bucket, Key="trials/t1/checkpoint_000001/model.pt")
    with pytest.raises(UserError, match=r"no checkpoint at s3://.*: model\.pt is missing"):
        load_model(f"s3://{s3_bucket}/trials/t1/checkpoint_000001")


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint at .*nowhere: trial.json is missing"):
        load_model(str(tmp_path / "nowhere"))


@pytest.mark.parametrize(
    ("meta_text", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"model": {}}', r"lacks \['in_channels'"),
    ],
)
def test_bad_trial_json_is_a_user_error(tmp_path, meta_text, message):
    train_tiny_checkpoint(tmp_path, steps=1)
    (tmp_path / META_FILE).write_text(meta_text)
    with pytest.raises(UserError, match=message):
        load_model(tmp_path)


def test_weights_that_do_not_fit_the_model_are_a_user_error(tmp_path):
    meta = train_tiny_checkpoint(tmp_path, steps=1)
    meta["model"] = {"arch": "unet", "depth": 2, "width": 8}
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=r"model\.pt does not fit the model in trial\.json"):
        load_model(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"garbage, not a torch file")
    with pytest.raises(UserError, match=r"model\.pt does not fit"):
        load_model(tmp_path)


class _Payload:
    """Unpickling this would create a file: weights_only loading must refuse it."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_pickled_objects_in_model_pt_are_never_executed(tmp_path):
    train_tiny_checkpoint(tmp_path, steps=1)
    marker = tmp_path / "executed"
    with open(tmp_path / MODEL_FILE, "wb") as handle:
        pickle.dump({"weight": _Payload(str(marker))}, handle)
    with pytest.raises(UserError, match=r"model\.pt does not fit"):
        load_model(tmp_path)
    assert not marker.exists()
