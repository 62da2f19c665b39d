"""The shard writer on generated ImageFolder trees: round trip, odd images, class mapping, atomicity, resume,
the pixel limit, layout checks, damaged index and mapping files, and the CLI summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import PIL.Image
import PIL.ImageFile
import pytest
import torch

from gpd_ds.cli import main
from gpd_ds.data import shards as shards_mod
from gpd_ds.data.loader import decode, iter_shard
from gpd_ds.data.shards import (
    INDEX_NAME,
    MAX_IMAGE_PIXELS,
    ShardWriteError,
    make_shards,
    read_index,
    summary_lines,
    validate_index,
)
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


# --- the pixel limit -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16000 x 16000 grayscale PNG: ~250 KB on disk, 256 MB decoded (768 MB as RGB): PIL's bomb check fires."""
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    PIL.Image.new("L", (16000, 16000)).save(path, "PNG")
    return path


def _forbid_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any pixel decode fails the test (the pool's forked workers inherit the patch)."""
    def load(self, *args, **kwargs):
        raise AssertionError(f"make-shards decoded pixels of a {self.size} image")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", load)
    monkeypatch.setattr(PIL.Image.Image, "load", load)


def test_huge_png_is_left_out_and_listed_without_decoding(tmp_path: Path, huge_png: Path,
                                                           monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "train"
    image_tree(src, per_class=2)
    shutil.copy(huge_png, src / "dog" / "huge.png")
    _forbid_decoding(monkeypatch)
    assert main(["make-shards", str(src), str(tmp_path / "out"), "--split", "train", "--workers", "1"]) == 0
    reason = f"{src / 'dog' / 'huge.png'}: 16000x16000 = 256,000,000 pixels > --max-pixels 89,478,485"
    assert f"  {reason}\n" in capsys.readouterr().out
    entry = read_index(tmp_path / "out")["splits"]["train"]
    assert entry["skipped_files"] == [reason]
    assert entry["num_samples"] == 6
    assert entry["max_pixels"] == MAX_IMAGE_PIXELS


@pytest.mark.parametrize("max_pixels", [100, 400])
def test_small_max_pixels_leaves_out_exactly_the_larger_images(tmp_path: Path, max_pixels: int) -> None:
    written = image_tree(tmp_path / "train", per_class=6)  # sides 5..40 px: some images on each side of the limit
    sizes = {key: shards_mod.image_header(data)[2:] for key, (data, _) in written.items()}
    larger = {key for key, (w, h) in sizes.items() if w * h > max_pixels}
    assert 0 < len(larger) < len(written)
    entry = make_shards(tmp_path / "train", tmp_path / "out", "train", shard_size=4, workers=2, progress=False,
                        max_pixels=max_pixels)
    assert set(_read_all(tmp_path / "out", "train")) == set(written) - larger
    assert entry["num_samples"] == len(written) - len(larger)
    assert len(entry["skipped_files"]) == len(larger)
    for line in entry["skipped_files"]:
        assert re.fullmatch(rf".*\.JPEG: \d+x\d+ = [\d,]+ pixels > --max-pixels {max_pixels}", line)


def _sized_tree(root: Path) -> dict[str, tuple[int, int]]:
    """Two classes of JPEGs and a PNG around a 96-px bound: {key: (width, height)}."""
    sizes = {"a/wide": (200, 90), "a/tall": (70, 150), "a/fits": (96, 60), "b/small": (40, 30),
             "b/png": (130, 130), "b/cmyk": (120, 80)}
    for i, (name, (w, h)) in enumerate(sizes.items()):
        folder, stem = name.split("/")
        (root / folder).mkdir(parents=True, exist_ok=True)
        fmt, mode = ("PNG", "RGB") if stem == "png" else ("JPEG", "CMYK" if stem == "cmyk" else "RGB")
        (root / folder / f"{stem}.{fmt.lower()}").write_bytes(jpeg_bytes(w, h, seed=i, mode=mode, fmt=fmt))
    return {f"{name.replace('/', '_')}": size for name, size in sizes.items()}


def test_max_side_shrinks_exactly_the_larger_images_and_keeps_the_rest_byte_exact(tmp_path: Path) -> None:
    sizes = _sized_tree(tmp_path / "train")
    originals = {key: data for key, (data, _) in _read_all_src(tmp_path / "train").items()}
    entry = make_shards(tmp_path / "train", tmp_path / "out", "train", shard_size=2, workers=2, progress=False,
                        max_side=96, jpeg_quality=80)
    larger = {key for key, (w, h) in sizes.items() if max(w, h) > 96}
    assert (entry["max_side"], entry["jpeg_quality"]) == (96, 80)
    assert entry["shrunk_files"] == len(larger) == 4
    assert entry["non_rgb_jpeg_files"] == {}  # the PNG and the CMYK JPEG were over the bound: now RGB JPEGs
    for key, (data, _) in _read_all(tmp_path / "out", "train").items():
        fmt, mode, w, h = shards_mod.image_header(data)
        if key in larger:
            source_w, source_h = sizes[key]
            assert (fmt, mode, max(w, h)) == ("JPEG", "RGB", 96)
            assert abs(w / h - source_w / source_h) < 0.03  # aspect kept (to the rounding of a side)
            image, _ = decode({"jpg": data, "cls": b"0"}, 2)
            assert image.shape == (3, h, w)
        else:
            assert data == originals[key]  # within the bound: the file's own bytes
    assert read_index(tmp_path / "out")["splits"]["train"]["shrunk_files"] == 4


def test_max_side_is_part_of_the_resume_plan_and_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _sized_tree(tmp_path / "train")
    with pytest.raises(ShardWriteError, match="--max-side 63 must be >= 64"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", max_side=63, progress=False)
    with pytest.raises(ShardWriteError, match=r"--jpeg-quality 96 must be in 1\.\.95"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", max_side=96, jpeg_quality=96, progress=False)
    rules = shards_mod.ImageRules
    signature = shards_mod._plan_signature
    assert signature([], ["a"], 5, 0, rules(max_side=96)) != signature([], ["a"], 5, 0, rules(max_side=128))
    assert signature([], ["a"], 5, 0, rules(max_side=96)) != signature([], ["a"], 5, 0, rules(max_side=96,
                                                                                              jpeg_quality=80))
    assert main(["make-shards", str(tmp_path / "train"), str(tmp_path / "out"), "--split", "train", "--workers", "1",
                 "--max-side", "100"]) == 0
    assert "shrank 4 images to a longer side of 100 px (JPEG quality 90)" in capsys.readouterr().out


def _read_all_src(root: Path) -> dict[str, tuple[bytes, int]]:
    """{sample key: (file bytes, label)} of an ImageFolder tree, keyed as the writer keys it."""
    classes = sorted(p.name for p in root.iterdir())
    return {f"{path.parent.name}_{path.stem}": (path.read_bytes(), classes.index(path.parent.name))
            for path in sorted(root.glob("*/*"))}


def test_max_pixels_must_be_positive_and_its_help_gives_the_default(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    image_tree(tmp_path / "train", per_class=1)
    with pytest.raises(ShardWriteError, match="--max-pixels 0 must be >= 1"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", max_pixels=0, progress=False)
    assert main(["make-shards", str(tmp_path / "train"), str(tmp_path / "out"), "--split", "train",
                 "--max-pixels", "0"]) == 2
    assert "--max-pixels 0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-shards", "--help"])
    assert f"(default {MAX_IMAGE_PIXELS:,}, PIL's limit)" in " ".join(capsys.readouterr().out.split())


# --- layout checks ---------------------------------------------------------------------------------------------


def _empty_class(src: Path) -> None:
    image_tree(src, per_class=2)
    (src / "bird").mkdir()


def _one_class(src: Path) -> None:
    image_tree(src, classes=("cat",), per_class=2)


def _dataset_root(src: Path) -> None:
    image_tree(src / "Train", per_class=2)
    image_tree(src / "VAL", per_class=1)


def _non_image_files(src: Path) -> None:
    image_tree(src, per_class=2)
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "dog" / "labels.csv").write_text("not an image")
    (src / "dog" / ".DS_Store").write_bytes(b"the OS's, not counted")


def _loose_images(src: Path) -> None:
    image_tree(src, per_class=2)
    (src / "stray.JPEG").write_bytes(jpeg_bytes(8, 8, 1))


LAYOUT_CASES = [
    pytest.param(_empty_class, r"class folders of '[^']+' without image files \(1\): 'bird'; each such class has 0 "
                 r"samples in this split: add its images, or remove the folder", id="empty-class-folder"),
    pytest.param(_one_class, r"source '[^']+' has only 1 class folder \('cat'\); a classifier needs at least 2",
                 id="one-class"),
    pytest.param(_dataset_root, r"source '[^']+' looks like a dataset root holding splits \(class folders 'Train', "
                 r"'VAL'\); pass the split directory, e.g. '[^']+/src/Train'", id="dataset-root"),
    pytest.param(_non_image_files, r"files without an image extension \(\.jpg, .*\) in the class folders of "
                 r"'[^']+', left out \(2\): 'cat/notes\.txt', 'dog/labels\.csv'; move them out", id="non-image-files"),
    pytest.param(_loose_images, r"image files directly in '[^']+', outside any class folder, left out \(1\): "
                 r"'stray\.JPEG'; move them into their class folders", id="images-outside-class-folders"),
]


@pytest.mark.parametrize(("setup", "warning"), LAYOUT_CASES)
def test_layout_problem_warns_by_default(tmp_path: Path, setup: Callable[[Path], None], warning: str,
                                         caplog: pytest.LogCaptureFixture) -> None:
    setup(tmp_path / "src")
    with caplog.at_level("WARNING", logger="gpd_ds.data.shards"):
        entry = make_shards(tmp_path / "src", tmp_path / "out", "train", workers=1, progress=False)
    assert len(entry["layout_warnings"]) == 1
    assert re.search(warning, entry["layout_warnings"][0])
    assert any(re.search(warning, r.getMessage()) for r in caplog.records)
    assert read_index(tmp_path / "out")["splits"]["train"]["layout_warnings"] == entry["layout_warnings"]


@pytest.mark.parametrize(("setup", "warning"), LAYOUT_CASES)
def test_layout_problem_is_printed_by_the_cli_and_refused_with_strict(tmp_path: Path, setup: Callable[[Path], None],
                                                                      warning: str,
                                                                      capsys: pytest.CaptureFixture) -> None:
    setup(tmp_path / "src")
    with pytest.raises(ShardWriteError, match=rf"--strict: the source '[^']+' has 1 layout problem:\n  - {warning}"):
        make_shards(tmp_path / "src", tmp_path / "strict", "train", strict=True, progress=False)
    assert not list((tmp_path / "strict").glob("*.tar"))  # refused before writing anything
    args = ["make-shards", str(tmp_path / "src"), str(tmp_path / "cli"), "--split", "train", "--workers", "1"]
    assert main([*args, "--strict"]) == 2
    err = capsys.readouterr().err
    assert re.search(warning, err)
    assert "run without --strict to convert anyway" in err
    assert "Traceback" not in err
    assert main(args) == 0
    assert re.search(rf"^warning: {warning}", capsys.readouterr().out, re.MULTILINE)


def test_empty_class_folder_is_a_recorded_class_with_0_samples(tmp_path: Path) -> None:
    _empty_class(tmp_path / "src")
    entry = make_shards(tmp_path / "src", tmp_path / "out", "train", workers=1, progress=False)
    assert entry["empty_classes"] == ["bird"]
    assert read_index(tmp_path / "out")["classes"] == ["bird", "cat", "dog", "fish"]
    assert {label for _, label in _read_all(tmp_path / "out", "train").values()} == {1, 2, 3}


def test_strict_lists_every_problem_at_once(tmp_path: Path) -> None:
    _dataset_root(tmp_path / "src")
    (tmp_path / "src" / "Train" / "cat" / "notes.txt").write_text("not an image")
    with pytest.raises(ShardWriteError, match=r"has 2 layout problems:\n  - source .* looks like a dataset root.*"
                                              r"\n  - files without an image extension.*'Train/cat/notes\.txt'"):
        make_shards(tmp_path / "src", tmp_path / "out", "train", strict=True, progress=False)


def test_class_whose_files_were_all_left_out_is_warned_about(tmp_path: Path) -> None:
    src = tmp_path / "src"
    image_tree(src, classes=("cat", "dog"), per_class=2)
    (src / "fish").mkdir()
    (src / "fish" / "broken.JPEG").write_bytes(b"not an image at all")
    # The layout is fine (the file looks like an image), so strict converts; what it cannot judge before reading
    # the files is recorded instead.
    entry = make_shards(src, tmp_path / "out", "train", workers=1, progress=False, strict=True)
    assert entry["empty_classes"] == ["fish"]
    assert entry["layout_warnings"] == ["classes with 0 samples in split 'train' because all their image files "
                                        "were left out (1; see skipped_files): 'fish'"]
    assert entry["skipped_files"] == [f"{src / 'fish' / 'broken.JPEG'}: UnidentifiedImageError: not an image "
                                      "format PIL can read"]


# --- damaged index and class-mapping files ---------------------------------------------------------------------

_FIX = "restore the file, or re-create the dataset with gpd-ds make-shards into a new directory"


def _split(filenames: object = ("a.tar",), shard_lengths: object = (3,), num_samples: object = 3) -> dict:
    entry = {"filenames": filenames, "shard_lengths": shard_lengths, "num_samples": num_samples}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}


BAD_INDEXES = [
    pytest.param("{not json", r" is not valid JSON \(line 1, column 2: Expecting property name", id="not-json"),
    pytest.param([], r" must hold a JSON object \{\.\.\.\}, not a JSON list", id="a-list"),
    pytest.param({"classes": "cat", "splits": {}}, r": field 'classes' must be a list of class names \(strings\), "
                 "not a string", id="classes-a-string"),
    pytest.param({"classes": ["cat", 1], "splits": {}}, r": field 'classes' must be a list of class names "
                 r"\(strings\), not a list with non-string entries", id="classes-not-strings"),
    pytest.param({"classes": ["cat", "cat"], "splits": {}}, r": field 'classes' names 'cat' more than once",
                 id="classes-twice"),
    pytest.param({"classes": ["cat", "dog"], "num_classes": 3, "splits": {}}, r": field 'num_classes' is 3 but "
                 r"'classes' lists 2", id="num-classes-mismatch"),
    pytest.param({"classes": ["cat", "dog"]}, r": field 'splits' is missing", id="no-splits"),
    pytest.param({"splits": ["train"]}, r": field 'splits' must be an object \{split name: entry\}, not a list",
                 id="splits-a-list"),
    pytest.param({"splits": {"train": 3}}, r": field 'splits.train' must be an object, not a number",
                 id="entry-a-number"),
    *[pytest.param({"splits": {"train": {k: v for k, v in _split().items() if k != missing}}},
                   rf": field 'splits\.train\.{missing}' is missing", id=f"no-{missing}")
      for missing in ("filenames", "shard_lengths", "num_samples")],
    pytest.param({"splits": {"train": _split(filenames="a.tar")}}, r": field 'splits\.train\.filenames' must be a "
                 r"list of shard file names \(strings\)", id="filenames-a-string"),
    pytest.param({"splits": {"train": _split(shard_lengths=[-3])}}, r": field 'splits\.train\.shard_lengths' must "
                 r"be a list of sample counts \(whole numbers >= 0\)", id="negative-length"),
    pytest.param({"splits": {"train": _split(shard_lengths=[1.5])}}, r": field 'splits\.train\.shard_lengths' "
                 "must be a list of sample counts", id="fractional-length"),
    pytest.param({"splits": {"train": _split(filenames=["a.tar", "b.tar"])}}, r": field 'splits\.train\.filenames' "
                 r"lists 2 shards but 'splits\.train\.shard_lengths' has 1 count", id="lengths-differ"),
    pytest.param({"splits": {"train": _split(num_samples=4)}}, r": field 'splits\.train\.num_samples' is 4 but "
                 r"'splits\.train\.shard_lengths' sum to 3", id="num-samples-mismatch"),
]


@pytest.mark.parametrize(("content", "message"), BAD_INDEXES)
def test_damaged_index_names_the_file_and_the_field(tmp_path: Path, content: object, message: str,
                                                     capsys: pytest.CaptureFixture) -> None:
    image_tree(tmp_path / "val", per_class=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / INDEX_NAME).write_text(content if isinstance(content, str) else json.dumps(content))
    expected = re.escape(repr(str(out / INDEX_NAME))) + message + ".*" + re.escape(_FIX)
    with pytest.raises(ShardWriteError, match=expected):
        read_index(out)
    with pytest.raises(ShardWriteError, match=expected):
        make_shards(tmp_path / "val", out, "val", progress=False)
    assert main(["make-shards", str(tmp_path / "val"), str(out), "--split", "val"]) == 2
    err = capsys.readouterr().err
    assert re.search(expected, err)
    assert "Traceback" not in err


class _LoaderError(Exception):
    """Stands in for the loader's own error type."""


@pytest.mark.parametrize(("content", "message"), [p for p in BAD_INDEXES if p.id != "not-json"])
def test_validate_index_raises_the_callers_error_type(content: object, message: str) -> None:
    with pytest.raises(_LoaderError, match="^" + re.escape("s3://bucket/_info.json") + message):
        validate_index(content, "s3://bucket/_info.json", _LoaderError)


def test_validate_index_returns_a_valid_index_unchanged(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=2)
    make_shards(tmp_path / "train", tmp_path / "out", "train", shard_size=4, progress=False)
    index = json.loads((tmp_path / "out" / INDEX_NAME).read_text())
    assert validate_index(index, "out/_info.json") is index
    timm_style = {"name": "x", "splits": {"train": _split(filenames=[], shard_lengths=[], num_samples=0)}}
    assert validate_index(timm_style, "x") is timm_style  # classes are optional


@pytest.mark.parametrize(("name", "content", "message"), [
    ("m.json", "{bad", r"class mapping '[^']+m\.json' is not valid JSON \(line 1, column 2: Expecting property "
     r"name.*\); write a JSON list of class names"),
    ("m.json", '"cats"', r"class mapping '[^']+' holds a JSON string; write a JSON list of class names"),
    ("m.json", '{"cat": "0", "dog": 1}', r"class mapping '[^']+': the indices of a \{name: index\} object must be "
     "whole numbers"),
    ("m.json", '{"cat": 0, "dog": 2}', r"class mapping '[^']+': indices must be 0\.\.1, each once"),
    ("m.json", '["cat", ["dog"]]', r"class mapping '[^']+': entry 1 is a list, not a class name"),
    ("m.json", "[]", r"class mapping '[^']+' names no classes"),
    ("m.json", '["cat", "dog", "cat"]', r"class mapping '[^']+' names 'cat' more than once"),
    ("m.txt", "cat\ndog\ncat\n", r"class mapping '[^']+' names 'cat' more than once"),
    ("m.txt", b"\xff\xfe\x00cat", r"class mapping '[^']+m\.txt' is not UTF-8 text \(byte 0\)"),
])
def test_invalid_class_mapping_names_the_file_and_why(tmp_path: Path, name: str, content: str | bytes,
                                                      message: str, capsys: pytest.CaptureFixture) -> None:
    image_tree(tmp_path / "train", classes=("cat", "dog"), per_class=1)
    mapping = tmp_path / name
    mapping.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(ShardWriteError, match=message):
        make_shards(tmp_path / "train", tmp_path / "out", "train", class_mapping=mapping, progress=False)
    assert main(["make-shards", str(tmp_path / "train"), str(tmp_path / "out"), "--split", "train",
                 "--class-mapping", str(mapping)]) == 2
    err = capsys.readouterr().err
    assert re.search(message, err)
    assert "Traceback" not in err


def test_damaged_plan_file_on_resume(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".out-train.plan.json").write_text("{trunc")
    with pytest.raises(ShardWriteError, match=r"plan file '[^']+\.out-train\.plan\.json' is not valid JSON .*; "
                                              r"remove \.out-train\.plan\.json and the split's shards"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", resume=True, progress=False)


def test_output_path_that_is_a_file(tmp_path: Path) -> None:
    image_tree(tmp_path / "train", per_class=1)
    (tmp_path / "out").write_text("a file")
    with pytest.raises(ShardWriteError, match=r"cannot create the output directory '[^']+out': .*; pass a "
                                              "directory path you can write to"):
        make_shards(tmp_path / "train", tmp_path / "out", "train", progress=False)


# --- the CLI summary -------------------------------------------------------------------------------------------


def _entry(**changes: object) -> dict:
    entry = {"name": "train", "num_samples": 36, "filenames": ["a", "b", "c"], "shard_lengths": [12, 12, 12],
             "skipped_files": [], "non_rgb_jpeg_files": {}, "layout_warnings": []}
    return {**entry, **changes}


@pytest.mark.parametrize(("entry", "lines"), [
    (_entry(), ["wrote 36 samples of split 'train' into 3 shards (12 samples each) under OUT; index: OUT/_info.json"]),
    (_entry(num_samples=1, filenames=["a"], shard_lengths=[1]),
     ["wrote 1 sample of split 'train' into 1 shard (1 samples each) under OUT; index: OUT/_info.json"]),
    (_entry(num_samples=11, shard_lengths=[5, 5, 1], skipped_files=["x/a.jpg: UnidentifiedImageError: no"]),
     ["wrote 11 samples of split 'train' into 3 shards (1-5 samples each) under OUT; index: OUT/_info.json",
      "left out 1 file (listed in the index under skipped_files):", "  x/a.jpg: UnidentifiedImageError: no"]),
    (_entry(skipped_files=[f"f{i}.jpg: bad" for i in range(7)]),
     [..., "left out 7 files (listed in the index under skipped_files):",
      *[f"  f{i}.jpg: bad" for i in range(5)], "  ... and 2 more"]),
    (_entry(non_rgb_jpeg_files={"JPEG/L": 2, "PNG/RGB": 1}),
     [..., "kept 2 JPEG/L and 1 PNG/RGB files (converted to RGB when read)"]),
    (_entry(non_rgb_jpeg_files={"JPEG/CMYK": 1, "JPEG/L": 1, "PNG/RGB": 3}),
     [..., "kept 3 PNG/RGB, 1 JPEG/CMYK and 1 JPEG/L files (converted to RGB when read)"]),
    (_entry(non_rgb_jpeg_files={"PNG/RGB": 1}), [..., "kept 1 PNG/RGB file (converted to RGB when read)"]),
    (_entry(layout_warnings=["one", "two"]), [..., "warning: one", "warning: two"]),
])
def test_summary_lines(entry: dict, lines: list) -> None:
    """``...`` stands for a line the case is not about (the first line, checked by the first cases)."""
    got = summary_lines(entry, "OUT")
    assert len(got) == len(lines)
    for line, want in zip(got, lines, strict=True):
        assert want is ... or line == want


def test_cli_summary_is_readable_text(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "train"
    image_tree(src, per_class=2)
    (src / "bird").mkdir()
    (src / "cat" / "notes.txt").write_text("not an image")
    (src / "cat" / "gray.JPEG").write_bytes(jpeg_bytes(9, 7, 1, mode="L"))
    (src / "cat" / "png.JPEG").write_bytes(jpeg_bytes(7, 9, 3, fmt="PNG"))
    for i in range(7):
        (src / "dog" / f"broken{i}.JPEG").write_bytes(b"not an image at all")
    out = tmp_path / "wds"
    assert main(["make-shards", str(src), str(out), "--split", "train", "--shard-size", "4", "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "{" not in printed
    assert "[" not in printed
    lines = printed.splitlines()
    assert re.fullmatch(rf"wrote 8 samples of split 'train' into 4 shards \(\d-\d samples each\) under {out}; "
                        rf"index: {out / INDEX_NAME}", lines[0])
    assert lines[1:8] == ["left out 7 files (listed in the index under skipped_files):",
                          *[f"  {src / 'dog' / f'broken{i}.JPEG'}: UnidentifiedImageError: not an image format "
                            "PIL can read" for i in range(5)], "  ... and 2 more"]
    assert lines[8] == "kept 1 JPEG/L and 1 PNG/RGB files (converted to RGB when read)"
    assert [line.split(" of ")[0] for line in lines[9:]] == ["warning: class folders", "warning: files without an "
                                                             "image extension (.jpg, .jpeg, .png, .bmp, .webp, .tif, "
                                                             ".tiff, .ppm) in the class folders"]


def _worker_sigterm_is_default(_: int) -> bool:
    import signal

    return signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_writer_workers_die_on_sigterm_even_under_a_ranks_stop_handler(tmp_path: Path, monkeypatch) -> None:
    """A training rank (the demo makes its shards inside train) holds a SIGTERM handler that only records a stop
    request; forked writer workers must not inherit it, or Pool.terminate hangs on a worker it cannot kill."""
    import multiprocessing

    from gpd_ds.preemption import StopRequest

    pools: list[dict] = []
    real_pool = multiprocessing.Pool

    def recording_pool(*args, **kwargs):
        pools.append(kwargs)
        return real_pool(*args, **kwargs)

    monkeypatch.setattr(shards_mod.multiprocessing, "Pool", recording_pool)
    stop = StopRequest().install()
    try:
        image_tree(tmp_path / "train")
        make_shards(tmp_path / "train", tmp_path / "out", "train", shard_size=5, workers=2, progress=False)
        assert pools
        assert pools[0]["initializer"] is shards_mod._default_signals
        with shards_mod._worker_pool(2) as pool:  # what the workers see
            assert all(pool.map(_worker_sigterm_is_default, range(4)))
        # and what they would see without it; closed, not terminated: such a worker ignores SIGTERM, so
        # Pool.__exit__ (terminate) would hang on it, which is the bug the initializer prevents
        pool = real_pool(1)
        try:
            assert not pool.map(_worker_sigterm_is_default, range(1))[0]
        finally:
            pool.close()
            pool.join()
    finally:
        stop.uninstall()


def _slow_start(real: Callable[[], None]) -> Callable[[], None]:
    def start() -> None:
        time.sleep(1.0)  # a worker slow to start (a loaded machine): a SIGTERM can come before its initializer
        real()
    return start


def _exit_code(worker, timeout: float) -> int | None:
    """A pool worker's exit code, or None if it is still alive after `timeout`. Not `join` then `exitcode`: the
    pool's own handler thread wakes on the same death and reaps the worker; whichever waitpid loses gets ECHILD
    and reads None until the winner has stored the status."""
    deadline = time.monotonic() + timeout
    while worker.exitcode is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return worker.exitcode


def test_a_sigterm_that_comes_before_a_workers_initializer_still_kills_it(monkeypatch) -> None:
    """The inherited record-only handler is live from the fork until the initializer resets it; a SIGTERM in that
    window (Pool.terminate right after a short map) must not be swallowed, or the worker outlives terminate and
    the rank hangs in the join. The stop signals stay blocked until the initializer has run."""
    from gpd_ds.preemption import StopRequest

    monkeypatch.setattr(shards_mod, "_default_signals", _slow_start(shards_mod._default_signals))
    stop = StopRequest().install()
    try:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        pool = shards_mod._worker_pool(2)
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask  # the rank's own mask is restored
        workers = list(pool._pool)
        try:
            for p in workers:
                os.kill(p.pid, signal.SIGTERM)  # before their initializers have run
            assert [_exit_code(p, timeout=20) for p in workers] == [-signal.SIGTERM] * len(workers)
        finally:
            # close, not terminate: the workers still alive (the failure this test looks for) take the close
            # sentinel and exit; terminate would hang on them
            pool.close()
            pool.join()
        assert stop.signum is None  # the rank itself received nothing
    finally:
        stop.uninstall()
