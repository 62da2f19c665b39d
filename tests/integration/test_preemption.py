"""Graceful stop through the real `deepspeed` launcher on 2 CPU ranks: a stop signal mid-interval saves a
checkpoint at the current step, and the resumed run's per-step losses are bitwise those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from gpd_ds.checkpoint import MARKER, tag_for
from gpd_ds.preemption import EXIT_PREEMPTED
from tests.integration.launch_helpers import (
    REPO,
    check,
    deepspeed_cmd,
    env,
    launch,
    overrides,
    train_losses,
    workspace_with_data,
)

STEPS = 40  # 4 epochs of 10 steps: long enough to be signalled mid-run


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("preempt"))


def _args(tmp: Path, run: Path) -> list[str]:
    # checkpoints only at the end: the stop must make its own, at whatever step it lands
    return ["--run-dir", str(run), *overrides(tmp / "data", **{
        "model.static_teacher_checkpoint": tmp / "teacher.safetensors", "optim.epochs": 4,
        "run.checkpoint_every_steps": 1000, "run.stop_check_steps": 1, "data.workers": 1})]


@pytest.fixture(scope="module")
def reference(workspace: Path) -> list[tuple[int, float]]:
    run = workspace / "uninterrupted"
    check(launch(workspace, 2, _args(workspace, run)))
    losses = train_losses(run)
    assert [s for s, _ in losses] == list(range(1, STEPS + 1))
    return losses


def _wait_for_step(run: Path, step: int, proc: subprocess.Popen) -> None:
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or not any(s >= step for s, _ in _losses_so_far(run)):
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.time() < deadline
        time.sleep(0.05)


def _losses_so_far(run: Path) -> list[tuple[int, float]]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # being written
            continue
    return [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]


def _wait_for_group(pgid: int, timeout: float = 120) -> None:
    """Until no process of the job's process group is left (ranks outlive a killed runner)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = [p for p in psutil.process_iter(["pid"]) if _pgid(p.pid) == pgid and p.status() != "zombie"]
        if not alive:
            return
        time.sleep(0.2)
    raise AssertionError(f"processes of group {pgid} still running after {timeout} s")


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "target"), [(signal.SIGTERM, "group"), (signal.SIGTERM, "runner"),
                                             (signal.SIGINT, "group")],
                         ids=["sigterm-group", "sigterm-runner-only", "sigint-group"])
def test_stop_signal_saves_the_current_step_and_resume_is_bitwise(workspace: Path, reference, sig, target) -> None:
    run = workspace / f"stopped-{sig.name}-{target}"
    proc = subprocess.Popen(deepspeed_cmd(2, _args(workspace, run)), cwd=REPO, env=env(workspace),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_step(run, 3, proc)
    if target == "group":
        os.killpg(proc.pid, sig)
    else:
        proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    _wait_for_group(proc.pid)
    log = (run / "logs" / "rank0.log").read_text()
    assert "stopped at step" in log, output[-3000:]
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert 3 <= stopped < STEPS
    assert (run / "checkpoints" / tag_for(stopped) / MARKER).is_file()
    assert [s for s, _ in train_losses(run)] == list(range(1, stopped + 1))  # nothing after the saved step
    if target == "group" and sig == signal.SIGTERM:
        assert proc.returncode in (EXIT_PREEMPTED, -signal.SIGTERM)

    check(launch(workspace, 2, _args(workspace, run)))
    assert train_losses(run) == reference  # every step once, the same floats, across the stop
    assert f"resumed from {run / 'checkpoints' / tag_for(stopped)}" in (run / "logs" / "rank0.log").read_text()


SLOW_STEP = """
import time
from gpd_ds.losses import kl_loss
from gpd_ds.registry import KD_LOSSES

@KD_LOSSES.register("slow_kl")
def slow_kl(logits, static_logits, target, params):
    time.sleep(20)  # called once a step (kd_dynamic_teacher off): 20 s steps, as a large ViT or a CPU run has
    return kl_loss(logits, static_logits, target, params)
"""

SLOW_START = """
import time
import timm
from timm.models import register_model

@register_model
def slow_to_build(pretrained=False, **kwargs):
    time.sleep(120)  # a start-up that takes minutes (a large model, a teacher, the data)
    return timm.create_model("test_resnet", **kwargs)
"""


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.is_file():
        assert proc.poll() is None, "the run ended before it could be signalled"
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.slow
def test_ctrl_c_with_20_s_steps_is_saved_before_the_launcher_kills_the_ranks(workspace: Path) -> None:
    """DeepSpeed's launcher SIGKILLs the ranks 30 s after forwarding Ctrl-C; a check every 5 steps (100 s) lost
    every step. The check interval follows the step time: after the step in flight, the ranks save and stop."""
    run = workspace / "slow-steps"
    plugin = workspace / "slow_step.py"
    plugin.write_text(SLOW_STEP)
    args = ["--plugin", str(plugin), "--run-dir", str(run), *overrides(workspace / "data", **{
        "model.static_teacher_checkpoint": workspace / "teacher.safetensors", "loss.kd": "slow_kl",
        "loss.kd_dynamic_teacher": False, "run.max_steps": 6, "run.eval_at_start": False,
        "run.checkpoint_every_steps": 1000})]  # run.stop_check_steps stays at its default, 5
    proc = subprocess.Popen(deepspeed_cmd(1, args), cwd=REPO, env=env(workspace), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    _wait_for_step(run, 1, proc)
    signalled = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal: the whole foreground group
    output = proc.communicate(timeout=120)[0]
    stopped_after = time.monotonic() - signalled
    _wait_for_group(proc.pid)
    log = (run / "logs" / "rank0.log").read_text()
    assert "on request (SIGINT on rank 0)" in log, output[-3000:]
    stopped = int(log.split("stopped at step ")[1].split()[0])
    assert stopped in (1, 2)  # the step in flight when Ctrl-C came (2, unless it came during step 1's check)
    assert f"(exit code {EXIT_PREEMPTED})" in log
    assert (run / "checkpoints" / tag_for(stopped) / MARKER).is_file()
    assert stopped_after < 30, f"{stopped_after:.0f} s: the launcher killed the rank"
    # the one traceback is the `deepspeed` runner's own (it has no SIGINT handler; DeepSpeed's code): none of a rank
    tracebacks = output.split("Traceback (most recent call last):")[1:]
    assert all("deepspeed/launcher/runner.py" in t[:400] for t in tracebacks), output[-4000:]
    assert "Traceback" not in log


@pytest.mark.slow
def test_a_stop_during_start_up_ends_it_at_once_with_the_stop_code(workspace: Path) -> None:
    run = workspace / "slow-start"
    plugin = workspace / "slow_start.py"
    plugin.write_text(SLOW_START)
    args = ["--plugin", str(plugin), "--run-dir", str(run), *overrides(workspace / "data", **{
        "model.static_teacher": "none", "model.student": "slow_to_build", "run.max_steps": 2})]
    cmd = [sys.executable, "launch/train.py", "--deepspeed_config", "ds_configs/zero2.json", *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env(workspace), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for(run / "logs" / "rank0.log", proc)  # start-up is under way (the model build takes 2 min)
    time.sleep(2)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == EXIT_PREEMPTED, err[-3000:]
    assert time.monotonic() - signalled < 10
    assert err.strip().splitlines()[-1] == (
        "gpd-ds train: stopped during start-up on SIGINT, before the first training step: nothing to save; run the "
        f"same command to start again (exit code {EXIT_PREEMPTED})")
    assert "Traceback" not in err
    assert not (run / "checkpoints").exists() or not any((run / "checkpoints").iterdir())
