"""Elastic resume keeps the optimizer: a checkpoint written by 2 ranks resumes on 1 and one written by 1 resumes
on 2 (ZeRO-1, 2 and 3, SGD momentum and AdamW moments), and every parameter's fp32 master weight and optimizer
tensors after the resume equal the checkpoint's, tensor by tensor, bitwise: as DeepSpeed itself assembles them
from the partitions (safe_get_full_fp32_param / safe_get_full_optimizer_state), before and after."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.integration.launch_helpers import REPO, check, env, free_port

PROBE = Path(__file__).with_name("reshard_probe.py")


def _probe(tmp: Path, ranks: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port",
           str(free_port()), str(PROBE), *args]
    return subprocess.run(cmd, cwd=REPO, env={**env(tmp), "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "before", "after", "optimizer"),
                         [(1, 2, 1, "sgd"), (2, 2, 1, "sgd"), (2, 1, 2, "adamw"), (3, 2, 1, "adamw"), (3, 1, 2, "sgd")])
def test_optimizer_state_survives_a_change_of_ranks(tmp_path: Path, stage: int, before: int, after: int,
                                                    optimizer: str) -> None:
    root = tmp_path / "checkpoints"
    common = ["--stage", str(stage), "--optimizer", optimizer]
    check(_probe(tmp_path, before, "save", str(root), *common))
    result = _probe(tmp_path, after, "resume", str(root), *common)
    check(result)
    saved = torch.load(root / f"save_{before}.pt")
    resumed = torch.load(root / f"resume_{after}.pt")
    assert saved.keys() == resumed.keys()
    assert any(k.endswith(("momentum_buffer", "exp_avg_sq")) for k in saved)
    for key, value in saved.items():
        assert value.abs().sum() > 0 or key.endswith("bias/momentum_buffer"), key  # trained, not a fresh zero
        assert torch.equal(resumed[key], value), key
