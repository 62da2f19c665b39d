"""Feature distillation beyond ResNets, through the real launcher on 2 CPU ranks with activation checkpointing: a ViT
and a ConvNeXt student, each with ReviewKD and with FitNets' hints, under ZeRO-2 and ZeRO-3 (the static teacher a
small timm ResNet, so the connectors also cross families and grids). Two of them stop half-way and resume bitwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpd_ds.export import run_weights
from tests.integration.launch_helpers import check, fp32_config, launch, overrides, train_losses, workspace_with_data

STUDENTS = {"vit": {"model.student": "deit_tiny_patch16_224", "model.student_kwargs": '{"depth": 2, "patch_size": 8}'},
            "convnext": {"model.student": "convnext_atto"}}
CASES = [("vit", "reviewkd", 3), ("vit", "fitnet", 2), ("convnext", "reviewkd", 2), ("convnext", "fitnet", 3)]
STEPS = 4


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("feature_any"))


def _launch(tmp: Path, run: Path, student: str, loss: str, stage: int, steps: int) -> None:
    args = ["--run-dir", str(run), *overrides(tmp / "data", **{
        **STUDENTS[student], "model.static_teacher_checkpoint": tmp / "teacher.safetensors",
        "loss.kd": f"dkd+{loss}", "loss.reviewkd_mid_channels": 16, "run.activation_checkpointing": True,
        "run.max_steps": steps, "run.checkpoint_every_steps": STEPS // 2})]
    check(launch(tmp, 2, args, ds_config=fp32_config(tmp, stage)))


def _full(tmp: Path, student: str, loss: str, stage: int) -> Path:
    run = tmp / f"{student}-{loss}-zero{stage}"
    if not (run / "checkpoints").is_dir():
        _launch(tmp, run, student, loss, stage, STEPS)
    return run


@pytest.mark.slow
@pytest.mark.parametrize(("student", "loss", "stage"), CASES)
def test_feature_kd_trains_both_modes_with_checkpointed_activations(workspace: Path, student: str, loss: str,
                                                                    stage: int) -> None:
    run = _full(workspace, student, loss, stage)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    for who in ("student", "dynamic_teacher"):
        assert all(r[f"train/{loss}_static_to_{who}"] > 0 for r in train)
    weights, _ = run_weights(run, "last")
    assert any(k.startswith("connectors.teacher.") for k in weights)
    assert all(torch.isfinite(v).all() for v in weights.values())


@pytest.mark.slow
@pytest.mark.parametrize(("student", "loss", "stage"), [CASES[0], CASES[2]])
def test_feature_kd_resumes_bitwise(workspace: Path, student: str, loss: str, stage: int) -> None:
    """Stop at step 2, resume to 4: the losses and every tensor (connectors included) equal the uninterrupted run."""
    full = _full(workspace, student, loss, stage)
    part = workspace / f"{student}-{loss}-zero{stage}-part"
    _launch(workspace, part, student, loss, stage, STEPS // 2)
    _launch(workspace, part, student, loss, stage, STEPS)
    assert train_losses(part) == train_losses(full)
    last_full, _ = run_weights(full, "last")
    last_part, _ = run_weights(part, "last")
    assert last_part.keys() == last_full.keys()
    for k in last_full:
        torch.testing.assert_close(last_part[k], last_full[k], rtol=0, atol=0, msg=k)
