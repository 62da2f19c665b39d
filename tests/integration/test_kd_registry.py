"""A KD loss of the user's own: one function and one registration, here in this test file. The training process
imports a two-line plugin file that makes the registration (``--plugin``, as a user names their own file) and trains
with ``--set loss.kd=l2_logits``. The registration is undone after each test: other tests list the registered names.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor

from gpd_ds.config import ConfigError, apply_overrides
from gpd_ds.losses import GPDLoss
from gpd_ds.recipes import get_recipe
from gpd_ds.registry import KD_LOSSES
from gpd_ds.train_cli import build_parser
from tests.integration.launch_helpers import check, overrides, single, workspace_with_data


def l2_logits(logits: Tensor, static_logits: Tensor, target: Tensor, params: GPDLoss) -> Tensor:
    """Logit matching (Ba & Caruana, 2014): the mean squared difference of the logits."""
    return (logits.float() - static_logits.detach().float()).pow(2).mean()


def register() -> None:
    """What a user's module does when it is imported."""
    KD_LOSSES.register("l2_logits")(l2_logits)


@pytest.fixture
def registered() -> Iterator[None]:
    register()
    yield
    KD_LOSSES.remove("l2_logits")


@pytest.mark.usefixtures("registered")
def test_the_registered_loss_is_the_static_term_of_gpd_loss() -> None:
    torch.manual_seed(0)
    s, t, z, y = torch.randn(4, 10), torch.randn(4, 10), torch.randn(4, 10), torch.tensor([0, 1, 2, 3])
    loss = GPDLoss.from_config(apply_overrides(get_recipe("demo"), ["loss.kd=l2_logits"]).loss)(s, t, y, z)
    torch.testing.assert_close(loss.terms["kd_static_to_student"], (s - z).pow(2).mean())
    torch.testing.assert_close(loss.terms["kd_static_to_dynamic_teacher"], (t - z).pow(2).mean())


@pytest.mark.usefixtures("registered")
def test_validation_and_help_learn_the_name_from_the_registry() -> None:
    for kd in ("l2_logits", "l2_logits+reviewkd"):
        apply_overrides(get_recipe("demo"), [f"loss.kd={kd}"]).validate()
    with pytest.raises(ConfigError, match=r"loss.kd='l2_logit' is invalid: use one of dkd, kl, dist, l2_logits, "
                                          r"reviewkd"):
        apply_overrides(get_recipe("demo"), ["loss.kd=l2_logit"]).validate()
    assert "l2_logits+reviewkd" in build_parser().format_help()
    with pytest.raises(ValueError, match="already registered"):
        KD_LOSSES.register("l2_logits")(lambda *a: None)
    with pytest.raises(ValueError, match="built-in"):
        KD_LOSSES.register("dkd")(l2_logits)


@pytest.mark.slow
def test_a_run_trains_two_steps_with_a_registered_loss(tmp_path: Path) -> None:
    workspace_with_data(tmp_path)
    plugin = tmp_path / "my_losses.py"
    plugin.write_text("from tests.integration.test_kd_registry import register\n\nregister()\n")
    run = tmp_path / "run"
    args = overrides(tmp_path / "data", **{"model.static_teacher_checkpoint": tmp_path / "teacher.safetensors",
                                           "loss.kd": "l2_logits", "run.max_steps": 2, "run.eval_at_start": False})
    check(single(tmp_path, ["--plugin", str(plugin), "--run-dir", str(run), *args]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for r in train:
        kd = r["train/kd_static_to_student"] + r["train/kd_static_to_dynamic_teacher"]
        total = (r["train/ce_student"] + r["train/ce_dynamic_teacher"] + kd + 3.0 * r["train/sce_dynamic_to_student"])
        assert kd > 0
        assert r["train/loss"] == pytest.approx(total, rel=1e-5)
    config = json.loads((run / "config.json").read_text())["config"]
    assert config["loss"]["kd"] == "l2_logits"


def test_a_plugin_that_cannot_be_imported_is_a_clear_error(capsys: pytest.CaptureFixture) -> None:
    from gpd_ds.train_cli import main

    assert main(["--plugin", "no_such_module_xyz", "--print-config"]) == 2
    assert "--plugin 'no_such_module_xyz' cannot be imported" in capsys.readouterr().err
    assert main(["--plugin", "missing_file.py", "--print-config"]) == 2
    assert "--plugin 'missing_file.py' cannot be imported (no file missing_file.py)" in capsys.readouterr().err


def test_a_recipe_registered_here_is_listed_and_built() -> None:
    from gpd_ds.recipes import RECIPES, describe, get_recipe, recipe

    @recipe("(b) from scratch", "-")
    def tiny_scratch_for_test():
        cfg = get_recipe("demo")
        cfg.recipe, cfg.model.static_teacher = "tiny_scratch_for_test", None
        return cfg

    try:
        assert get_recipe("tiny_scratch_for_test").scenario == "scratch"
        assert [r["scenario"] for r in describe() if r["recipe"] == "tiny_scratch_for_test"] == ["(b) from scratch"]
        assert "tiny_scratch_for_test" in build_parser().format_help()
    finally:
        RECIPES.remove("tiny_scratch_for_test")
    assert "tiny_scratch_for_test" not in build_parser().format_help()
