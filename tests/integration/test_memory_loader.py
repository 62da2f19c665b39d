"""The in-memory train loader: same contract as the streaming one (equal batches per rank, determinism,
exact resume, bad samples skipped and counted), plus the memory limit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from gpd_ds.data.loader import DataError, resolve_shards
from gpd_ds.data.memory import MemoryTrainLoader
from gpd_ds.data.transforms import Augment, train_transform
from tests.data_helpers import good_sample, synthetic_shards, write_index, write_shard

TRANSFORM = train_transform(12, Augment(pad_crop=2))


def _loader(shards, rank: int = 0, world: int = 1, workers: int = 0, seed: int = 0, **kw) -> MemoryTrainLoader:
    return MemoryTrainLoader(shards, batch_size=4, rank=rank, world_size=world, transform=TRANSFORM,
                             num_workers=workers, seed=seed, **kw)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return resolve_shards(str(synthetic_shards(tmp_path_factory.mktemp("mem"), "train", [13, 9, 11], size=16)),
                          "train")


def _epoch(loader: MemoryTrainLoader, epoch: int) -> list:
    loader.set_epoch(epoch)
    return [(b.images.clone(), b.labels.clone(), b.keys) for b in loader]


def test_ranks_get_equal_disjoint_batches_and_order_changes_per_epoch(shards) -> None:
    ranks = [_loader(shards, rank=r, world=2) for r in range(2)]
    assert [len(r) for r in ranks] == [4, 4]  # 33 samples // 2 ranks // 4
    epochs = [[_epoch(r, e) for r in ranks] for e in range(2)]
    keys = [[k for b in rank for k in b[2]] for rank in epochs[0]]
    assert not set(keys[0]) & set(keys[1])
    assert len(set(keys[0] + keys[1])) == 32
    assert [k for b in epochs[1][0] for k in b[2]] != keys[0]
    batch = epochs[0][0][0]
    assert batch[0].shape == (4, 3, 12, 12)
    assert batch[0].dtype == torch.uint8


def test_deterministic_with_workers_and_resume_is_exact(shards) -> None:
    full = _epoch(_loader(shards, workers=2, seed=5), 1)
    again = _epoch(_loader(shards, workers=0, seed=5), 1)
    assert all(torch.equal(a[0], b[0]) and a[2] == b[2] for a, b in zip(full, again, strict=True))
    first = _loader(shards, seed=5)
    first.set_epoch(1)
    it = iter(first)
    next(it), next(it), next(it)
    state = first.state_dict()
    resumed = _loader(shards, seed=5)
    resumed.load_state_dict(state)
    rest = [(b.images, b.keys) for b in resumed]
    assert len(rest) == len(full) - 3
    assert all(torch.equal(a[0], b[0]) and a[2] == b[1] for a, b in zip(full[3:], rest, strict=True))
    assert _epoch(_loader(shards, seed=6), 1)[0][2] != full[0][2]


def test_bad_samples_are_skipped_counted_and_capped(tmp_path: Path) -> None:
    samples = [good_sample(f"k{i}", i % 2, i) for i in range(18)]
    samples.insert(3, {"__key__": "broken", "jpg": b"\xff\xd8 not a jpeg", "cls": b"1"})
    write_shard(tmp_path / "a.tar", samples)
    write_index(tmp_path, "train", {"a.tar": 19}, ["x", "y"])
    shards = resolve_shards(str(tmp_path), "train")
    loader = _loader(shards, max_bad_fraction=0.1)
    assert loader.bad_samples == 1
    assert len(loader.images) == 18
    with pytest.raises(DataError, match="max_bad_fraction"):
        _loader(shards, max_bad_fraction=0.01)


def test_refuses_a_split_over_the_memory_limit(shards) -> None:
    with pytest.raises(DataError, match=r"in_memory_max_gb=1e-06.*data.in_memory=false"):
        _loader(shards, max_gb=1e-6)
