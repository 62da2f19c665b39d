"""Run the real `deepspeed` launcher (and plain `python launch/train.py`) on the CPU for the training tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from gpd_ds.data.demo import demo_dataset
from gpd_ds.models import create_model

REPO = Path(__file__).resolve().parents[2]
NUM_CLASSES = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(tmp: Path) -> dict[str, str]:
    return {**os.environ, "GPD_DS_CACHE": str(tmp / "cache"), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def deepspeed_cmd(ranks: int, args: list[str], ds_config: str = "ds_configs/zero2.json") -> list[str]:
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
            str(free_port()), "launch/train.py", "--deepspeed_config", ds_config, *args]


def launch(tmp: Path, ranks: int, args: list[str], ds_config: str = "ds_configs/zero2.json",
           timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(deepspeed_cmd(ranks, args, ds_config), cwd=REPO, env=env(tmp), capture_output=True,
                          text=True, timeout=timeout)


def single(tmp: Path, args: list[str], ds_config: str = "ds_configs/zero2.json",
           timeout: int = 300) -> subprocess.CompletedProcess:
    """`python launch/train.py` without the launcher: a job of one process."""
    cmd = [sys.executable, "launch/train.py", "--deepspeed_config", ds_config, *args]
    return subprocess.run(cmd, cwd=REPO, env=env(tmp), capture_output=True, text=True, timeout=timeout)


def fp32_config(tmp: Path, stage: int) -> str:
    """The shipped ``ds_configs/zero{stage}.json`` in float32. For tests that compare two engines (ZeRO stages,
    activation checkpointing): whether they compute the same is a float32 question; in bf16 (this CPU's default)
    the same sums rounded in another order to 8 bits differ by ~1e-3 at once, and the dynamic teacher's replicas
    amplify it from there."""
    ds = json.loads((REPO / f"ds_configs/zero{stage}.json").read_text())
    ds["torch_autocast"] = {"enabled": False}
    path = tmp / f"zero{stage}_fp32.json"
    path.write_text(json.dumps(ds))
    return str(path)


def small_data(root: Path) -> Path:
    """160 train / 40 val images of the demo shapes at 32 px, 16 shards."""
    return demo_dataset(root, train_per_class=16, val_per_class=4, size=32, shard_size=10, seed=3)


def teacher_file(path: Path, name: str = "test_resnet", seed: int = 0) -> Path:
    torch.manual_seed(seed)
    save_file(create_model(name, num_classes=NUM_CLASSES).state_dict(), str(path))
    return path


def workspace_with_data(tmp: Path) -> Path:
    """``tmp`` with the small dataset under data/ and a random static teacher in teacher.safetensors."""
    small_data(tmp / "data")
    teacher_file(tmp / "teacher.safetensors")
    return tmp


def overrides(data: Path, **extra: object) -> list[str]:
    """A tiny, fast, deterministic run of the demo recipe on ``data``."""
    values = {"data.root": data, "data.workers": 0, "data.eval_batch_size": 20, "optim.global_batch_size": 16,
              "optim.lr_ref_batch": 16, "optim.lr": 0.05, "optim.epochs": 2, "optim.warmup_epochs": 0,
              "optim.ema_decay": 0.9, "run.log_every_steps": 1, "run.checkpoint_every_steps": 5,
              "run.deterministic": True, "run.export_at_end": False, "model.student": "test_resnet",
              "model.static_teacher": "test_resnet", **extra}
    out = []
    for key, value in values.items():
        out += ["--set", f"{key}={value}"]
    return out


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def assert_quiet_ranks(result: subprocess.CompletedProcess) -> None:
    """A 2-rank job's output: DeepSpeed's accelerator warning only from its two launcher processes (not from the
    ranks), no deprecation notice, the CPU communication op's build notes from rank 0 only."""
    out = result.stdout + result.stderr
    assert out.count("Setting accelerator to CPU") <= 2, out[-3000:]
    assert "all_gather_into_tensor` is deprecated" not in out
    assert out.count("No CUDA runtime is found") <= 1, out[-3000:]
    assert out.count("shm_comm_op built successfully") <= 1, out[-3000:]


def check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
