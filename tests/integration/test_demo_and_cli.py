"""The offline demo dataset and the `gpd-ds make-shards` command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpd_ds.cli import main
from gpd_ds.data.demo import CLASSES, demo_dataset
from gpd_ds.data.loader import iter_shard, resolve_shards
from tests.data_helpers import image_tree


def test_demo_dataset_is_made_once_deterministically(tmp_path: Path) -> None:
    root = demo_dataset(tmp_path / "a", train_per_class=6, val_per_class=2, shard_size=10)
    train, val = resolve_shards(str(root), "train"), resolve_shards(str(root), "val")
    assert train.num_samples == 60
    assert val.num_samples == 20
    assert sorted(train.classes) == sorted(CLASSES)
    again = demo_dataset(tmp_path / "b", train_per_class=6, val_per_class=2, shard_size=10)
    first = [s["jpg"] for s in iter_shard(train.urls[0])]
    assert first == [s["jpg"] for s in iter_shard(str(again / Path(train.urls[0]).name))]
    mtime = (root / "_info.json").stat().st_mtime
    assert demo_dataset(tmp_path / "a", train_per_class=6, val_per_class=2, shard_size=10) == root
    assert (root / "_info.json").stat().st_mtime == mtime  # reused, not rebuilt


def test_make_shards_command(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    image_tree(tmp_path / "train", per_class=4)
    out = tmp_path / "wds"
    assert main(["make-shards", str(tmp_path / "train"), str(out), "--split", "train", "--shard-size", "5",
                 "--workers", "2", "--prefix", "toy"]) == 0
    assert "wrote 12 samples of split 'train' into 3 shards" in capsys.readouterr().out
    assert json.loads((out / "_info.json").read_text())["splits"]["train"]["filenames"][0] == "toy-train-000000.tar"
    assert main(["make-shards", str(tmp_path / "nope"), str(out), "--split", "val"]) == 2
    assert "is not a directory" in capsys.readouterr().err
