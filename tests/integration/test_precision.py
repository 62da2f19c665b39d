"""Precision on a CPU: the shipped configs' bf16 request trains in bf16 autocast where the CPU has native bf16
(gpd_ds.engine.cpu_has_native_bf16), and its losses stay close to float32's (real launcher, real engine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpd_ds.engine import cpu_has_native_bf16
from tests.integration.launch_helpers import check, fp32_config, overrides, single, train_losses, workspace_with_data

pytestmark = pytest.mark.skipif(not cpu_has_native_bf16(), reason="this CPU has no native bf16: every run is fp32")

# bf16 keeps 8 significant bits (relative rounding 2**-9 = 2e-3 per value). The first step's loss comes from the
# same weights and batch, so only rounding separates the two: it must agree within 1e-2. Later steps follow
# weights that drifted apart through the rounding (a few percent at single steps, measured): over the run the mean
# loss agrees within 3e-2 and both runs learn.
FIRST_STEP_RTOL, MEAN_RTOL = 1e-2, 3e-2


@pytest.mark.parametrize("scenario", ["gpd", "plain"])
def test_bf16_losses_stay_close_to_fp32(tmp_path: Path, scenario: str) -> None:
    workspace_with_data(tmp_path)
    args = overrides(tmp_path / "data", **{"model.static_teacher_checkpoint": tmp_path / "teacher.safetensors",
                                           "model.method": scenario, "optim.epochs": 3})
    losses, resolved = {}, {}
    for name, ds_config in (("bf16", "ds_configs/zero2.json"), ("fp32", fp32_config(tmp_path, 2))):
        run = tmp_path / name
        check(single(tmp_path, ["--run-dir", str(run), *args], ds_config=ds_config))
        losses[name] = torch.tensor([loss for _, loss in train_losses(run)])
        resolved[name] = json.loads((run / "config.json").read_text())["ds_config"]["torch_autocast"]
    assert resolved["bf16"] == {"enabled": True, "dtype": "bfloat16"}
    assert resolved["fp32"] == {"enabled": False}
    bf16, fp32 = losses["bf16"], losses["fp32"]
    assert len(bf16) == len(fp32) == 30
    assert not torch.equal(bf16, fp32), "the bf16 run computed in float32"
    print(f"{scenario}: first-step relative difference {float((bf16[0] - fp32[0]).abs() / fp32[0]):.2e}, mean "
          f"{float((bf16.mean() - fp32.mean()).abs() / fp32.mean()):.2e}, largest single step "
          f"{float(((bf16 - fp32).abs() / fp32).max()):.2e}")
    torch.testing.assert_close(bf16[0], fp32[0], rtol=FIRST_STEP_RTOL, atol=0)
    torch.testing.assert_close(bf16.mean(), fp32.mean(), rtol=MEAN_RTOL, atol=0)
    for run in (bf16, fp32):
        assert run[-10:].mean() < run[:10].mean(), run
