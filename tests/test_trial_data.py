"""Trial data: decoded once per search, sharded per epoch, validation covering every image once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segsearch.config import TrialConfig
from segsearch.data import trial_data as trial_data_module
from segsearch.data.demo import DEMO_CLASSES, generate_demo_samples
from segsearch.data.ingest import write_dataset
from segsearch.data.shards import open_dataset
from segsearch.data.trial_data import SearchData, TrialData
from segsearch.errors import DataError
from segsearch.models import build_model
from segsearch.search.train import _evaluate, _Normalizer
from tests.test_ray_data import small_dataset, spoil_row

TRIAL = TrialConfig.from_dict(
    {"batch_size": 1, "image_size": [16, 16], "model": {"arch": "unet", "width": 4, "depth": 2}}
)
SIZE = (16, 16)


def dataset(tmp_path: Path, *, n_train: int, n_val: int) -> str:
    """Demo pairs in shards of a few rows each, so every split has several row groups."""
    samples = [
        *generate_demo_samples(n=n_train, size=SIZE, seed=1, split="train"),
        *generate_demo_samples(n=n_val, size=SIZE, seed=1, split="val"),
    ]
    dest = str(tmp_path / "ds")
    write_dataset(dest, samples, classes=DEMO_CLASSES, shard_size_mb=0.0015)
    return dest


def trial_data(opened, *, cached: bool, batch_size: int = 1, seed: int = 0) -> TrialData:
    search = SearchData.build(opened, image_sizes={SIZE}) if cached else SearchData(opened)
    return search.for_trial(image_size=SIZE, batch_size=batch_size, seed=seed)


def ids(batches) -> list[str]:
    return [str(i) for batch in batches for i in batch["id"]]


def _net(info) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(TRIAL.model, in_channels=info.channels, num_classes=info.num_classes)


@pytest.mark.timeout(600)
def test_two_worker_validation_matrix_equals_one_worker_evaluation(tmp_path, ray_cluster) -> None:
    """Issue 15: val is never cut to equal parts; 5 images over 2 workers are all counted."""
    import ray.train
    from ray.train.torch import TorchTrainer

    opened = open_dataset(dataset(tmp_path, n_train=4, n_val=5))
    assert len(opened.units["val"]) > 1
    info, cpu = opened.info, torch.device("cpu")
    data = {"cached": trial_data(opened, cached=True), "streamed": trial_data(opened, cached=False)}

    def loop(config: dict) -> None:
        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        for name, source in config["data"].items():
            batches = source.batches("val", rank=rank, world=world, epoch=1)
            matrix = _evaluate(_net(info), batches, info, _Normalizer(info, cpu), cpu)
            if rank == 0:
                np.save(Path(config["out"]) / f"{name}.npy", matrix.matrix.numpy())
            train = ids(source.batches("train", rank=rank, world=world, epoch=1))
            (Path(config["out"]) / f"{name}-train-{rank}").write_text(" ".join(train))

    TorchTrainer(
        loop,
        train_loop_config={"out": str(tmp_path), "data": data},
        datasets=data["streamed"].trainer_datasets(2),
        scaling_config=ray.train.ScalingConfig(num_workers=2),
        run_config=ray.train.RunConfig(storage_path=str(tmp_path / "runs"), name="val"),
    ).fit()
    for name, source in data.items():
        batches = source.batches("val", rank=0, world=1, epoch=1)
        one = _evaluate(_net(info), batches, info, _Normalizer(info, cpu), cpu)
        assert one.matrix.sum() == 5 * 16 * 16
        assert np.array_equal(np.load(tmp_path / f"{name}.npy"), one.matrix.numpy()), name
        shares = [(tmp_path / f"{name}-train-{rank}").read_text().split() for rank in (0, 1)]
        assert [len(share) for share in shares] == [2, 2] and not set(shares[0]) & set(shares[1])


def test_cached_epochs_deal_equal_shuffled_shares_and_val_once(tmp_path, ray_cluster) -> None:
    opened = open_dataset(dataset(tmp_path, n_train=11, n_val=5))
    data = trial_data(opened, cached=True, batch_size=2, seed=3)
    assert data.cached
    for epoch in (1, 2):
        shares = [ids(data.batches("train", rank=r, world=3, epoch=epoch)) for r in range(3)]
        assert [len(share) for share in shares] == [2, 2, 2]  # ⌊11 / 3⌋ = 3, minus a partial batch
        assert len({i for share in shares for i in share}) == 6
    first = ids(data.batches("train", rank=0, world=1, epoch=1))
    assert len(first) == 10 and len(set(first)) == 10
    assert first == ids(data.batches("train", rank=0, world=1, epoch=1))
    assert first != ids(data.batches("train", rank=0, world=1, epoch=2))
    val = [ids(data.batches("val", rank=r, world=3, epoch=1)) for r in range(3)]
    every = [i for share in val for i in share]
    assert len(every) == 5 and sorted(every) == sorted(
        ids(data.batches("val", rank=0, world=1, epoch=1))
    )


def test_decoded_once_a_trial_reads_every_epoch_without_the_shards(tmp_path, ray_cluster) -> None:
    dest = dataset(tmp_path, n_train=6, n_val=3)
    opened = open_dataset(dest)
    data = trial_data(opened, cached=True, batch_size=3)
    streamed = trial_data(opened, cached=False, batch_size=3)
    expected = {
        i: (image, mask)
        for batch in streamed.batches("val", rank=0, world=1, epoch=1)
        for i, image, mask in zip(batch["id"], batch["image"], batch["mask"], strict=True)
    }
    import ray

    ray.get([ref for refs in data.blocks.values() for ref in refs])  # every row group decoded
    for shard in Path(dest).rglob("*.parquet"):
        shard.unlink()
    for epoch in (1, 2, 3):
        assert len(ids(data.batches("train", rank=0, world=1, epoch=epoch))) == 6
    for batch in data.batches("val", rank=0, world=1, epoch=1):
        assert batch["image"].shape[1:] == (16, 16, 3) and batch["image"].dtype == np.uint8
        for i, image, mask in zip(batch["id"], batch["image"], batch["mask"], strict=True):
            assert np.array_equal(image, expected[i][0]) and np.array_equal(mask, expected[i][1])


def test_a_bad_row_fails_the_cached_read_with_shard_row_and_id(tmp_path, ray_cluster) -> None:
    dest, shards = small_dataset(tmp_path)
    sample_id = spoil_row(shards[0], 5, "image", b"\x89PNG\r\n\x1a\n cut short")
    search = SearchData.build(open_dataset(dest), image_sizes={(8, 8)})
    data = search.for_trial(image_size=(8, 8), batch_size=2, seed=0)
    line = f"{shards[0]}: row 5 (id '{sample_id}'): image does not decode"
    with pytest.raises(DataError, match=line.replace("(", r"\(").replace(")", r"\)")):
        list(data.batches("train", rank=0, world=1, epoch=1))
    assert list(data.batches("val", rank=0, world=1, epoch=1))


def test_too_big_or_unfixed_sizes_stream(tmp_path, ray_cluster, monkeypatch) -> None:
    opened = open_dataset(dataset(tmp_path, n_train=4, n_val=2))
    native = SearchData.build(opened, image_sizes={None})
    assert not native.cached and "does not fix image_size" in native.describe()
    monkeypatch.setattr(trial_data_module, "CACHE_SHARE", 1e-12)
    big = SearchData.build(opened, image_sizes={SIZE})
    assert not big.cached and "object store" in big.describe()
    data = big.for_trial(image_size=SIZE, batch_size=2, seed=0)
    assert not data.cached and len(ids(data.batches("train", rank=0, world=1, epoch=1))) == 4


def _mixed_size_dataset(tmp_path: Path) -> str:
    """Train at 24×24; val images at their own 24×24 and 20×28, none the trained 16×16."""
    samples = [
        *generate_demo_samples(n=3, size=(24, 24), seed=2, split="train"),
        *generate_demo_samples(n=2, size=(24, 24), seed=2, split="val"),
        *(
            ("val", f"wide{sample_id}", image, mask)
            for _, sample_id, image, mask in generate_demo_samples(
                n=2, size=(20, 28), seed=3, split="val"
            )
        ),
    ]
    dest = str(tmp_path / "mixed")
    write_dataset(dest, samples, classes=DEMO_CLASSES, shard_size_mb=0.0015)
    return dest


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "streamed"])
def test_validation_is_scored_at_each_images_own_resolution(tmp_path, ray_cluster, cached) -> None:
    """Issue 12: val_miou is what `segsearch evaluate` reports: the net sees the image at the
    trial's size, its logits are resized (bilinear) to the mask's own size, every labelled pixel
    of the original mask counts."""
    import torch.nn.functional as F

    opened = open_dataset(_mixed_size_dataset(tmp_path))
    info, cpu = opened.info, torch.device("cpu")
    data = trial_data(opened, cached=cached, batch_size=3)
    normalize = _Normalizer(info, cpu)
    net = _net(info).eval()
    expected = np.zeros((info.num_classes, info.num_classes), dtype=np.int64)
    for batch in data.batches("val", rank=0, world=1, epoch=1):
        for image, native in zip(batch["image"], batch["native_mask"], strict=True):
            pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
            with torch.no_grad():
                logits = net(normalize(pixels))
            upsampled = F.interpolate(logits, size=native.shape, mode="bilinear")
            predicted = upsampled.argmax(1)[0].numpy()
            np.add.at(expected, (native.astype(int), predicted.astype(int)), 1)
    assert expected.sum() == 2 * 24 * 24 + 2 * 20 * 28

    batches = data.batches("val", rank=0, world=1, epoch=1)
    matrix = _evaluate(net, batches, info, normalize, cpu)
    np.testing.assert_array_equal(matrix.matrix.numpy(), expected)
