"""Repeated augmentation on real tar shards (reviewkd_rvt.md 2.7): DeiT's RASampler emulated for a stream.

The sampler's effect: an epoch keeps its number of steps, each image in it appears R times, its copies on R
consecutive ranks in the same step, each differently augmented; the epoch covers about 1 / R of the data."""

from __future__ import annotations

from collections import defaultdict

import pytest
import torch

from gpd_ds.data.loader import DataError, TrainLoader, resolve_shards
from gpd_ds.data.transforms import Augment, train_transform
from tests.data_helpers import synthetic_shards

SIZE, BATCH, R = 16, 3, 3


def _loader(shards, rank: int, world: int, repeats: int = R, workers: int = 1) -> TrainLoader:
    return TrainLoader(shards, batch_size=BATCH, rank=rank, world_size=world, num_workers=workers, seed=5,
                       transform=train_transform(SIZE, Augment(scale=(0.1, 0.5))), shuffle_buffer=8,
                       repeated_aug=repeats)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory):
    return resolve_shards(str(synthetic_shards(tmp_path_factory.mktemp("ra"), "train", [12] * 8, size=32)), "train")


def _epoch(shards, world: int, epoch: int = 1, **kw) -> dict[int, list]:
    """rank -> its batches of one epoch."""
    out = {}
    for rank in range(world):
        loader = _loader(shards, rank, world, **kw)
        loader.set_epoch(epoch)
        out[rank] = list(loader)
    return out


def test_epoch_length_kept_and_each_sample_used_r_times(shards) -> None:
    plain, repeated = _epoch(shards, 4, repeats=1), _epoch(shards, 4)
    assert [len(b) for b in repeated.values()] == [len(b) for b in plain.values()] == [8] * 4  # 24 per rank
    counts = defaultdict(int)
    for batches in repeated.values():
        for batch in batches:
            for key in batch.keys:
                counts[key] += 1
    assert set(counts.values()) == {R}
    assert len(counts) == 4 * 8 * BATCH // R  # a third of what the epoch covers without repeats (96 of 96)


def test_copies_go_to_consecutive_ranks_in_the_same_step_augmented_differently(shards) -> None:
    world = 4
    where = defaultdict(list)  # key -> [(rank, step, image)]
    for rank, batches in _epoch(shards, world).items():
        for step, batch in enumerate(batches):
            for key, image in zip(batch.keys, batch.images, strict=True):
                where[key].append((rank, step, image))
    for key, copies in where.items():
        ranks = sorted(rank for rank, _, _ in copies)
        first = next(r for r in ranks if (r - 1) % world not in ranks)  # the reading slot's rank
        assert ranks == sorted((first + j) % world for j in range(R)), key
        assert len({step for _, step, _ in copies}) == 1, f"{key}: copies in different steps"
        images = [image for _, _, image in copies]
        assert all(not torch.equal(a, b) for i, a in enumerate(images) for b in images[i + 1:]), key


def test_fewer_ranks_than_repeats_wrap_onto_the_same_rank(shards) -> None:
    """One rank (as the sampler with W = 1): the R copies are consecutive samples of its stream."""
    (batches,) = _epoch(shards, 1, workers=2).values()
    keys = [k for b in batches for k in b.keys]
    images = [im for b in batches for im in b.images]
    by_worker = defaultdict(list)  # the DataLoader interleaves workers batch by batch
    for b in batches:
        by_worker[b.worker] += list(zip(b.keys, b.images, strict=True))
    for stream in by_worker.values():
        for i in range(0, len(stream), R):
            group = stream[i:i + R]
            assert len({k for k, _ in group}) == 1
            assert not torch.equal(group[0][1], group[1][1])
    assert len(keys) == len(images) == len(batches) * BATCH


def test_resume_mid_epoch_is_bitwise(shards) -> None:
    full = _loader(shards, rank=1, world=4, workers=2)
    full.set_epoch(3)
    expected = list(full)
    first = _loader(shards, rank=1, world=4, workers=2)
    first.set_epoch(3)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == 3:
            break
    resumed = _loader(shards, rank=1, world=4, workers=2)
    resumed.load_state_dict(first.state_dict())
    got = seen + list(resumed)
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(x.images, y.images) for x, y in zip(got, expected, strict=True))


def test_a_checkpoint_without_repeats_resumes_approximately_only(shards, caplog: pytest.LogCaptureFixture) -> None:
    plain = _loader(shards, rank=0, world=1, repeats=1)
    state = plain.state_dict()
    state["topology"] = state["topology"][:5]  # written before data.repeated_aug existed: repeats 1
    exact = _loader(shards, rank=0, world=1, repeats=1)
    exact.load_state_dict(state)
    assert "topology changed" not in caplog.text
    _loader(shards, rank=0, world=1).load_state_dict(state)
    assert "topology changed" in caplog.text


def test_bad_repeat_count_is_refused(shards) -> None:
    with pytest.raises(DataError, match=r"data\.repeated_aug=0 must be >= 1"):
        _loader(shards, 0, 1, repeats=0)


def _deit_ra_sampler(n: int, world: int, per_rank: int, epoch: int, repeats: int = R) -> set[int]:
    """DeiT's RASampler as its paper and code describe it: a permutation of the data seeded by the epoch, each index
    repeated R times, dealt round-robin to the ranks, each rank keeping its first ``per_rank`` (the epoch's length):
    the distinct indices the epoch uses."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch)).tolist()
    repeated = [i for i in order for _ in range(repeats)]
    return {i for rank in range(world) for i in repeated[rank::world][:per_rank]}


def _shard_spread(indices) -> int:
    """Samples the epoch takes from its most-used shard minus from its least-used one (9 shards of 12)."""
    per_shard = [0] * 9
    for i in indices:
        per_shard[i // 12] += 1
    return max(per_shard) - min(per_shard)


def _mean(values: list) -> float:
    return sum(values) / len(values)


def test_the_repeated_third_is_uniform_as_deits_sampler_not_shard_correlated(tmp_path) -> None:
    """9 shards of 12, 3 ranks, a shuffle buffer (8) smaller than a rank's slot (36), as on ImageNet. Per epoch
    both cover exactly a third (36 of 108); over 3 epochs, averaged over 6 seeds, the loader covers what DeiT's
    sampler covers (a uniform third per epoch: 108 (1 - (2/3)^3) = 76 expected), and the epoch takes as evenly
    from each shard as the sampler does. Taking the first third of each slot's stream (before) took whole shards:
    75.3 distinct on average but from 67 to 82, and a per-shard spread of 10.1 of 12 against the sampler's ~4."""
    shards = resolve_shards(str(synthetic_shards(tmp_path, "train", [12] * 9, size=16)), "train")
    world, n, seeds = 3, 108, range(6)
    ours, deit, spread, deit_spread = [], [], [], []
    for seed in seeds:
        seen_ours, seen_deit = set(), set()
        for epoch in range(3):
            keys = set()
            for rank in range(world):
                loader = TrainLoader(shards, batch_size=BATCH, rank=rank, world_size=world, num_workers=1, seed=seed,
                                     transform=train_transform(SIZE, Augment()), shuffle_buffer=8, repeated_aug=R)
                loader.set_epoch(epoch)
                keys |= {k for batch in loader for k in batch.keys}
            per_rank = len(loader) * BATCH
            drawn = _deit_ra_sampler(n, world, per_rank, 100 * seed + epoch)
            assert len(keys) == len(drawn) == n // R  # 36 distinct, R copies each
            spread.append(_shard_spread(int(k[1:]) for k in keys))  # keys s00000 ... s00107, 12 per shard
            deit_spread.append(_shard_spread(drawn))
            seen_ours |= keys
            seen_deit |= drawn
        ours.append(len(seen_ours))
        deit.append(len(seen_deit))
    mean_ours, mean_deit = _mean(ours), _mean(deit)
    print(f"distinct over 3 epochs: ours {ours} (mean {mean_ours:.1f}), DeiT's {deit} (mean {mean_deit:.1f}); "
          f"per-shard spread per epoch: ours {_mean(spread):.1f}, DeiT's {_mean(deit_spread):.1f}")
    assert abs(mean_ours - mean_deit) <= 4, (ours, deit)
    assert mean_ours >= 72, ours
    assert _mean(spread) <= _mean(deit_spread) + 1.5, (spread, deit_spread)  # the shard-correlated draw: 10.1
