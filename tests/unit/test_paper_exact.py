"""What the reference's code computes where it differs from its paper, as switches the paper recipes turn on: ResNet
stage features read after their last ReLU (the reference's in-place ReLU overwrites the pre-ReLU output), ResNet
students whose last BatchNorm gammas start at 1 (timm starts them at 0), and a float32 ds_config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpd_ds.config import ConfigError, apply_overrides
from gpd_ds.features import feature_taps
from gpd_ds.gpd.taps import recording
from gpd_ds.models import create_model
from gpd_ds.models.build import build_student
from gpd_ds.recipes import get_recipe
from gpd_ds.train_cli import main as train_main

REPO = Path(__file__).resolve().parents[2]
PAPER = ("resnet18_from_resnet34", "resnet18_from_resnet34_reviewkd", "resnet18_scratch", "resnet18_finetune")


@pytest.mark.parametrize("name", ["resnet18", "resnet34", "resnet50"])
def test_post_relu_taps_are_relu_of_the_pre_relu_taps(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, zero_init_last=False).eval()  # (at 0 the stage output is >= 0)
    pre, post = feature_taps(model, name), feature_taps(model, name, post_relu=True)
    assert [t.path for t in pre] == [t.path for t in post]
    assert [t.where for t in pre[:4]] == ["input"] * 4
    assert [t.where for t in post[:4]] == ["output"] * 4
    with torch.no_grad(), recording(model, pre) as a:
        model(_x())
    with torch.no_grad(), recording(model, post) as b:
        model(_x())
    for level in range(4):
        assert (a["student"][level] < 0).any()  # before the ReLU: negative values
        torch.testing.assert_close(b["student"][level], torch.relu(a["student"][level]), rtol=0, atol=0)
    torch.testing.assert_close(b["student"][4], a["student"][4], rtol=0, atol=0)  # the pooled feature: the same


def _x() -> torch.Tensor:
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("recipe", PAPER)
def test_the_paper_recipes_start_the_last_batchnorm_at_one(recipe: str, capsys) -> None:
    assert train_main(["--recipe", recipe, "--print-config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["zero_init_last"] is False
    if "reviewkd" in recipe:
        assert printed["loss"]["reviewkd_post_relu"] is True
    cfg = get_recipe(recipe)
    student = build_student(cfg, num_classes=10)
    gammas = [b.bn2.weight for b in student.modules() if type(b).__name__ == "BasicBlock"]
    assert len(gammas) == 8
    assert all(torch.equal(g, torch.ones_like(g)) for g in gammas)  # the reference's init
    default = build_student(apply_overrides(get_recipe(recipe), ["model.zero_init_last=none"]), num_classes=10)
    assert all(not b.bn2.weight.any() for b in default.modules() if type(b).__name__ == "BasicBlock")  # timm's


def test_zero_init_last_on_a_student_without_it_is_a_clear_error() -> None:
    cfg = apply_overrides(get_recipe("demo"), ["model.student=mobilenetv1_relu", "model.zero_init_last=false"])
    with pytest.raises(ConfigError, match=r"model\.zero_init_last=False is invalid: mobilenetv1_relu.s builder has no "
                                          "zero_init_last"):
        build_student(cfg, num_classes=10)


def test_the_fp32_ds_config_is_zero2_without_autocast() -> None:
    zero2 = json.loads((REPO / "ds_configs/zero2.json").read_text())
    fp32 = json.loads((REPO / "ds_configs/zero2_fp32.json").read_text())
    assert fp32["torch_autocast"] == {"enabled": False}
    assert {k: v for k, v in fp32.items() if k not in ("_comment", "torch_autocast")} == {
        k: v for k, v in zero2.items() if k not in ("_comment", "torch_autocast")}
