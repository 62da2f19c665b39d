"""Graceful stop through the real `deepspeed` launcher on 2 CPU ranks: a stop signal mid-interval saves a
checkpoint at the current step, and the resumed run's per-step losses are bitwise those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
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
