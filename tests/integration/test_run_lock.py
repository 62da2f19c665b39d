"""One live run per run directory: a second run is refused naming the holder; a dead holder's lock never blocks."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpd_ds.run_lock import LOCK_NAME, STALE_AFTER_S, Holder, RunDirInUseError, RunDirLock, _boot_id, _pid_started
from tests.integration.launch_helpers import REPO, check, env, overrides, train_losses, workspace_with_data


def _write_holder(run_dir: Path, **fields: object) -> None:
    holder = {"host": socket.gethostname(), "pid": 1, "pid_started": None, "boot_id": _boot_id(),
              "started": "2026-12-01 00:00:00 UTC", "heartbeat": time.time(), "token": "other", **fields}
    (run_dir / LOCK_NAME).write_text(json.dumps(holder))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_holder_on_this_host_refuses_a_second_run(tmp_path: Path) -> None:
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as alive:
        try:
            _write_holder(tmp_path, pid=alive.pid, pid_started=_pid_started(alive.pid))
            with pytest.raises(RunDirInUseError, match=rf"is in use by a live run \(host {socket.gethostname()}, pid "
                                                       rf"{alive.pid}, started 2026-12-01 00:00:00 UTC"):
                RunDirLock(tmp_path).acquire()
        finally:
            alive.kill()


@pytest.mark.parametrize("holder", [
    {"pid": "DEAD"},  # a SIGKILLed run on this host
    {"pid": "SELF", "pid_started": 1.0},  # its pid reused by another process
    {"pid": "SELF", "boot_id": "an-earlier-boot"},  # the host rebooted since
    {"host": "another-node", "heartbeat": time.time() - 2 * STALE_AFTER_S},  # a lost node
    {"host": "another-node", "heartbeat": "OLD"},
])
def test_a_dead_holders_lock_is_taken_over(tmp_path: Path, holder: dict) -> None:
    import os

    fields = dict(holder)
    if fields.get("pid") == "DEAD":
        fields["pid"] = _dead_pid()
    elif fields.get("pid") == "SELF":
        fields["pid"] = os.getpid()
    if fields.get("heartbeat") == "OLD":
        fields["heartbeat"] = time.time() - 10 * STALE_AFTER_S
    _write_holder(tmp_path, **fields)
    lock = RunDirLock(tmp_path)
    lock.acquire()
    assert Holder(**json.loads((tmp_path / LOCK_NAME).read_text())).token == lock.token
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_live_holder_on_another_host_refuses(tmp_path: Path) -> None:
    _write_holder(tmp_path, host="another-node", heartbeat=time.time() - 5)
    with pytest.raises(RunDirInUseError, match=r"host another-node, pid 1, .*last heartbeat [0-9] s ago"):
        RunDirLock(tmp_path).acquire()


def test_release_leaves_another_runs_lock_alone(tmp_path: Path) -> None:
    lock = RunDirLock(tmp_path)
    lock.acquire()
    _write_holder(tmp_path, host="another-node")  # taken over meanwhile
    lock.release()
    assert (tmp_path / LOCK_NAME).exists()


SLOW_LOSS = """
import time
from gpd_ds.losses import dkd_loss
from gpd_ds.registry import KD_LOSSES

@KD_LOSSES.register("slow_dkd")
def slow_dkd(logits, static_logits, target, params):
    time.sleep(0.3)  # a slow step: the run stays alive while the second one starts
    return dkd_loss(logits, static_logits, target, params)
"""


@pytest.mark.slow
def test_a_second_run_in_a_live_runs_directory_is_refused_and_the_first_is_unaffected(tmp_path: Path) -> None:
    workspace_with_data(tmp_path)
    plugin = tmp_path / "slow_loss.py"
    plugin.write_text(SLOW_LOSS)
    args = ["--plugin", str(plugin), *overrides(tmp_path / "data", **{
        "model.static_teacher_checkpoint": tmp_path / "teacher.safetensors", "loss.kd": "slow_dkd",
        "run.max_steps": 20})]
    cmd = [sys.executable, "launch/train.py", "--deepspeed_config", "ds_configs/zero2.json"]
    first_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    log = (tmp_path / "first.log").open("w")  # a file, not a pipe: nothing reads it while the second run starts
    first = subprocess.Popen([*cmd, "--run-dir", str(first_dir), *args], cwd=REPO, env=env(tmp_path), stdout=log,
                             stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not (first_dir / LOCK_NAME).exists() and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    second = subprocess.run([*cmd, "--run-dir", str(first_dir), *args], cwd=REPO, env=env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    first.wait(timeout=600)
    log.close()
    assert first.returncode == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"is in use by a live run (host {socket.gethostname()}, pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    assert not (first_dir / LOCK_NAME).exists()  # released at the end
    check(subprocess.run([*cmd, "--run-dir", str(reference_dir), *args], cwd=REPO, env=env(tmp_path),
                         capture_output=True, text=True, timeout=600))
    assert train_losses(first_dir) == train_losses(reference_dir)
