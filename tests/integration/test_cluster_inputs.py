"""Inputs a cluster's real life brings that used to get through: each now a one-line error or a counted decision."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from gpd_ds.checkpoint import MARKER, Marker, ResumeError
from gpd_ds.config import ConfigError, apply_overrides
from gpd_ds.config_checks import check_config
from gpd_ds.data.loader import DataError, decode, eval_loader, resolve_shards
from gpd_ds.data.transforms import eval_transform
from gpd_ds.recipes import get_recipe
from tests.data_helpers import good_sample, synthetic_shards, write_index, write_shard
from tests.integration.launch_helpers import REPO, env


def _animated(fmt: str, frames: int = 100, size: tuple[int, int] = (20, 12)) -> bytes:
    images = [Image.new("RGB", size, (2 * i, 100, 50)) for i in range(frames)]
    buf = io.BytesIO()
    images[0].save(buf, format=fmt, save_all=True, append_images=images[1:])
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "PNG"])
def test_an_animated_image_is_its_first_frame(fmt: str) -> None:
    image, label = decode({"jpg": _animated(fmt), "cls": b"2"}, num_classes=4)
    assert (image.shape, image.dtype, label) == ((3, 12, 20), torch.uint8, 2)
    assert image[:, 0, 0].tolist() == [0, 100, 50]  # frame 0's colour


def test_an_animated_gif_in_the_val_split_is_evaluated(tmp_path: Path) -> None:
    """It crashed evaluation (torch.stack of a 4-D and 3-D images) before."""
    samples = [good_sample(f"k{i}", i % 4, i) for i in range(5)]
    samples.append({"__key__": "anim", "jpg": _animated("GIF", size=(16, 16)), "cls": b"1"})
    write_shard(tmp_path / "v-000000.tar", samples)
    write_index(tmp_path, "val", {"v-000000.tar": 6}, [f"c{k}" for k in range(4)])
    batches = list(eval_loader(resolve_shards(str(tmp_path), "val"), batch_size=3, rank=0, world_size=1,
                               transform=eval_transform(16, crop_pct=1.0), num_workers=0))
    assert [b.images.shape for b in batches] == [(3, 3, 16, 16), (3, 3, 16, 16)]
    assert "anim" in batches[1].keys


def _index(root: Path) -> dict:
    return json.loads((root / "_info.json").read_text())


def test_an_index_that_lists_a_shard_twice_is_refused(tmp_path: Path) -> None:
    root = synthetic_shards(tmp_path / "d", "val", [3, 2])
    index = _index(root)
    split = index["splits"]["val"]
    split["filenames"].append(split["filenames"][0])
    split["shard_lengths"].append(3)
    split["num_samples"] += 3
    (root / "_info.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=r"filenames' lists 'syn-val-000000.tar' more than once"):
        resolve_shards(str(root), "val")


@pytest.mark.parametrize("name", ["../../x.tar", "sub/x.tar", "..", "/etc/x.tar"])
def test_an_index_that_names_a_file_outside_the_root_is_refused(tmp_path: Path, name: str) -> None:
    root = synthetic_shards(tmp_path / "d", "val", [3])
    index = _index(root)
    index["splits"]["val"]["filenames"] = [name]
    (root / "_info.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="not a file beside the index"):
        resolve_shards(str(root), "val")


@pytest.mark.parametrize(("override", "message"), [
    ("data.root= ", "data.root='' is invalid: use the shards root"),
    ("data.root=", "data.root='' is invalid: use the shards root"),
    ("optim.min_lr=0.5", "optim.min_lr=0.5 is invalid: use a floor at most optim.lr=0.1 (the cosine schedule"),
    ("optim.warmup_lr=0.2", "optim.warmup_lr=0.2 is invalid: use a start at most optim.lr=0.1"),
    ("data.augment.auto_augment=rand-zz", "data.augment.auto_augment='rand-zz' is invalid: timm ignores the section "
                                          "'zz'"),
    ("data.augment.auto_augment=rand-m9-inc", "timm ignores the section 'inc'"),
])
def test_settings_that_were_accepted_silently_are_refused(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_config(apply_overrides(get_recipe("demo"), [override]))


@pytest.mark.parametrize("text", ["[1, 2]", "3", '"step"', "null"])
def test_a_completion_marker_that_is_not_an_object_is_a_resume_error(tmp_path: Path, text: str) -> None:
    step = tmp_path / "step000000005"
    step.mkdir()
    (step / MARKER).write_text(text)
    with pytest.raises(ResumeError, match="not the object gpd_ds writes"):
        Marker.read(step)


def test_a_taken_rendezvous_port_is_one_line_naming_master_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "launch/train.py", "--deepspeed_config", "ds_configs/zero2.json",
                                 "--run-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True,
                                env={**env(tmp_path), "MASTER_PORT": str(port)}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"the rendezvous port {port} on 127.0.0.1 is in use" in result.stderr
    assert "--master_port" in result.stderr
    assert "Traceback" not in result.stderr


def test_convert_weights_of_a_raw_pickle_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import pickle

    from gpd_ds.cli import main

    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"weights": [1, 2, 3]}, protocol=4))
    assert main(["convert-weights", str(raw), str(tmp_path / "out.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "it is not a file torch reads without running code" in err
    assert "weights_only=False" not in err  # torch's own advice would run the file's code


@pytest.mark.parametrize(("script", "args", "message"), [
    ("multinode_pdsh.sh", ["--hostfile", "/nonexistent/hostfile"], "multinode_pdsh.sh: error: hostfile "
                                                                   "'/nonexistent/hostfile' does not exist"),
    ("per_node.sh", ["--hostfile", "HOSTFILE", "--node-rank", "2"], "per_node.sh: error: --node-rank 2 is not in the "
                                                                    "hostfile's 2 node(s): use 0 .. 1"),
    ("per_node.sh", ["--hostfile", "HOSTFILE", "--node-rank", "-1"], "--node-rank '-1' is not a node index"),
])
def test_launch_script_mistakes_are_one_line(tmp_path: Path, script: str, args: list[str], message: str) -> None:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("127.0.0.1 slots=1\nlocalhost slots=1\n")
    args = [str(hostfile) if a == "HOSTFILE" else a for a in args]
    result = subprocess.run(["bash", str(REPO / "launch" / script), *args, "--run-dir", str(tmp_path / "run"),
                             "--dry-run"], env={**env(tmp_path), "PYTHON": sys.executable}, capture_output=True,
                            text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_the_model_card_of_a_short_run_says_what_ran() -> None:
    from gpd_ds.hub import _steps_trained

    record = {"config": {"optim": {"epochs": 100}, "run": {"max_steps": 6}}, "total_steps": 6200}
    assert _steps_trained(record, 6) == ("6 of the schedule's 6200 optimizer steps (100 epochs; stopped by "
                                         "run.max_steps=6)")
    assert _steps_trained({**record, "config": {**record["config"], "run": {"max_steps": None}}}, 40) == (
        "40 of the schedule's 6200 optimizer steps (100 epochs; the run ended early)")
    assert _steps_trained(record, 6200) == "100 epochs, 6200 optimizer steps"


def test_a_vit_image_size_its_patches_do_not_tile_names_the_patch_size() -> None:
    cfg = apply_overrides(get_recipe("deit_tiny_from_deit_small"), ["data.image_size=100", "data.root=/data"])
    with pytest.raises(ConfigError, match=r"data.image_size=100 is invalid: model.student='deit_tiny_patch16_224' cuts "
                                          r"images into 16x16 patches; use a multiple of 16, e.g. 96 or 112"):
        check_config(cfg)


@pytest.mark.slow
def test_a_killed_op_build_does_not_hang_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build of DeepSpeed's CPU op killed half-way (a SIGKILLed rank holding the build lock, its lock file left
    behind): a later run that builds the op (GPD_DS_CPU_SHM_OP=1; by default the op is not built on CPUs) goes on."""
    import subprocess
    import sys
    import time

    from gpd_ds.distributed import _build_lock
    from tests.integration.launch_helpers import overrides, single, workspace_with_data

    workspace_with_data(tmp_path)
    lock = _build_lock()
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import filelock, sys, time; filelock.FileLock(sys.argv[1])"
                               ".acquire(); print('held', flush=True); time.sleep(600)", str(lock)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()  # the build dies holding the lock
    holder.wait()
    assert lock.exists()
    args = overrides(tmp_path / "data", **{"model.static_teacher": "none", "run.max_steps": 2})
    start = time.monotonic()
    monkeypatch.setenv("GPD_DS_CPU_SHM_OP", "1")
    result = single(tmp_path, ["--run-dir", str(tmp_path / "run"), *args], timeout=240)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "shm_comm_op built successfully" in result.stdout + result.stderr  # the op was built (or loaded)
    assert time.monotonic() - start < 240
