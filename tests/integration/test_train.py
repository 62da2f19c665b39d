"""Training through the real `deepspeed` launcher and engine on the CPU (1 and 2 ranks)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

from gpd_ds.cli import main as cli_main
from gpd_ds.export import rebuild, run_record, run_weights
from gpd_ds.train_cli import main as train_main
from tests.integration.launch_helpers import (
    NUM_CLASSES,
    REPO,
    assert_quiet_ranks,
    check,
    deepspeed_cmd,
    env,
    fp32_config,
    launch,
    overrides,
    single,
    teacher_file,
    train_losses,
    workspace_with_data,
)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("train"))


def _scratch(tmp: Path, **extra: object) -> list[str]:
    return overrides(tmp / "data", **{"model.static_teacher": "none", **extra})


def _distill(tmp: Path, **extra: object) -> list[str]:
    return overrides(tmp / "data", **{"model.static_teacher_checkpoint": tmp / "teacher.safetensors", **extra})


@pytest.mark.slow
def test_zero1_and_zero2_two_ranks_agree_and_learn(workspace: Path) -> None:
    args = _scratch(workspace, **{"optim.epochs": 6, "optim.lr": 0.1, "data.augment.scale": "0.8,1.0"})
    losses = {}
    for stage in (1, 2):
        run = workspace / f"zero{stage}"
        result = launch(workspace, 2, ["--run-dir", str(run), *args], ds_config=fp32_config(workspace, stage))
        check(result)
        assert_quiet_ranks(result)
        losses[stage] = [loss for _, loss in train_losses(run)]
        assert json.loads((run / "config.json").read_text())["ds_config"]["zero_optimization"]["stage"] == stage
    assert len(losses[1]) == len(losses[2]) == 60
    torch.testing.assert_close(torch.tensor(losses[1]), torch.tensor(losses[2]), rtol=1e-5, atol=1e-5)
    first, last = sum(losses[2][:10]) / 10, sum(losses[2][-10:]) / 10
    assert last < first - 0.3, (first, last)


@pytest.mark.slow
def test_resume_mid_epoch_is_bitwise_identical_two_ranks(workspace: Path) -> None:
    """Distillation scenario, 2 ranks x 1 loader worker: stop at step 7 of 10 per epoch, resume, compare."""
    args = _distill(workspace, **{"data.workers": 1, "data.augment.mixup": 0.8, "data.augment.cutmix": 1.0})
    full, part = workspace / "full", workspace / "part"
    check(launch(workspace, 2, ["--run-dir", str(full), *args]))
    check(launch(workspace, 2, ["--run-dir", str(part), *args, "--set", "run.max_steps=7"]))
    assert [s for s, _ in train_losses(part)] == list(range(1, 8))
    check(launch(workspace, 2, ["--run-dir", str(part), *args, "--resume", "auto"]))
    expected, got = train_losses(full), train_losses(part)
    assert len(expected) == 20
    assert got == expected  # the same floats, step by step, across the restart


@pytest.mark.slow
def test_sigkill_during_training_resumes(workspace: Path) -> None:
    run = workspace / "killed"
    args = ["--run-dir", str(run), *_scratch(workspace, **{"optim.epochs": 6, "run.checkpoint_every_steps": 10})]
    proc = subprocess.Popen(deepspeed_cmd(1, args), cwd=REPO, env=env(workspace), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not (run / "checkpoints" / "step000000020" / "gpd_complete.json").is_file():
        assert proc.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    steps_before = [s for s, _ in train_losses(run)]
    assert max(steps_before) < 60
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9999, "train/lo')  # a line torn by the kill
    check(launch(workspace, 1, [*args, "--resume", "auto"]))
    log = (run / "logs" / "rank0.log").read_text()
    assert f"resumed from {run}/checkpoints/step000000020" in log
    assert [s for s, _ in train_losses(run)] == list(range(1, 61))  # the redone steps replace the killed run's


@pytest.mark.slow
def test_resume_falls_back_past_a_corrupt_newest_checkpoint(workspace: Path) -> None:
    run = workspace / "corrupt"
    args = ["--run-dir", str(run), *_scratch(workspace)]
    check(single(workspace, args))
    complete = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert complete == ["step000000015", "step000000020"]  # the demo recipe keeps 2
    states = run / "checkpoints" / "step000000020" / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes()[:1000])
    check(single(workspace, [*args, "--set", "optim.epochs=3"]))
    log = (run / "logs" / "rank0.log").read_text()
    assert "step000000020 cannot be read" in log
    assert f"resumed from {run}/checkpoints/step000000015" in log
    assert (run / "checkpoints" / "step000000020.unreadable").is_dir()  # kept aside, out of the way of step 20
    assert [s for s, _ in train_losses(run)] == list(range(1, 31))  # steps 16-20 redone, each logged once


@pytest.mark.slow
def test_export_gives_a_strict_timm_student_with_identical_logits(workspace: Path, capsys) -> None:
    run = workspace / "export_run"
    check(launch(workspace, 1, ["--run-dir", str(run), *_distill(workspace, **{"model.branches": True})]))
    out = workspace / "student.safetensors"
    assert cli_main(["export", str(run), "--out", str(out)]) == 0
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert sidecar["model"] == "test_resnet"
    assert sidecar["num_classes"] == NUM_CLASSES
    assert len(sidecar["classes"]) == NUM_CLASSES
    plain = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    plain.load_state_dict(load_file(str(out)), strict=True)
    _, gpd = rebuild(run_record(run))
    gpd.load_state_dict(run_weights(run, "best")[0], strict=True)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), gpd.eval()(x, mode="student"), rtol=1e-5, atol=1e-5)
    assert cli_main(["eval", str(out), "--data", str(workspace / "data"), "--workers", "0"]) == 0
    assert "student" in capsys.readouterr().out


@pytest.mark.slow
def test_finetune_scenario_scales_lr_and_starts_from_the_student(workspace: Path) -> None:
    student = teacher_file(workspace / "student.pth.safetensors", seed=5)
    run = workspace / "finetune"
    args = _scratch(workspace, **{"model.student_checkpoint": student, "model.branches": True, "run.max_steps": 3})
    check(single(workspace, ["--run-dir", str(run), *args]))
    record = json.loads((run / "config.json").read_text())
    assert record["scenario"] == "finetune"
    assert record["lr"] == pytest.approx(0.05 * 0.1)


@pytest.mark.slow
def test_plain_method_trains_the_student_alone(workspace: Path) -> None:
    run = workspace / "plain"
    check(single(workspace, ["--run-dir", str(run), *_distill(workspace, **{"model.method": "plain",
                                                                           "run.max_steps": 3})]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "train/loss" in r)
    assert {"train/ce_student", "train/kd_static_to_student"} <= set(train_row)
    assert "train/ce_dynamic_teacher" not in train_row
    assert "eval/dynamic_teacher/top1" not in set().union(*rows)


@pytest.mark.slow
def test_peer_control_trains_student_and_peer_and_exports_the_student(workspace: Path) -> None:
    """model.method=peer: a same-size peer in the dynamic teacher's place (2 ranks, with the static teacher)."""
    run = workspace / "peer"
    args = _distill(workspace, **{"model.method": "peer", "run.export_at_end": True})
    check(launch(workspace, 2, ["--run-dir", str(run), *args]))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_row = next(r for r in rows if "train/loss" in r)
    assert {"train/ce_student", "train/ce_dynamic_teacher", "train/kd_static_to_dynamic_teacher",
            "train/sce_dynamic_to_student"} <= set(train_row)
    assert {"eval/student/top1", "eval/dynamic_teacher/top1"} <= set().union(*rows)
    _, model = rebuild(run_record(run))
    state = run_weights(run, "best")[0]  # what the export at the end wrote
    model.load_state_dict(state, strict=True)
    assert {k.split(".")[0] for k in state} == {"student", "peer"}
    # two networks with their own weights: they started apart (independent init) and are trained apart
    assert not torch.equal(next(model.student.parameters()), next(model.peer.parameters()))
    plain = timm.create_model("test_resnet", num_classes=NUM_CLASSES)
    plain.load_state_dict(load_file(str(run / "export" / "student.safetensors")), strict=True)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(plain.eval()(x), model.eval()(x, mode="student"), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize(("extra", "match"), [
    (["--set", "model.static_teacher_checkpoint=/nonexistent/teacher.pth"], "weights file '/nonexistent"),
    (["--set", "model.static_teacher=resnet10t"], r"do not fit ResNet: missing .* wrong shape"),
    (["--set", "optim.global_batch_size=32"], "train_batch_size=16 conflicts with optim.global_batch_size=32"),
])
def test_bad_training_input_fails_clearly(workspace: Path, extra: list[str], match: str) -> None:
    ds = workspace / "ds_conflict.json"
    ds.write_text(json.dumps({**json.loads((REPO / "ds_configs/zero2.json").read_text()), "train_batch_size": 16}))
    result = single(workspace, ["--run-dir", str(workspace / "bad"), *_distill(workspace), *extra],
                    ds_config=str(ds))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert pytest.importorskip("re").search(match, result.stderr), result.stderr[-2000:]


def test_an_unknown_zero_stage_is_refused_at_start(workspace: Path) -> None:
    bad = workspace / "zero4.json"
    ds = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    ds["zero_optimization"]["stage"] = 4
    bad.write_text(json.dumps(ds))
    result = single(workspace, ["--run-dir", str(workspace / "z4"), *_scratch(workspace)], ds_config=str(bad))
    assert result.returncode == 2
    assert "zero_optimization.stage=4 is not a ZeRO stage; use 0, 1, 2 or 3" in result.stderr


@pytest.mark.parametrize(("argv", "match"), [
    (["--recipe", "resnet18_from_resnet35"], "recipe 'resnet18_from_resnet35' is unknown.*Did you mean "
                                             "resnet18_from_resnet34"),
    (["--set", "optim.learning_rate=0.1"], r"--set optim.learning_rate: unknown config key"),
    (["--set", "optim.lr=fast"], "cannot read 'fast' as float"),
    (["--recipe", "resnet18_from_resnet34"], "needs data: --set data.root="),
    (["--deepspeed_config", "/nonexistent.json"], "does not exist"),
])
def test_bad_arguments_fail_before_any_work(argv: list[str], match: str, capsys) -> None:
    if "--deepspeed_config" not in argv:
        argv = [*argv, "--deepspeed_config", str(REPO / "ds_configs/zero2.json")]
    assert train_main(argv) == 2
    assert pytest.importorskip("re").search(match, capsys.readouterr().err)


@pytest.mark.slow
def test_readme_main_command_runs_the_demo(tmp_path: Path) -> None:
    """`deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json`, nothing else, from a clean cache."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", str(REPO / "launch/train.py"), "--deepspeed_config",
           str(REPO / "ds_configs/zero2.json")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=900)
    check(result)
    out = result.stdout
    for row in ("static teacher", "dynamic teacher", "student", "gap static - dynamic teacher",
                "gap dynamic teacher - student", "exported student:", "On your own data"):
        assert row in out
    student_top1 = float(next(line.split()[1] for line in out.splitlines() if line.startswith("student ")))
    assert student_top1 > 80.0
    exported = Path(next(line.split()[2] for line in out.splitlines() if line.startswith("exported student:")))
    assert (tmp_path / exported).is_file()


@pytest.mark.slow
def test_elastic_resume_on_fewer_ranks_keeps_the_weights(workspace: Path) -> None:
    """2 ranks write the checkpoint, 1 rank resumes through the train command: weights, EMA, step, schedule and the
    optimizer state (re-sharded: test_elastic_resume.py checks it tensor by tensor) come back, and the epoch goes on
    with the samples the old ranks did not read (test_elastic_data.py). With a ~0 lr the next checkpoint must hold
    the loaded weights."""
    run = workspace / "elastic"
    args = ["--run-dir", str(run), *_scratch(workspace)]
    check(launch(workspace, 2, [*args, "--set", "run.max_steps=6"]))
    check(launch(workspace, 1, [*args, "--set", "run.max_steps=7", "--set", "optim.lr=1e-12", "--set",
                                "optim.min_lr=0"]))  # a cosine floor above the lr is refused now
    log = (run / "logs" / "rank0.log").read_text()
    assert "was written by 2 ranks and this job has 1: optimizer state re-sharded" in log
    assert "momentum_buffer) re-partitioned for 1 ranks; the full fp32 weights checked equal" in log
    assert "epoch 0 continues after batch 6 with the 2 old ranks' unread samples split over 1 ranks" in log
    assert "now draws from a new RNG seeded from (run.seed, step 6, rank)" in log  # not rank 0's copy
    ckpt = run / "checkpoints"
    before = torch.load(ckpt / "step000000006" / "mp_rank_00_model_states.pt", weights_only=False)
    after = torch.load(ckpt / "step000000007" / "mp_rank_00_model_states.pt", weights_only=False)
    assert after["step"] == 7
    for name, value in before["module"].items():
        if value.is_floating_point() and "running_" not in name:
            torch.testing.assert_close(after["module"][name], value, rtol=0, atol=1e-6, msg=name)
