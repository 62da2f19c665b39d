"""The shard writer on generated ImageFolder trees: round trip, odd images, class mapping, atomicity, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpd_ds.data import shards as shards_mod
from gpd_ds.data.loader import decode, iter_shard
from gpd_ds.data.shards import ShardWriteError, make_shards, read_index
from tests.data_helpers import image_tree, jpeg_bytes


def _read_all(out: Path, split: str) -> dict[str, tuple[bytes, int]]:
    index = read_index(out)
    samples = {}
    for name in index["splits"][split]["filenames"]:
        for s in iter_shard(str(out / name)):
            assert s["__key__"] not in samples
            samples[s["__key__"]] = (s["jpg"], int(s["cls"]))
    return samples


def test_round_trip_bytes_labels_index_and_shuffle(tmp_path: Path) -> None:
    written = image_tree(tmp_path / "train")
    entry = make_shards(tmp_path / "train", tmp_path / "out", "train", shard_size=5, workers=2, progress=False)
    assert _read_all(tmp_path / "out", "train") == written  # every image back, bytes intact, right label
    index = read_index(tmp_path / "out")
    assert index["classes"] == ["cat", "dog", "fish"]
    assert entry["num_samples"] == 36
    assert entry["shard_lengths"] == [5] * 7 + [1]
    assert entry["filenames"][0] == "out-train-000000.tar"
    first = [int(s["cls"]) for s in iter_shard(str(tmp_path / "out" / entry["filenames"][0]))]
    assert len(set(first)) > 1  # shuffled across shards, not class by class
    assert not list((tmp_path / "out").glob(".*plan*"))


def test_odd_images_are_kept_and_decode_to_rgb(tmp_path: Path) -> None:
    src = tmp_path / "train"
    image_tree(src, per_class=2)
    odd = {"gray": jpeg_bytes(9, 7, 1, mode="L"), "cmyk": jpeg_bytes(8, 6, 2, mode="CMYK"),
           "png": jpeg_bytes(7, 9, 3, fmt="PNG"), "tall": jpeg_bytes(3, 400, 4)}
    for name, data in odd.items():
        (src / "cat" / f"{name}.JPEG").write_bytes(data)
    (src / "cat" / "broken.JPEG").write_bytes(b"not an image at all")
    (src / "cat" / "notes.txt").write_text("ignored: not an image extension")
    entry = make_shards(src, tmp_path / "out", "train", shard_size=4, workers=1, progress=False)
    assert entry["num_samples"] == 6 + 4
    assert entry["non_rgb_jpeg_files"] == {"JPEG/L": 1, "JPEG/CMYK": 1, "PNG/RGB": 1}
    assert len(entry["skipped_files"]) == 1
    assert "broken.JPEG" in entry["skipped_files"][0]
    samples = {s["__key__"]: s for n in entry["filenames"] for s in iter_shard(str(tmp_path / "out" / n))}
    for name, data in odd.items():
        sample = samples[f"cat_{name}"]
        assert sample["jpg"] == data  # original bytes, no re-encode
        image, label = decode(sample, num_classes=3)
        assert image.dtype == torch.uint8
        assert image.shape[0] == 3  # RGB
        assert label == 0


def test_class_mapping_file_and_val_must_match_train(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=2)
    image_tree(tmp_path / "val", per_class=1)
    mapping = tmp_path / "classes.txt"
    mapping.write_text("fish\ncat\ndog\n")
    make_shards(tmp_path / "train", tmp_path / "out", "train", class_mapping=mapping, progress=False)
    assert read_index(tmp_path / "out")["classes"] == ["fish", "cat", "dog"]
    make_shards(tmp_path / "val", tmp_path / "out", "val", progress=False)  # reuses train's classes
    labels = {key: label for key, (_, label) in _read_all(tmp_path / "out", "val").items()}
    assert labels["fish_fish_000"] == 0
    assert labels["cat_cat_000"] == 1

    image_tree(tmp_path / "val2", classes=("cat", "dog", "bird"), per_class=1)
    with pytest.raises(ShardWriteError, match=r"do not match.*missing \['fish'\].*unexpected \['bird'\]"):
        make_shards(tmp_path / "val2", tmp_path / "out", "val2", progress=False)


def test_json_class_mapping(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=1)
    (tmp_path / "m.json").write_text(json.dumps({"dog": 0, "fish": 1, "cat": 2}))
    make_shards(tmp_path / "train", tmp_path / "out", "train", class_mapping=tmp_path / "m.json", progress=False)
    assert read_index(tmp_path / "out")["classes"] == ["dog", "fish", "cat"]


def test_rerun_over_a_complete_split_refuses(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=2)
    make_shards(tmp_path / "train", tmp_path / "out", "train", progress=False)
    with pytest.raises(ShardWriteError, match="already holds a complete 'train' split"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", progress=False)


def _crash_on_shard(monkeypatch: pytest.MonkeyPatch, bad_index: int, after: int) -> None:
    """Make the writer die inside shard ``bad_index`` after ``after`` samples (fork inherits the patch)."""
    real_write = shards_mod.wds.TarWriter.write
    state = {"n": 0}

    def write(self, obj):
        if f"-{bad_index:06d}.tar.partial-" in self.stream.name:
            state["n"] += 1
            if state["n"] > after:
                raise OSError("simulated crash (disk full)")
        return real_write(self, obj)

    monkeypatch.setattr(shards_mod.wds.TarWriter, "write", write)


def test_crash_leaves_no_truncated_shard_and_resume_completes(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    written = image_tree(tmp_path / "train")
    out = tmp_path / "out"
    _crash_on_shard(monkeypatch, bad_index=3, after=2)
    with pytest.raises(OSError, match="simulated crash"):
        make_shards(tmp_path / "train", out, "train", shard_size=5, workers=1, progress=False)
    assert not (out / "out-train-000003.tar").exists()  # never under its final name
    assert list(out.glob("out-train-000003.tar.partial-*"))
    assert "train" not in read_index(out).get("splits", {})
    monkeypatch.undo()

    with pytest.raises(ShardWriteError, match="interrupted run; pass --resume"):
        make_shards(tmp_path / "train", out, "train", shard_size=5, workers=1, progress=False)
    with pytest.raises(ShardWriteError, match="differ from the interrupted run"):
        make_shards(tmp_path / "train", out, "train", shard_size=6, workers=1, progress=False, resume=True)
    entry = make_shards(tmp_path / "train", out, "train", shard_size=5, workers=2, progress=False, resume=True)
    assert entry["num_samples"] == 36
    assert _read_all(out, "train") == written
    assert not list(out.glob("*.partial-*"))


@pytest.mark.parametrize(("setup", "match"), [
    (lambda p: None, "is not a directory"),
    (lambda p: p.mkdir(), "has no class folders"),
    (lambda p: (p / "cat").mkdir(parents=True), "has class folders but no images"),
])
def test_bad_sources_give_clear_errors(tmp_path: Path, setup, match: str) -> None:
    src = tmp_path / "src"
    setup(src)
    with pytest.raises(ShardWriteError, match=match):
        make_shards(src, tmp_path / "out", "train", progress=False)


def test_bad_arguments(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=1)
    with pytest.raises(ShardWriteError, match="--shard-size 0 must be >= 1"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", shard_size=0)
    with pytest.raises(ShardWriteError, match=r"class mapping file .* does not exist"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", class_mapping=tmp_path / "nope.txt")
