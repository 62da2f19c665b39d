"""ReviewKD + GPD through the real launcher on 2 CPU ranks: ZeRO-2 and ZeRO-3 take the same steps, a ZeRO-3 resume
is bitwise, export drops the connectors (GPD and plain), and the two ReviewKD recipes run on tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from gpd_ds.export import export_run, rebuild, run_record, run_weights
from gpd_ds.models import create_model
from tests.integration.launch_helpers import (
    NUM_CLASSES,
    check,
    fp32_config,
    launch,
    overrides,
    teacher_file,
    train_losses,
    workspace_with_data,
)

REVIEWKD = {"loss.kd": "dkd+reviewkd", "loss.reviewkd_mid_channels": 32, "run.max_steps": 8,
            "run.checkpoint_every_steps": 4}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("reviewkd"))


def _args(tmp: Path, run: Path, **extra: object) -> list[str]:
    return ["--run-dir", str(run), *overrides(tmp / "data", **{
        "model.static_teacher_checkpoint": tmp / "teacher.safetensors", **REVIEWKD, **extra})]


def _run(tmp: Path, name: str, stage: int, **extra: object) -> Path:
    run = tmp / name
    if not (run / "checkpoints").is_dir():
        check(launch(tmp, 2, _args(tmp, run, **extra), ds_config=fp32_config(tmp, stage)))
    return run


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero2_and_zero3_take_the_same_reviewkd_steps(workspace: Path) -> None:
    z2, z3 = _run(workspace, "zero2", 2), _run(workspace, "zero3", 3)
    l2, l3 = train_losses(z2), train_losses(z3)
    assert [s for s, _ in l2] == [s for s, _ in l3] == list(range(1, 9))
    # the same computation; the GPD replicas amplify reduction-order rounding later on (see test_zero3.py)
    torch.testing.assert_close(torch.tensor([v for _, v in l3][:6]), torch.tensor([v for _, v in l2][:6]),
                               rtol=1e-5, atol=1e-5)
    train = [r for r in _rows(z3) if "train/loss" in r]
    terms = {"train/reviewkd_static_to_student", "train/reviewkd_static_to_dynamic_teacher",
             "train/kd_static_to_student", "train/kd_static_to_dynamic_teacher"}
    assert terms <= train[0].keys()
    assert all(r["train/reviewkd_static_to_student"] > 0 for r in train)


@pytest.mark.slow
def test_zero3_reviewkd_resume_is_bitwise(workspace: Path) -> None:
    """The connectors are partitioned, checkpointed and resumed with the model: stop at step 4, resume to 8."""
    full = _run(workspace, "zero3", 3)
    part = workspace / "zero3-part"
    check(launch(workspace, 2, _args(workspace, part, **{"run.max_steps": 4}), ds_config=fp32_config(workspace, 3)))
    check(launch(workspace, 2, _args(workspace, part), ds_config=fp32_config(workspace, 3)))
    assert train_losses(part) == train_losses(full)
    last_full, _ = run_weights(full, "last")
    last_part, _ = run_weights(part, "last")
    assert any(k.startswith("connectors.teacher.") for k in last_full)
    for k in last_full:
        torch.testing.assert_close(last_part[k], last_full[k], rtol=0, atol=0, msg=k)


@pytest.mark.slow
def test_export_drops_the_connectors_and_loads_strictly(workspace: Path) -> None:
    run = _run(workspace, "zero2", 2)
    out = export_run(run, workspace / "export" / "student.safetensors", which="last")
    state = load_file(str(out))
    assert not any("connectors" in k for k in state)
    plain = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    plain.load_state_dict(state, strict=True)
    _, gpd = rebuild(run_record(run))
    gpd.load_state_dict(run_weights(run, "last")[0], strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), gpd.eval()(x, mode="student"), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_plain_reviewkd_baseline_trains_and_exports(workspace: Path) -> None:
    run = workspace / "plain"
    check(launch(workspace, 1, _args(workspace, run, **{"model.method": "plain", "loss.kd": "reviewkd",
                                                         "run.max_steps": 4})))
    train = [r for r in _rows(run) if "train/loss" in r]
    assert {"train/ce_student", "train/reviewkd_static_to_student"} <= train[0].keys()
    assert "train/reviewkd_static_to_dynamic_teacher" not in train[0]
    assert "train/kd_static_to_student" not in train[0]
    out = export_run(run, workspace / "plain.safetensors", which="last")
    timm.create_model("test_resnet", num_classes=NUM_CLASSES).load_state_dict(load_file(str(out)), strict=True)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "student", "teacher"), [
    ("resnet18_from_resnet34_reviewkd", "resnet18", "resnet34"),
    ("mobilenet_from_resnet50_reviewkd", "mobilenetv1_relu", "resnet50"),
])
def test_reviewkd_recipes_run_on_tiny_sizes(workspace: Path, recipe: str, student: str, teacher: str) -> None:
    """The recipe as shipped (multi-branch dynamic teacher, train-mode static teacher, its ABF width), shrunk to 32 px
    and 3 steps on the small demo data, with a random teacher of the recipe's architecture from a local file."""
    weights = teacher_file(workspace / f"{teacher}.safetensors", teacher)
    run = workspace / recipe
    sets = {"data.root": workspace / "data", "data.image_size": 32, "data.workers": 0, "data.eval_batch_size": 20,
            "optim.global_batch_size": 16, "run.max_steps": 3, "run.log_every_steps": 1, "run.export_at_end": False,
            "model.static_teacher_checkpoint": weights}
    args = ["--recipe", recipe, "--run-dir", str(run)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    check(launch(workspace, 2, args))
    record = json.loads((run / "config.json").read_text())["config"]
    assert record["model"]["student"] == student
    assert record["model"]["static_teacher_train_mode"] is True
    assert record["loss"]["kd"] == "reviewkd"
    train = [r for r in _rows(run) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"train/reviewkd_static_to_student", "train/reviewkd_static_to_dynamic_teacher"} <= train[0].keys()
    export = export_run(run, workspace / f"{recipe}.safetensors", which="last")
    timm.create_model(student, num_classes=NUM_CLASSES).load_state_dict(load_file(str(export)), strict=True)


@pytest.mark.slow
def test_vit_feature_recipe_runs_on_tiny_sizes(workspace: Path) -> None:
    """deit_tiny_from_deit_small_fitnet as shipped (DeiT augmentation, repeated augmentation, AdamW), shrunk to
    32 px and 3 steps, with a random DeiT-S teacher of that size from a local file."""
    torch.manual_seed(0)
    weights = workspace / "deit_small_32.safetensors"
    save_file(create_model("deit_small_patch16_224", num_classes=NUM_CLASSES, image_size=32).state_dict(),
              str(weights))
    recipe, run = "deit_tiny_from_deit_small_fitnet", workspace / "deit_fitnet"
    sets = {"data.root": workspace / "data", "data.image_size": 32, "data.workers": 0, "data.eval_batch_size": 20,
            "optim.global_batch_size": 16, "run.max_steps": 3, "run.log_every_steps": 1, "run.export_at_end": False,
            "model.static_teacher_checkpoint": weights}
    args = ["--recipe", recipe, "--run-dir", str(run)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    check(launch(workspace, 2, args))
    record = json.loads((run / "config.json").read_text())["config"]
    assert (record["model"]["student"], record["loss"]["kd"]) == ("deit_tiny_patch16_224", "dkd+fitnet")
    train = [r for r in _rows(run) if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    assert {"train/fitnet_static_to_student", "train/fitnet_static_to_dynamic_teacher"} <= train[0].keys()
