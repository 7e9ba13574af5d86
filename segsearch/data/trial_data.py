"""Each trial's input, decoded once per search: batches for (split, rank, world, epoch).

The rule: when the search fixes `image_size` (or draws it from a list) and the decoded uint8
images and masks of every split at those sizes take at most CACHE_SHARE of the cluster's
object-store memory, the search driver starts decoding them once, in parallel Ray tasks (at
most one per logical CPU, each a run of Parquet row groups, one object per row group), before
Tune starts. The arrays stay in Ray's object store (spilled to local disk as Ray does when it
fills), owned by the driver, which lives as long as the search; every trial and every epoch
reads them from there. Otherwise (each image at its own size, or too big) each trial streams its
splits through Ray Data and decodes them every epoch (`ray_data.split_stream`).

Sharding, the same on both paths: every epoch of the train split is shuffled (cached: with seed
(trial seed, epoch)) and dealt to the `world` ranks in equal shares of ⌊n / world⌋ images, each
rank dropping its last partial batch, so every rank takes the same number of steps and an epoch
trains on world × ⌊n / (world × batch_size)⌋ × batch_size images; the few left over differ from
epoch to epoch. Validation (any other split) gives every image to exactly one rank, none
dropped, so a trial's scores cover the whole split whatever its worker count; its batches also
carry each mask at its image's own size (`native_mask`; decoded once beside the resized ones,
not counted by the cache rule), which the scores are counted on, as `segsearch evaluate` counts.

Bad data: a row that does not decode is found by the decode task, which returns the DataError
(shard, row, id) instead of failing; the first trial that reads that block raises it, and a
UserError fails a trial at once, in one line, never retried.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from segsearch.data.ray_data import DATA_CPUS, concat_rows
from segsearch.data.shards import OpenedDataset
from segsearch.data.storage import filesystem_for
from segsearch.errors import UserError, last_line

#: Share of the cluster's object-store memory the decoded arrays of one search may fill.
CACHE_SHARE = 0.5
#: Logical CPUs per decode task: the data stream's share, which a search always leaves free
#: (capacity.py), so decoding finishes even beside trials holding every other CPU.
DECODE_CPUS = DATA_CPUS

#: What a training batch holds; validation batches of a resized split add `native_mask`.
TRAIN_COLUMNS = ("id", "image", "mask")

Size = tuple[int, int]
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class SearchData:
    """A search's data: the opened dataset and, per cached image size, each split's decoded
    row groups as object refs (owned by the driver that built them)."""

    dataset: OpenedDataset
    cached: Mapping[Size, Mapping[str, tuple[Any, ...]]] = field(default_factory=dict)
    #: Why the data streams instead (empty when cached).
    streamed_because: str = ""

    @classmethod
    def build(cls, dataset: OpenedDataset, *, image_sizes: Iterable[Size | None]) -> SearchData:
        """Start decoding every split at every size the space can draw, when the rule allows
        (module docstring); returns at once, the tasks run while Tune starts its trials."""
        import ray

        sizes = set(image_sizes)
        if not sizes or None in sizes:
            return cls(dataset, streamed_because="the space does not fix image_size")
        needed = sum(decoded_bytes(dataset, size) for size in sizes)
        store = ray.cluster_resources().get("object_store_memory", 0.0)
        if needed > CACHE_SHARE * store:
            return cls(
                dataset,
                streamed_because=f"{_gb(needed)} decoded > {CACHE_SHARE:g} × the "
                f"{_gb(store)} object store",
            )
        return cls(dataset, {size: _decode_splits(dataset, size) for size in sorted(sizes)})

    def describe(self) -> str:
        """One line for the search's output: where the trials' images come from."""
        if not self.cached:
            return f"data: streamed and decoded every epoch ({self.streamed_because})"
        sizes = ", ".join(f"{h}x{w}" for h, w in self.cached)
        total = sum(decoded_bytes(self.dataset, size) for size in self.cached)
        return f"data: decoded once at {sizes} into Ray's object store ({_gb(total)})"

    def for_trial(
        self,
        *,
        image_size: Size | None,
        batch_size: int,
        seed: int,
        train_splits: tuple[str, ...] = ("train",),
    ) -> TrialData:
        """What one trial's loop reads its batches from; its `train` split is the union of
        `train_splits` (a refit on train+val)."""
        blocks = self.cached.get(image_size) if image_size is not None else None
        return TrialData(self.dataset, image_size, batch_size, seed, blocks, train_splits)


def decoded_bytes(dataset: OpenedDataset, size: Size) -> int:
    """Bytes of every split's images and masks decoded at `size` (H, W)."""
    images = sum(dataset.info.splits[split] for split in dataset.units)
    return images * size[0] * size[1] * (dataset.info.channels + 1)


class TrialData:
    """One trial's batches (numpy: id, image uint8 N,H,W,C, mask uint8 N,H,W) per epoch, from the
    object store when the search cached them, else streamed. Picklable: it travels to every Train
    worker, or stays in the trial's own process (rank 0 of world 1)."""

    def __init__(
        self,
        dataset: OpenedDataset,
        size: Size | None,
        batch_size: int,
        seed: int,
        blocks: Mapping[str, tuple[Any, ...]] | None = None,
        train_splits: tuple[str, ...] = ("train",),
    ) -> None:
        self.dataset, self.size, self.batch_size, self.seed = dataset, size, batch_size, seed
        self.blocks = blocks
        self.train_splits = train_splits
        self._fetched: dict[str, list[Batch]] = {}
        self._streams: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fetched": {}, "_streams": {}}

    @property
    def cached(self) -> bool:
        return self.blocks is not None

    def trainer_datasets(self, workers: int) -> dict[str, Any]:
        """Datasets for Ray Train to split among `workers` (DataConfig): only a streamed train
        split over several workers, where Ray Train deals each its equal share."""
        if self.cached or workers <= 1:
            return {}
        return {"train": self._train_dataset()}

    def batches(self, split: str, *, rank: int, world: int, epoch: int) -> Iterator[Batch]:
        """This rank's batches of one epoch of `split` (sharding: module docstring)."""
        if self.cached:
            return self._cached_batches(split, rank, world, epoch)
        return _data_stream(self._streamed_batches(split, rank, world, epoch))

    def _cached_batches(self, split: str, rank: int, world: int, epoch: int) -> Iterator[Batch]:
        blocks = self._blocks(split)
        offsets = np.cumsum([0, *(len(block["id"]) for block in blocks)])
        count = int(offsets[-1])
        if split == "train":
            share = count // world
            order = np.random.default_rng([self.seed, epoch]).permutation(count)
            mine = order[rank * share : (rank + 1) * share]
            mine = mine[: len(mine) - len(mine) % self.batch_size]
        else:
            mine = np.array_split(np.arange(count), world)[rank]
        columns = TRAIN_COLUMNS if split == "train" else tuple(blocks[0]) if blocks else ()
        for start in range(0, len(mine), self.batch_size):
            yield _gather(blocks, offsets, mine[start : start + self.batch_size], columns)

    def _blocks(self, split: str) -> list[Batch]:
        """The split's decoded row groups, fetched once per process (zero-copy on the node)."""
        import ray

        if split not in self._fetched:
            assert self.blocks is not None
            parts = self.train_splits if split == "train" else (split,)
            blocks = ray.get([ref for part in parts for ref in self.blocks[part]])
            failed = next((b for b in blocks if isinstance(b, UserError)), None)
            if failed is not None:
                raise failed
            self._fetched[split] = blocks
        return self._fetched[split]

    def _streamed_batches(self, split: str, rank: int, world: int, epoch: int) -> Iterable[Batch]:
        from segsearch.data.ray_data import split_stream

        if split == "train":
            rows = self._train_stream(world)
            return rows.iter_batches(
                batch_size=self.batch_size,
                batch_format="numpy",
                drop_last=True,
                local_shuffle_buffer_size=4 * self.batch_size,
                local_shuffle_seed=self.seed * 1000 + epoch,
            )
        if split not in self._streams:
            units = self.dataset.units[split][rank::world]
            self._streams[split] = split_stream(
                self.dataset, split, size=self.size, units=units, native_masks=True
            )
        return self._streams[split].iter_batches(batch_size=self.batch_size, batch_format="numpy")

    def _train_stream(self, world: int) -> Any:
        """The whole train split for one rank; Ray Train's equal share of it for several."""
        if world > 1:
            import ray.train

            return ray.train.get_dataset_shard("train")
        if "train" not in self._streams:
            self._streams["train"] = self._train_dataset()
        return self._streams["train"]

    def _train_dataset(self) -> Any:
        """The Ray Dataset of the training splits (their union for a refit on train+val)."""
        from segsearch.data.ray_data import split_stream

        first, *others = (
            split_stream(self.dataset, split, size=self.size) for split in self.train_splits
        )
        return first.union(*others) if others else first


def _decode_splits(dataset: OpenedDataset, size: Size) -> dict[str, tuple[Any, ...]]:
    """Every split's row groups decoded by at most one task per logical CPU of the cluster, each
    taking a run of consecutive row groups; their refs (one per row group) in row order."""
    import ray

    filesystem, _ = filesystem_for(dataset.uri)
    lanes = max(1, int(ray.cluster_resources().get("CPU", 1)))
    task = ray.remote(_decode_task)
    channels = dataset.info.channels
    decoded = {}
    for split, units in dataset.units.items():
        refs: list[Any] = []
        for group in np.array_split(np.arange(len(units)), min(lanes, len(units))):
            chosen = [units[i] for i in group]
            returned = task.options(num_cpus=DECODE_CPUS, num_returns=len(chosen)).remote(
                chosen, filesystem, channels, size, split != "train"
            )
            refs.extend(returned if len(chosen) > 1 else [returned])
        decoded[split] = tuple(refs)
    return decoded


def _decode_task(
    units: list[Mapping[str, Any]], filesystem: Any, channels: int, size: Size, native_masks: bool
) -> Any:
    """Each row group decoded (with its masks at their own size too for `native_masks`), or the
    UserError that names its bad row: returned, not raised, so the trials that read it fail
    with that line and the driver logs nothing of its own."""
    from segsearch.data.ray_data import decode_row_group

    blocks: list[Batch | UserError] = []
    for unit in units:
        try:
            blocks.append(
                decode_row_group(
                    unit,
                    filesystem=filesystem,
                    channels=channels,
                    size=size,
                    native_masks=native_masks,
                )
            )
        except UserError as err:
            blocks.append(err)
    return tuple(blocks) if len(blocks) > 1 else blocks[0]


def _gather(
    blocks: list[Batch], offsets: np.ndarray, rows: np.ndarray, columns: tuple[str, ...]
) -> Batch:
    """The rows (indices across the split) as one batch: per block, one slice copy."""
    rows = np.sort(rows)
    which = np.searchsorted(offsets, rows, side="right") - 1
    parts = [(blocks[b], rows[which == b] - offsets[b]) for b in np.unique(which)]
    return {name: concat_rows([block[name][index] for block, index in parts]) for name in columns}


def _data_stream(batches: Iterable[Batch]) -> Iterator[Batch]:
    """A Ray Data stream's batches; a failure to read or decode them is the data's (Ray Data
    already retried its tasks), so it becomes a one-line UserError that fails the trial."""
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except Exception as err:
            raise UserError(f"reading the data failed: {last_line(err)}") from None
        yield batch


def _gb(size: float) -> str:
    return f"{size / 2**30:.2f} GB" if size >= 2**28 else f"{size / 2**20:.1f} MB"
