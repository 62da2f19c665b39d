"""The streaming loaders on real tar shards: split, equal batches, exactly-once eval, bad data, determinism,
resume."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from gpd_ds.data.loader import DataError, TrainLoader, eval_loader, resolve_shards
from gpd_ds.data.transforms import Augment, DeviceTransform, eval_transform, train_transform
from tests.data_helpers import good_sample, jpeg_bytes, synthetic_shards, write_index, write_shard

SIZE = 16


def _loader(shards, rank=0, world=1, workers=2, batch=4, seed=0, **kw) -> TrainLoader:
    return TrainLoader(shards, batch_size=batch, rank=rank, world_size=world, num_workers=workers, seed=seed,
                       transform=train_transform(SIZE, Augment(scale=(0.5, 1.0))), shuffle_buffer=8, **kw)


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory: pytest.TempPathFactory):
    root = synthetic_shards(tmp_path_factory.mktemp("train"), "train", [10] * 8)
    return resolve_shards(str(root), "train")


def test_two_ranks_two_workers_disjoint_samples_and_equal_batches(train_shards) -> None:
    per_epoch = []
    for epoch in (0, 1):
        keys, counts = [], []
        for rank in (0, 1):
            loader = _loader(train_shards, rank=rank, world=2)
            loader.set_epoch(epoch)
            batches = list(loader)
            assert all(b.images.shape == (4, 3, SIZE, SIZE) and b.images.dtype == torch.uint8 for b in batches)
            counts.append(len(batches))
            keys += [k for b in batches for k in b.keys]
        assert counts[0] == counts[1] == len(loader) == 10  # 8 shards / 4 readers = 20 samples -> 5 per worker
        assert len(keys) == len(set(keys)) == 80  # disjoint across ranks and workers
        per_epoch.append(keys)
    assert per_epoch[0] != per_epoch[1]  # shards and samples reshuffled per epoch


def test_uneven_shards_still_give_equal_batch_counts(tmp_path: Path) -> None:
    shards = resolve_shards(str(synthetic_shards(tmp_path, "train", [13, 7, 9, 11, 5, 10, 12])), "train")
    counts = {rank: len(list(_loader(shards, rank=rank, world=2, workers=1, batch=3))) for rank in (0, 1)}
    assert counts[0] == counts[1] > 0
    keys = [k for rank in (0, 1) for b in _loader(shards, rank=rank, world=2, workers=1, batch=3) for k in b.keys]
    assert len(keys) == len(set(keys))


def test_too_few_shards_for_ranks_and_workers_is_refused(train_shards) -> None:
    with pytest.raises(DataError, match="8 shards cannot feed 2 ranks x 8 workers = 16 readers"):
        _loader(train_shards, world=2, workers=8)


def test_eval_reads_every_sample_exactly_once_with_uneven_counts(tmp_path: Path) -> None:
    root = synthetic_shards(tmp_path, "val", [17, 16, 16, 15, 16, 16, 7])  # 103 samples
    shards = resolve_shards(str(root), "val")
    keys, labels = [], []
    for rank in (0, 1):
        for b in eval_loader(shards, batch_size=8, rank=rank, world_size=2, num_workers=2,
                             transform=eval_transform(SIZE, crop_pct=1.0)):
            keys += b.keys
            labels += b.labels.tolist()
    assert sorted(keys) == [f"s{i:05d}" for i in range(103)]
    assert labels.count(0) == 26  # labels travel with their samples


def test_determinism_same_seed_same_stream(train_shards) -> None:
    a, b = list(_loader(train_shards, seed=3)), list(_loader(train_shards, seed=3))
    assert [x.keys for x in a] == [x.keys for x in b]
    assert all(torch.equal(x.images, y.images) for x, y in zip(a, b, strict=True))
    c = list(_loader(train_shards, seed=4))
    assert [x.keys for x in a] != [x.keys for x in c]


@pytest.mark.parametrize("stop", [3, 6])
def test_resume_mid_epoch_continues_the_same_stream(train_shards, stop: int) -> None:
    full = _loader(train_shards, workers=2)
    full.set_epoch(2)
    expected = list(full)

    first = _loader(train_shards, workers=2)
    first.set_epoch(2)
    seen = []
    for batch in first:
        seen.append(batch)
        if len(seen) == stop:
            break
    state = first.state_dict()
    assert state["epoch"] == 2
    assert state["batch"] == stop

    resumed = _loader(train_shards, workers=2)
    resumed.load_state_dict(state)
    rest = list(resumed)
    got = seen + rest
    assert [b.keys for b in got] == [b.keys for b in expected]
    assert all(torch.equal(x.images, y.images) for x, y in zip(got, expected, strict=True))


def _corrupt_shard_dir(tmp_path: Path) -> Path:
    good = [good_sample(f"g{i:03d}", i % 2, i) for i in range(20)]
    truncated_jpeg = {"__key__": "truncated", "jpg": jpeg_bytes(16, 16, 99)[:60], "cls": b"1"}
    empty = {"__key__": "empty", "jpg": b"", "cls": b"0"}
    wrong_ext = {"__key__": "wrongext", "txt": jpeg_bytes(16, 16, 98), "cls": b"0"}
    no_label = {"__key__": "nolabel", "jpg": jpeg_bytes(16, 16, 97)}
    write_shard(tmp_path / "bad-train-000000.tar", [*good[:10], truncated_jpeg, empty])
    write_shard(tmp_path / "bad-train-000001.tar", [*good[10:], wrong_ext, no_label])
    write_index(tmp_path, "train", {"bad-train-000000.tar": 12, "bad-train-000001.tar": 12}, ["a", "b"])
    return tmp_path


def test_corrupted_samples_are_skipped_counted_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    shards = resolve_shards(str(_corrupt_shard_dir(tmp_path)), "train")
    loader = _loader(shards, workers=0, batch=5, max_bad_fraction=0.5)
    with caplog.at_level(logging.WARNING):
        batches = list(loader)
    keys = [k for b in batches for k in b.keys]
    assert len(batches) == len(loader) == 4
    assert sorted(keys) == [f"g{i:03d}" for i in range(20)]
    assert loader.bad_samples == 4
    for key in ("truncated", "empty", "wrongext", "nolabel"):
        assert any(f"'{key}' in " in r.message and "bad-train-00000" in r.message for r in caplog.records), key


def test_bad_sample_rate_above_the_limit_aborts(tmp_path: Path) -> None:
    shards = resolve_shards(str(_corrupt_shard_dir(tmp_path)), "train")
    loader = _loader(shards, workers=0, batch=5, max_bad_fraction=0.05)
    # 4 of 24: under the 200-sample minimum mid-epoch, judged over the whole epoch at its end
    with pytest.raises(DataError, match=r"4 of 24 samples read by rank 0 in epoch 0 were bad "
                                        r"\(> data.max_bad_fraction=0.05\)"):
        list(loader)


def test_truncated_shard_is_read_up_to_the_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = synthetic_shards(tmp_path, "val", [10, 10])
    shard = root / "syn-val-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        keys = [k for b in eval_loader(resolve_shards(str(root), "val"), batch_size=4, rank=0, world_size=1,
                                       num_workers=0, transform=eval_transform(SIZE, crop_pct=1.0)) for k in b.keys]
    assert 10 < len(keys) < 20
    assert any("syn-val-000001.tar is damaged" in r.message and f"the other {20 - len(keys)} of its 10 count as "
               "bad" in r.message for r in caplog.records)


def test_shard_specs_and_bad_specs(tmp_path: Path, train_shards) -> None:
    root = Path(train_shards.urls[0]).parent
    pattern = resolve_shards(str(root / "syn-train-{000000..000003}.tar"))
    assert pattern.lengths == (10, 10, 10, 10)
    listing = tmp_path / "list.txt"
    listing.write_text("\n".join(train_shards.urls[:2]))
    assert resolve_shards(f"@{listing}").num_samples == 20
    with pytest.raises(DataError, match="matches nothing"):
        resolve_shards(str(root / "syn-train-{000007..000009}.tar"))
    with pytest.raises(DataError, match="split 'val' is not in"):
        resolve_shards(str(root), "val")
    with pytest.raises(DataError, match="no dataset index"):
        resolve_shards(str(tmp_path), "train")
    with pytest.raises(DataError, match=r"runs a shell command; if you trust it, allow it with --set "
                                        r"data\.allow_pipe=true"):
        resolve_shards("pipe:cat /x/a-train-000000.tar")
    with pytest.raises(DataError, match=r"list file .* does not exist"):
        resolve_shards(f"@{tmp_path / 'missing.txt'}")


def test_device_transform_normalises_and_mixes() -> None:
    images = torch.full((4, 3, 8, 8), 255, dtype=torch.uint8)
    x, y = DeviceTransform(num_classes=5)(images, torch.tensor([0, 1, 2, 3]))
    assert x.dtype == torch.float32
    assert x.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(x[0, :, 0, 0], (1 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor(
        [0.229, 0.224, 0.225]))
    assert torch.equal(y, torch.tensor([0, 1, 2, 3]))
    mixed = DeviceTransform(num_classes=5, augment=Augment(mixup=0.8, cutmix=1.0, label_smoothing=0.1))
    _, soft = mixed(torch.randint(0, 255, (4, 3, 8, 8), dtype=torch.uint8), torch.tensor([0, 1, 2, 3]))
    assert soft.shape == (4, 5)
    torch.testing.assert_close(soft.sum(1), torch.ones(4))


def test_deit_randaugment_survives_maximum_magnitude() -> None:
    """timm's RandAugment posterizes to 0 bits at its maximum magnitude; the pinned Pillow must accept that."""
    from PIL import Image
    from timm.data.auto_augment import posterize

    assert posterize(Image.new("RGB", (4, 4), (200, 100, 50)), 0).getpixel((0, 0)) == (0, 0, 0)
    transform = train_transform(SIZE, Augment(auto_augment="rand-m10-mstd0.5-inc1", interpolation="bicubic"))
    image = torch.randint(0, 256, (3, 20, 24), dtype=torch.uint8)
    for seed in range(200):
        torch.manual_seed(seed)
        assert transform(image).shape == (3, SIZE, SIZE)
