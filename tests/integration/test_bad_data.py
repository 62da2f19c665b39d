"""Damaged shards, wrong indexes and bad-sample rates: each case a clear error or a counted skip, for the
streaming train loader, the in-memory loader and evaluation (make-shards' cases are in test_shards.py)."""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gpd_ds.data.decode import BadSample, CpuDecode, DataError, decode
from gpd_ds.data.loader import TrainLoader, TrainShards, eval_loader, resolve_shards
from gpd_ds.data.memory import MemoryTrainLoader
from gpd_ds.data.transforms import Augment, DeviceTransform, eval_transform, train_transform
from gpd_ds.evaluate import evaluate
from tests.data_helpers import good_sample, jpeg_bytes, write_shard
from tests.integration.launch_helpers import REPO, overrides, single, workspace_with_data

SIZE = 16
CLASSES = ["a", "b"]
SHARDS, PER_SHARD = 4, 20  # 80 samples per fixture


def _samples(shard: int, n: int = PER_SHARD) -> list[dict]:
    return [good_sample(f"s{shard}-{j:03d}", j % 2, 1000 * shard + j) for j in range(n)]


def _write(root: Path, shards: list[list[dict]], lengths: list[int] | None = None, split: str = "val") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    names = [f"d-{split}-{i:06d}.tar" for i in range(len(shards))]
    for name, samples in zip(names, shards, strict=True):
        write_shard(root / name, samples)
    lengths = lengths or [len(s) for s in shards]
    index = {"name": "d", "classes": CLASSES, "num_classes": len(CLASSES),
             "splits": {split: {"name": split, "num_samples": sum(lengths), "filenames": names,
                                "shard_lengths": lengths}}}
    (root / "_info.json").write_text(json.dumps(index))
    return root


@functools.cache
def _huge_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (16000, 16000)).save(buf, "PNG")  # ~750 KB on disk, 256 M pixels decoded
    return buf.getvalue()


# Damage with a known number of bad samples (of 80): each builder writes the fixture under ``root``.
def _truncated_tar(root: Path) -> int:
    _write(root, [_samples(i) for i in range(SHARDS)])
    shard = root / "d-val-000002.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return -1  # how many are lost depends on where the cut falls: the test reads the warning


def _repeat_a_member(root: Path, shards: list[list[dict]], shard: int, j: int) -> None:
    """Rewrite ``shard`` with sample ``j``'s .jpg member twice (webdataset would drop the rest of the shard)."""
    s = shards[shard][j]
    write_shard(root / f"d-val-{shard:06d}.tar", [*shards[shard][:j], {"__key__": s["__key__"], "jpg": s["jpg"]},
                                                  s, *shards[shard][j + 1:]])


def _duplicate_member(root: Path) -> int:
    shards = [_samples(i) for i in range(SHARDS)]
    _write(root, shards)
    _repeat_a_member(root, shards, 1, 5)
    return 1


def _zero_byte_shard(root: Path) -> int:
    _write(root, [_samples(i) for i in range(SHARDS)])
    (root / "d-val-000003.tar").write_bytes(b"")
    return PER_SHARD


def _corrupt_jpegs(root: Path) -> int:
    shards = [_samples(i) for i in range(SHARDS)]
    for i, j in ((0, 3), (2, 7), (3, 19)):
        shards[i][j] = {**shards[i][j], "jpg": jpeg_bytes(SIZE, SIZE, 7)[:50]}
    _write(root, shards)
    return 3


def _huge_image(root: Path) -> int:
    shards = [_samples(i) for i in range(SHARDS)]
    shards[0][0] = {"__key__": "huge", "png": _huge_png(), "cls": b"0"}
    _write(root, shards)
    return 1


def _everything(root: Path) -> int:
    """Every kind of damage at once: 3 corrupt JPEGs, a repeated member, a zero-byte shard, a huge image."""
    shards = [_samples(i) for i in range(SHARDS)]
    for i, j in ((0, 3), (0, 7), (2, 19)):
        shards[i][j] = {**shards[i][j], "jpg": jpeg_bytes(SIZE, SIZE, 7)[:50]}
    shards[2][0] = {"__key__": "huge", "png": _huge_png(), "cls": b"0"}
    _write(root, shards)
    _repeat_a_member(root, shards, 1, 5)
    (root / "d-val-000003.tar").write_bytes(b"")
    return 3 + 1 + 1 + PER_SHARD


COUNTED = {"duplicate member": _duplicate_member, "zero-byte shard": _zero_byte_shard,
           "corrupt jpegs": _corrupt_jpegs, "huge image": _huge_image, "everything": _everything}

# An intact shard whose count disagrees with the index is an error naming the shard, for every loader.
WRONG_INDEX = {
    "index says 20, shards hold 16": ([16] * SHARDS, [20] * SHARDS, "holds 16 samples but its index entry says 20"),
    "doubled counts": ([20] * SHARDS, [40] * SHARDS, "holds 20 samples but its index entry says 40"),
    "index says 16, shards hold 20": ([20] * SHARDS, [16] * SHARDS,
                                      "holds more samples than the 16 its index entry says"),
}


def _wrong_index(root: Path, case: str) -> Path:
    held, listed, _ = WRONG_INDEX[case]
    return _write(root, [_samples(i, n) for i, n in enumerate(held)], listed)


def _eval_read(root: Path, world: int = 1, max_bad_fraction: float = 0.5, workers: int = 0) -> list[str]:
    """Keys evaluated over ``world`` ranks (each rank's loader in turn)."""
    shards = resolve_shards(str(root), "val")
    keys = []
    for rank in range(world):
        for batch in eval_loader(shards, batch_size=8, rank=rank, world_size=world, num_workers=workers,
                                 transform=eval_transform(SIZE, crop_pct=1.0), max_bad_fraction=max_bad_fraction):
            keys += batch.keys
    return keys


def _bad_warnings(caplog: pytest.LogCaptureFixture) -> int:
    return sum(r.getMessage().startswith("skipping bad sample") for r in caplog.records)


def _lost_in_warning(caplog: pytest.LogCaptureFixture) -> int:
    """Bad samples announced by a damaged shard's warning ('the other N of its M count as bad')."""
    import re
    return sum(int(m.group(1)) for r in caplog.records if (m := re.search(r"the other (\d+) of its", r.getMessage())))


def _train_first_pass(root: Path, world: int, workers: int) -> tuple[int, int, int]:
    """(expected, read, bad) over one full pass of every train stream (all ranks and workers) through the
    streaming loader's own emission order (shuffle buffer included)."""
    shards = resolve_shards(str(root), "val")
    read = bad = 0
    for rank in range(world):
        ds = TrainShards(shards, batch_size=1, rank=rank, world_size=world, num_workers=workers, seed=0,
                         reader=CpuDecode(lambda x: x, len(CLASSES)), shuffle_buffer=7, max_bad_fraction=1.0,
                         max_pixels=89_478_485)
        for worker in range(workers):
            share = sum(length for _, length in ds._own_shards(rank, worker))
            stream = ds._emissions(rank, worker)
            for _ in range(share):
                try:
                    decode(next(stream), len(CLASSES))
                    read += 1
                except BadSample:
                    bad += 1
    return shards.num_samples, read, bad


@pytest.mark.parametrize("case", sorted(COUNTED))
@pytest.mark.parametrize("world", [1, 2])
def test_counts_add_up_expected_is_read_plus_bad(tmp_path: Path, case: str, world: int,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    bad = COUNTED[case](tmp_path)
    with caplog.at_level(logging.WARNING):
        keys = _eval_read(tmp_path, world)
    assert len(keys) == len(set(keys)) == SHARDS * PER_SHARD - bad  # eval: every good sample once, bad counted
    assert _bad_warnings(caplog) == bad
    expected, read, bad_train = _train_first_pass(tmp_path, world, workers=2 if world == 1 else 1)
    assert (expected, read, bad_train) == (SHARDS * PER_SHARD, SHARDS * PER_SHARD - bad, bad)
    loader = MemoryTrainLoader(resolve_shards(str(tmp_path), "val"), batch_size=4, rank=world - 1,
                               world_size=world, transform=lambda x: x, num_workers=1, max_bad_fraction=0.5)
    assert (len(loader.images), loader.bad_samples) == (SHARDS * PER_SHARD - bad, bad)


def test_a_truncated_shard_counts_its_lost_samples(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _truncated_tar(tmp_path)
    with caplog.at_level(logging.WARNING):
        keys = _eval_read(tmp_path)
    lost = _lost_in_warning(caplog)
    assert 0 < lost < PER_SHARD
    assert _bad_warnings(caplog) == lost  # each lost sample is a counted bad one
    assert len(keys) + lost == SHARDS * PER_SHARD
    assert _train_first_pass(tmp_path, 1, 2) == (80, 80 - lost, lost)


@pytest.mark.parametrize("case", sorted(WRONG_INDEX))
@pytest.mark.parametrize("loader", ["eval", "train", "in_memory"])
def test_an_index_that_disagrees_with_its_shards_names_the_shard(tmp_path: Path, case: str, loader: str) -> None:
    root = _wrong_index(tmp_path, case)
    shards = resolve_shards(str(root), "val")
    runs: dict[str, Callable[[], object]] = {
        "eval": lambda: _eval_read(root, workers=1),
        "train": lambda: list(TrainLoader(shards, batch_size=4, rank=0, world_size=1, num_workers=1,
                                          transform=train_transform(SIZE, Augment()))),
        "in_memory": lambda: MemoryTrainLoader(shards, batch_size=4, rank=0, world_size=1, transform=lambda x: x),
    }
    with pytest.raises(DataError) as caught:
        runs[loader]()
    message = str(caught.value)
    assert message.startswith("shard '"), message  # the first line is the reason
    assert "d-val-00000" in message
    assert WRONG_INDEX[case][2] in message
    assert "gpd-ds make-shards" in message
    assert "Caught" not in message
    assert "Traceback" not in message


def _evaluate(root: Path, max_bad_fraction: float) -> dict:
    shards = resolve_shards(str(root), "val")
    loader = eval_loader(shards, batch_size=8, rank=0, world_size=1, num_workers=1,
                         transform=eval_transform(SIZE, crop_pct=1.0), max_bad_fraction=max_bad_fraction)
    model = {"zeros": lambda x: torch.zeros(x.shape[0], len(CLASSES))}
    return evaluate(model, loader, DeviceTransform(len(CLASSES)), contextlib.nullcontext,
                    expected=shards.num_samples, max_bad_fraction=max_bad_fraction, split="split 'val'")


@pytest.mark.parametrize(("build", "max_bad_fraction", "outcome"), [
    (_corrupt_jpegs, 0.05, 77),  # 3 of 80 under a 5% limit: evaluated
    (_corrupt_jpegs, 0.01, "evaluation read 77 of the 80 samples the index lists for split 'val' (3 bad or lost"),
    (_zero_byte_shard, 0.01, "evaluation read 60 of the 80 samples"),
    (_everything, 0.01, "evaluation read 55 of the 80 samples"),
])
def test_evaluation_fails_below_the_covered_fraction(tmp_path: Path, build, max_bad_fraction: float,
                                                     outcome: int | str) -> None:
    build(tmp_path)
    if isinstance(outcome, int):
        assert _evaluate(tmp_path, max_bad_fraction)["zeros"]["samples"] == outcome
        return
    with pytest.raises(DataError, match=outcome.replace("(", r"\(")):
        _evaluate(tmp_path, max_bad_fraction)


def test_an_entirely_bad_validation_split_fails(tmp_path: Path) -> None:
    _write(tmp_path, [_samples(i) for i in range(SHARDS)])
    for i in range(SHARDS):
        (tmp_path / f"d-val-{i:06d}.tar").write_bytes(b"")
    with pytest.raises(DataError, match="evaluation read 0 of the 80 samples"):
        _evaluate(tmp_path, 0.01)


def _rate_fixture(root: Path, bad: int) -> Path:
    """12 shards x 20 = 240 samples, ``bad`` of them corrupt JPEGs spread over the shards."""
    shards = [_samples(i) for i in range(12)]
    for k in range(bad):
        shards[2 * k][k] = {**shards[2 * k][k], "jpg": b"\xff\xd8 not a jpeg"}
    return _write(root, shards)


def test_one_rule_for_every_loader(tmp_path: Path) -> None:
    """1 bad of 240 (0.4%) passes both train loaders; 5 of 240 (2.1%) stops both: the rate is judged over the
    whole epoch, not shard by shard nor only after 200 samples per worker; the error is the first line."""
    kwargs = {"batch_size": 10, "rank": 0, "world_size": 1, "max_bad_fraction": 0.01}
    ok = resolve_shards(str(_rate_fixture(tmp_path / "one", 1)), "val")
    assert MemoryTrainLoader(ok, transform=lambda x: x, num_workers=2, **kwargs).bad_samples == 1
    assert len(list(TrainLoader(ok, transform=train_transform(SIZE, Augment()), num_workers=2, **kwargs))) == 24
    too_many = resolve_shards(str(_rate_fixture(tmp_path / "five", 5)), "val")
    for build in (lambda: MemoryTrainLoader(too_many, transform=lambda x: x, num_workers=2, **kwargs),
                  lambda: list(TrainLoader(too_many, transform=train_transform(SIZE, Augment()), num_workers=2,
                                           **kwargs))):
        with pytest.raises(DataError) as caught:
            build()
        assert pytest.importorskip("re").match(
            r"\d+ of \d+ samples read by (the in-memory loader|rank 0 in epoch 0) were bad "
            r"\(> data.max_bad_fraction=0.01\)", str(caught.value)), str(caught.value)


def test_an_image_over_the_pixel_limit_is_skipped_from_its_header(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    _huge_image(tmp_path)
    with caplog.at_level(logging.WARNING):
        keys = _eval_read(tmp_path)
    assert "huge" not in keys
    assert len(keys) == 79
    assert any("16000x16000 = 256,000,000 pixels, over data.max_image_pixels=89,478,485" in r.getMessage()
               for r in caplog.records)
    small = {"__key__": "k", "jpg": jpeg_bytes(40, 30, 1), "cls": b"0"}
    with pytest.raises(BadSample, match=r"40x30 = 1,200 pixels, over data\.max_image_pixels=1,000"):
        decode(small, 2, max_pixels=1000)


@pytest.mark.parametrize(("fmt", "mode", "options"), [
    ("JPEG", "RGB", {}), ("JPEG", "L", {}), ("JPEG", "CMYK", {}), ("JPEG", "RGB", {"progressive": True}),
    ("JPEG", "RGB", {"exif": b"Exif\x00\x00" + bytes(300)}), ("PNG", "RGB", {}), ("PNG", "L", {}),
    ("WEBP", "RGB", {}), ("BMP", "RGB", {}), ("TIFF", "CMYK", {}),
])
def test_the_fast_header_read_agrees_with_pil(fmt: str, mode: str, options: dict) -> None:
    """The loaders' size check parses JPEG/PNG headers itself (PIL for the rest): same sizes as PIL."""
    from gpd_ds.data.shards import image_header, image_size
    rng = np.random.default_rng(0)
    for width, height in ((1, 1), (37, 913), (500, 375), (4000, 3)):
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).convert(mode).save(buf, fmt, **options)
        data = buf.getvalue()
        assert image_size(data) == image_header(data)[2:] == (width, height)
    with pytest.raises(OSError, match="Truncated File Read"):  # the walk gives up, PIL names the damage
        image_size(b"\xff\xd8\xff\xe0 truncated")


@pytest.mark.parametrize(("index", "fragment"), [
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "must hold a JSON object"),
    (json.dumps({"classes": CLASSES, "splits": {"val": {"filenames": ["d-val-000000.tar"], "num_samples": 20}}}),
     "field 'splits.val.shard_lengths' is missing"),
    (json.dumps({"classes": CLASSES, "splits": {"val": {"filenames": ["d-val-000000.tar", "x.tar"],
                                                        "shard_lengths": [20], "num_samples": 20}}}),
     "field 'splits.val.filenames' lists 2 shards but 'splits.val.shard_lengths' has 1 count"),
    (json.dumps({"splits": {"val": {"filenames": ["d-val-000000.tar"], "shard_lengths": [20],
                                    "num_samples": 20}}}), "has no 'classes' field"),
    (json.dumps({"classes": CLASSES, "splits": {"val": {"filenames": ["d-val-000000.tar"], "shard_lengths": [0],
                                                        "num_samples": 0}}}), "holds no samples by its index"),
])
def test_a_malformed_index_names_the_file_and_the_field(tmp_path: Path, index: str, fragment: str) -> None:
    _write(tmp_path, [_samples(0)])
    (tmp_path / "_info.json").write_text(index)
    with pytest.raises(DataError) as caught:
        resolve_shards(str(tmp_path), "val")
    assert fragment in str(caught.value)
    assert "holds no samples" in fragment or str(tmp_path / "_info.json") in str(caught.value)


def test_pipe_roots_work_with_allow_pipe(tmp_path: Path) -> None:
    root = _write(tmp_path / "data", [_samples(i) for i in range(SHARDS)])
    spec = f"pipe:cat {root}"
    with pytest.raises(DataError, match=r"allow it with --set data.allow_pipe=true \(gpd-ds train\) or "
                                        r"--allow-pipe \(gpd-ds eval\)"):
        resolve_shards(spec, "val")
    with pytest.raises(DataError, match="write the pipe prefix in lower case"):
        resolve_shards(f"PIPE:cat {root}", "val", allow_pipe=True)
    shards = resolve_shards(spec, "val", allow_pipe=True)  # the index comes through the same command
    assert shards.urls[0] == f"pipe:cat {root}/d-val-000000.tar"
    assert shards.num_samples == 80
    keys = [k for b in eval_loader(shards, batch_size=16, rank=0, world_size=1, num_workers=0,
                                   transform=eval_transform(SIZE, crop_pct=1.0)) for k in b.keys]
    assert len(keys) == 80
    pattern = resolve_shards(f"pipe:cat {root}/d-val-{{000000..000001}}.tar", allow_pipe=True)
    assert pattern.lengths == (20, 20)


# ------------------------------------------------------------------------------------- whole runs (subprocess)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("bad_data"))


def _damaged_copy(workspace: Path, name: str, damage: Callable[[Path], None]) -> Path:
    import shutil
    root = workspace / name
    shutil.copytree(workspace / "data", root)
    damage(root)
    return root


def _empty_val(root: Path) -> None:
    index = json.loads((root / "_info.json").read_text())
    for name in index["splits"]["val"]["filenames"]:
        (root / name).write_bytes(b"")


def _short_train_index(root: Path) -> None:
    index = json.loads((root / "_info.json").read_text())
    entry = index["splits"]["train"]
    entry["shard_lengths"] = [n + 2 for n in entry["shard_lengths"]]
    entry["num_samples"] = sum(entry["shard_lengths"])
    (root / "_info.json").write_text(json.dumps(index))


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "workers", "first_line"), [
    (_empty_val, 0, "gpd-ds train: error: evaluation read 0 of the 40 samples the index lists for split 'val'"),
    (_short_train_index, 1, "gpd-ds train: error: shard '"),
])
def test_a_run_on_bad_data_stops_with_one_line_and_logs_it(workspace: Path, damage, workers: int,
                                                           first_line: str) -> None:
    root = _damaged_copy(workspace, damage.__name__, damage)
    run = workspace / f"run{damage.__name__}"
    result = single(workspace, ["--run-dir", str(run), *overrides(root, **{"model.static_teacher": "none",
                                                                          "data.workers": workers})])
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "Caught DataError" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(first_line), result.stderr[-3000:]
    log = (run / "logs" / "rank0.log").read_text()
    assert "stopped: " + first_line.removeprefix("gpd-ds train: error: ") in log


@pytest.mark.parametrize("kill_leftovers", [True, False])
def test_a_process_exits_while_a_loader_worker_is_left(kill_leftovers: bool) -> None:
    """Loader workers ignore SIGTERM (preemption.py), which is also how multiprocessing stops daemonic children
    at exit before joining them: a worker a DataLoader left running (its iterator kept alive by an error's
    traceback) would make the process wait forever. gpd_ds's exit handler kills them first."""
    import subprocess
    import sys
    script = ("import multiprocessing, time, atexit\n"
              "from gpd_ds import preemption\n"
              f"if not {kill_leftovers}: atexit.unregister(preemption._kill_leftover_workers)\n"
              "def worker():\n    preemption.ignore_stop_signals()\n    time.sleep(600)\n"
              "child = multiprocessing.get_context('fork').Process(target=worker, daemon=True)\n"
              "child.start()\ntime.sleep(1)\nraise SystemExit(3)\n")
    run = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert run.wait(timeout=15) == 3
        assert kill_leftovers
    except subprocess.TimeoutExpired:
        assert not kill_leftovers  # the control: without the handler the process waits for the worker
    finally:
        import os
        import signal
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        run.wait()


def test_an_unknown_error_keeps_its_traceback_in_the_rank_log(tmp_path: Path, monkeypatch, capsys) -> None:
    """Only UserInputErrors are one-liners: a bug propagates (traceback on stderr) and is written to the log."""
    from gpd_ds.cli import main as cli_main
    from gpd_ds.distributed import DistInfo
    from gpd_ds.train import entry as train_module

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_module.distributed, "init", lambda: DistInfo(0, 1, 0, torch.device("cpu")))
    monkeypatch.setattr(train_module, "train", bug)
    root, handlers, level = logging.getLogger(), list(logging.getLogger().handlers), logging.getLogger().level
    previous_sigterm = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(ZeroDivisionError, match="a bug"):
            cli_main(["train", "--run-dir", str(tmp_path / "run"), "--deepspeed_config",
                      str(REPO / "ds_configs/zero2.json")])
    finally:  # _setup_logging replaced the root handlers with ones writing into tmp_path
        for handler in root.handlers:
            handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
    assert signal.getsignal(signal.SIGTERM) is previous_sigterm  # train's stop request is uninstalled
    log = (tmp_path / "run" / "logs" / "rank0.log").read_text()
    assert "failed with an unexpected error" in log
    assert "Traceback" in log
    assert "ZeroDivisionError: a bug" in log

    monkeypatch.setattr("gpd_ds.report.render", bug)
    with pytest.raises(ZeroDivisionError):  # not "gpd-ds report: error: a bug"
        cli_main(["report", str(tmp_path / "run")])
