"""The data position across a change of world size (elastic resume): the old ranks read part of an epoch and
stop; the new ranks, given every old rank's saved position, read the rest. Across the change no sample of the
epoch is read twice, every new rank makes the same number of batches, and the batches the epoch still needs are
all there. Streaming loader (real tar shards, several workers) and in-memory loader."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from gpd_ds.data.loader import TrainLoader, resolve_shards
from gpd_ds.data.memory import MemoryTrainLoader
from gpd_ds.data.transforms import Augment, train_transform
from tests.data_helpers import synthetic_shards

SIZE = 12
TRANSFORM = train_transform(SIZE, Augment(scale=(0.5, 1.0)))
GLOBAL_BATCH = 8


def _stream(shards, rank: int, world: int, workers: int) -> TrainLoader:
    return TrainLoader(shards, batch_size=GLOBAL_BATCH // world, rank=rank, world_size=world, num_workers=workers,
                       seed=5, transform=TRANSFORM, shuffle_buffer=6)


def _memory(shards, rank: int, world: int, workers: int) -> MemoryTrainLoader:
    return MemoryTrainLoader(shards, batch_size=GLOBAL_BATCH // world, rank=rank, world_size=world,
                             transform=TRANSFORM, num_workers=0, seed=5)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return resolve_shards(str(synthetic_shards(tmp_path_factory.mktemp("elastic"), "train", [12, 9, 11, 10, 12,
                                                                                               8, 10, 11], size=16)),
                          "train")


def _read(loader, epoch: int, batches: int | None) -> tuple[list[str], dict, int]:
    loader.set_epoch(epoch)
    got = list(itertools.islice(loader, batches))
    return [k for b in got for k in b.keys], loader.state_dict(), len(got)


@pytest.mark.parametrize("make", [_stream, _memory], ids=["stream", "memory"])
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2), (2, 4)])
def test_the_interrupted_epoch_reads_each_sample_once_across_a_change_of_ranks(shards, make, before: int,
                                                                                after: int) -> None:
    workers = 2 if make is _stream else 0
    old = [make(shards, r, before, workers) for r in range(before)]
    steps = len(old[0])
    stop = 2 if make is _memory else 2 * workers  # a whole number of steps, mid-epoch
    read = [_read(loader, 1, stop) for loader in old]
    keys_before = [k for keys, _, _ in read for k in keys]

    new = [make(shards, r, after, workers) for r in range(after)]
    counts, keys_after = [], []
    for loader in new:
        loader.resume_elastic([state for _, state, _ in read])
        keys, _, batches = _read(loader, 1, None)
        counts.append(batches)
        keys_after += keys
    assert len(set(counts)) == 1  # equal batches on every new rank
    assert counts[0] == len(new[0]) - stop  # the batches the epoch still needs
    assert counts[0] >= 1
    assert steps > stop
    twice = {k: n for k, n in Counter(keys_before + keys_after).items() if n > 1}
    assert not twice, f"read twice across the change: {sorted(twice)[:5]}"


def test_a_second_stop_inside_the_rest_resumes_it_exactly(shards) -> None:
    """The rest of the epoch is itself resumable (same topology): the rest's position is in the state."""
    old = [_stream(shards, r, 2, 2) for r in range(2)]
    states = [_read(loader, 0, 2)[1] for loader in old]
    whole = _stream(shards, 0, 1, 2)
    whole.resume_elastic(states)
    expected = _read(whole, 0, None)[0]

    first = _stream(shards, 0, 1, 2)
    first.resume_elastic(states)
    part, state, _ = _read(first, 0, 3)
    assert state["remainder"] is not None
    again = _stream(shards, 0, 1, 2)
    again.load_state_dict(state)
    rest = _read(again, 0, None)[0]
    assert part + rest == expected
