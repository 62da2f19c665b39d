"""run.compile: true/false obeyed; auto on only where BENCHMARKS.md verified it (family, ZeRO stage, on CUDA), off
elsewhere with the reason; the config takes true, false and auto and nothing else."""

from __future__ import annotations

import pytest
import torch

from gpd_ds.config import ConfigError, TrainConfig, apply_overrides
from gpd_ds.train.compile_policy import VERIFIED, compile_decision, family

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(("student", "stage", "on"), [
    ("deit_tiny_patch16_224", 0, True), ("vit_small_patch16_224.augreg_in21k", 0, True), ("resnet18", 0, True),
    ("deit_tiny_patch16_224", 2, False), ("resnet18", 3, False), ("mobilenetv2_100", 0, False),
    ("rvt_tiny", 0, False), ("convnext_atto", 0, False),
])
def test_auto_compiles_only_the_verified_family_and_stage_on_cuda(student: str, stage: int, on: bool) -> None:
    decision, why = compile_decision("auto", student, CUDA, stage)
    assert decision is on
    if on:
        assert why == f"run.compile=auto: on ({VERIFIED[(family(student), stage)]})"
    else:
        assert f"not verified for {student} at ZeRO-{stage}" in why
        assert "set run.compile=true to try it" in why


def test_auto_is_off_on_a_cpu_and_true_false_are_obeyed() -> None:
    decision, why = compile_decision("auto", "resnet18", CPU, 0)
    assert decision is False
    assert why.startswith("run.compile=auto: off on a cpu device (no gain measured on a CPU")
    assert compile_decision(True, "mobilenetv2_100", CPU, 2) == (True, "run.compile=true")
    assert compile_decision(False, "deit_tiny_patch16_224", CUDA, 0) == (False, "run.compile=false")


@pytest.mark.parametrize(("text", "value"), [("true", True), ("on", True), ("false", False), ("0", False),
                                             ("auto", "auto")])
def test_the_setting_parses_true_false_and_auto(text: str, value: bool | str) -> None:
    cfg = apply_overrides(TrainConfig(), [f"run.compile={text}"]).validate()
    assert cfg.run.compile == value
    assert TrainConfig().run.compile == "auto"


def test_any_other_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"run.compile='sometimes' is invalid: use true, false or auto"):
        apply_overrides(TrainConfig(), ["run.compile=sometimes"]).validate()
