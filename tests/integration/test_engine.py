"""The DeepSpeed engine set-up of gpd_ds.engine: ds_config defaults and ZeRO-0 gradient clipping (real engine)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from gpd_ds.engine import ds_defaults
from tests.integration.launch_helpers import REPO, env

# One process, the real engine on the CPU: gpd_ds's ZeRO-0 clip must update the weights exactly as DeepSpeed's own
# clip (applied to a copy of the same gradients) followed by the same SGD step, and report the unclipped norm.
CLIP_SCRIPT = """
import copy
import torch
from deepspeed.runtime.utils import clip_grad_norm_
from gpd_ds import distributed
from gpd_ds.engine import ds_defaults, initialize

distributed.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
reference = copy.deepcopy(model)
ds = ds_defaults({"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "gradient_clipping": 0.5,
                  "zero_optimization": {"stage": 0}})
engine = initialize(model, torch.optim.SGD(model.parameters(), lr=0.1), None, ds, world_size=1)
assert "clip_fp32_gradients" in vars(engine), "gpd_ds's clip is not installed"
x, y = torch.randn(8, 16) * 10, torch.randint(0, 4, (8,))
engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
engine.step()

torch.nn.functional.cross_entropy(reference(x), y).backward()
norm = clip_grad_norm_(list(reference.parameters()), 0.5)
with torch.no_grad():
    for p in reference.parameters():
        p -= 0.1 * p.grad
assert float(norm) > 1.0, f"the test gradients must be clipped (norm {float(norm)})"
torch.testing.assert_close(float(engine.get_global_grad_norm()), float(norm), rtol=1e-5, atol=0)
for a, b in zip(engine.module.parameters(), reference.parameters(), strict=True):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
print("clip ok", float(norm))
"""


def test_ds_defaults_turn_off_the_syncing_throughput_timer_but_keep_an_explicit_one() -> None:
    assert ds_defaults({})["timers"] == {"throughput": {"enabled": False}}
    mine = {"throughput": {"enabled": True, "synchronized": False}}
    assert ds_defaults({"timers": mine})["timers"] == mine


def test_zero0_clipping_matches_deepspeeds_clip(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", CLIP_SCRIPT], cwd=REPO, env=env(tmp_path), capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "clip ok" in result.stdout


def test_shipped_zero_configs_cap_the_gradient_bucket() -> None:
    """DeepSpeed's default reduce_bucket_size (5e8 elements) makes every ZeRO-1/2/3 rank allocate a 2 GB fp32
    gradient bucket (bench/memory.py: a ResNet34->ResNet18 GPD step peaked 1.4 GB higher with it)."""
    configs = sorted((REPO / "ds_configs").glob("*.json"))
    assert len(configs) >= 8
    for path in configs:
        zero = json.loads(path.read_text())["zero_optimization"]
        if zero["stage"] >= 1:
            assert zero.get("reduce_bucket_size", 5e8) <= 5e7, f"{path.name}: set reduce_bucket_size to 5e7"


# --- precision on a CPU: bf16 autocast where the CPU has native bf16, float32 elsewhere -----------------------------

def _cpu_resolved(monkeypatch, ds: dict, native: bool) -> dict:
    from gpd_ds import engine
    monkeypatch.setattr(engine, "cpu_has_native_bf16", lambda *a, **k: native)
    engine._cpu_precision(ds)
    return ds


@pytest.mark.parametrize("ds", [
    {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
    {"torch_autocast": {"enabled": True}},  # DeepSpeed's default dtype is bfloat16
    {"bf16": {"enabled": True}},
    {"bf16": {"enabled": True}, "torch_autocast": {"enabled": False}},
])
def test_a_bf16_request_stays_bf16_autocast_on_a_cpu_with_native_bf16(monkeypatch, caplog, ds: dict) -> None:
    with caplog.at_level(logging.INFO, logger="gpd_ds.engine"):
        out = _cpu_resolved(monkeypatch, ds, native=True)
    assert out["torch_autocast"]["enabled"] is True
    assert out["torch_autocast"]["dtype"] == "bfloat16"
    assert "bf16" not in out
    assert "fp16" not in out
    assert "bf16 autocast on the CPU" in caplog.text


def test_a_bf16_request_runs_float32_on_a_cpu_without_native_bf16_and_says_so(monkeypatch, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="gpd_ds.engine"):
        out = _cpu_resolved(monkeypatch, {"torch_autocast": {"enabled": True, "dtype": "bfloat16"}}, native=False)
    assert out["torch_autocast"] == {"enabled": False}
    assert "no native bfloat16" in caplog.text


@pytest.mark.parametrize("ds", [{"torch_autocast": {"enabled": True, "dtype": "float16"}}, {"fp16": {"enabled": True}}])
def test_a_float16_request_runs_float32_on_any_cpu(monkeypatch, caplog, ds: dict) -> None:
    with caplog.at_level(logging.INFO, logger="gpd_ds.engine"):
        out = _cpu_resolved(monkeypatch, ds, native=True)
    assert out["torch_autocast"] == {"enabled": False}
    assert "fp16" not in out
    assert "float16 is for V100" in caplog.text


def test_float32_stays_float32_silently(monkeypatch, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="gpd_ds.engine"):
        out = _cpu_resolved(monkeypatch, {"torch_autocast": {"enabled": False}}, native=True)
    assert out["torch_autocast"] == {"enabled": False}
    assert caplog.text == ""


def test_a_bf16_request_keeps_its_other_autocast_keys(monkeypatch) -> None:
    block = {"enabled": True, "dtype": "bf16", "lower_precision_safe_modules": ["torch.nn.Linear"]}
    out = _cpu_resolved(monkeypatch, {"torch_autocast": block}, native=True)
    assert out["torch_autocast"] == {"enabled": True, "dtype": "bfloat16",
                                     "lower_precision_safe_modules": ["torch.nn.Linear"]}


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu vme avx512f avx512_bf16 avx512vl", True), ("fpu amx_bf16 amx_tile", True),
    ("fpu avx512f avx512vl avx2", False), ("fpu avx512_bf16x", False)])
def test_native_bf16_is_read_off_the_cpu_flags(tmp_path: Path, flags: str, native: bool) -> None:
    from gpd_ds.engine import cpu_has_native_bf16
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
    assert cpu_has_native_bf16(cpuinfo) is native
    assert cpu_has_native_bf16(tmp_path / "missing") is False  # no /proc: the safe answer
