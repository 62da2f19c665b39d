"""Tracking on real (short) training runs: offline W&B, run-id reuse on resume, W&B off or failing, the API key
never on disk, metrics.jsonl and `gpd-ds report`."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpd_ds.cli import main as cli_main
from gpd_ds.progress import Progress
from tests.integration.launch_helpers import REPO, check, env, overrides, workspace_with_data
from tests.integration.wandb_reader import read_run

FAKE_KEY = "FAKEKEY" + "0123456789abcdef" * 2 + "01"  # 40 characters, like a real key

TRAIN_NAMES = {"train/loss", "train/ce_student", "train/ce_dynamic_teacher", "train/sce_dynamic_to_student",
               "train/kd_static_to_student", "train/kd_static_to_dynamic_teacher", "train/lr", "train/grad_norm",
               "train/images_per_s", "train/data_wait"}
EVAL_NAMES = {f"eval/{m}/{k}" for m in ("student", "dynamic_teacher", "static_teacher", "student_ema",
                                        "dynamic_teacher_ema") for k in ("top1", "top5")} | {
    "eval/gap/static_minus_dynamic", "eval/gap/dynamic_minus_student", "eval/dynamic_teacher/growth"}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("track"))


def _run(tmp: Path, run_dir: Path, wandb_env: dict[str, str], *extra: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in env(tmp).items() if not k.startswith("WANDB_")}
    environment.update(wandb_env)
    args = overrides(tmp / "data", **{"model.static_teacher_checkpoint": tmp / "teacher.safetensors"})
    cmd = [sys.executable, "launch/train.py", "--deepspeed_config", "ds_configs/zero2.json", "--run-dir",
           str(run_dir), *args, *extra]
    return subprocess.run(cmd, cwd=REPO, env=environment, capture_output=True, text=True, timeout=600)


def _files_containing(root: Path, needle: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and needle.encode() in p.read_bytes()]


@pytest.mark.slow
def test_offline_wandb_run_metrics_config_and_resume_reuses_the_run(workspace: Path) -> None:
    run = workspace / "offline"
    check(_run(workspace, run, {}, "--set", "run.max_steps=12"))  # no key, no WANDB_MODE: offline
    # as if killed after logging steps 11-12 but before their checkpoint: the resume redoes them from step 10
    shutil.rmtree(run / "checkpoints" / "step000000012")
    check(_run(workspace, run, {}))  # resume to the end
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2
    first, second = read_run(files[0]), read_run(files[1])
    assert first["run_id"] == second["run_id"]  # the resumed run continues the same W&B run
    assert first["train_steps"] == list(range(1, 13))
    assert second["train_steps"] == list(range(13, 21))  # W&B has 11-12 already: each step once
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()
            if "train/loss" in r] == list(range(1, 21))
    keys = first["history_keys"] | second["history_keys"]
    assert keys >= TRAIN_NAMES
    assert keys >= EVAL_NAMES
    assert {"epoch", "samples"} <= keys
    assert {"best/student_top1", "eval/student/top1"} <= second["summary_keys"]
    config = first["config"]
    assert config["config"]["recipe"] == "demo"
    assert config["ds_config"]["zero_optimization"]["stage"] == 2
    assert config["world_size"] == 1
    assert {"torch", "deepspeed", "timm"} <= set(config["versions"])

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert set().union(*rows) >= TRAIN_NAMES
    assert set().union(*rows) >= EVAL_NAMES
    out = workspace / "report"
    assert cli_main(["report", str(run), str(workspace / "offline"), "--out", str(out), "--labels", "a", "b"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert {"accuracy.png", "gaps.png", "losses.png", "lr.png", "throughput.png"} <= set(pngs)
    assert all((out / p).stat().st_size > 10_000 for p in pngs)
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(pngs)


@pytest.mark.slow
def test_disabled_wandb_is_honoured(workspace: Path) -> None:
    run = workspace / "disabled"
    check(_run(workspace, run, {"WANDB_MODE": "disabled"}, "--set", "run.max_steps=3"))
    assert not (run / "wandb").exists()
    assert (run / "metrics.jsonl").stat().st_size > 0


@pytest.mark.slow
def test_failing_wandb_degrades_to_local_logging_and_no_key_on_disk(workspace: Path) -> None:
    run = workspace / "failing"
    result = _run(workspace, run, {"WANDB_MODE": "online", "WANDB_API_KEY": FAKE_KEY,
                                   "WANDB_BASE_URL": "http://127.0.0.1:9"},
                  "--set", "run.max_steps=3", "--set", "track.init_timeout=15")
    check(result)
    assert "W&B could not start" in (run / "logs" / "rank0.log").read_text()
    assert (run / "metrics.jsonl").stat().st_size > 0
    assert _files_containing(run, FAKE_KEY) == []


@pytest.mark.slow
def test_api_key_is_not_written_by_an_offline_run_with_a_key(workspace: Path) -> None:
    run = workspace / "keyed"
    check(_run(workspace, run, {"WANDB_MODE": "offline", "WANDB_API_KEY": FAKE_KEY}, "--set", "run.max_steps=5",
               "--set", "run.export_at_end=true", "--set", "track.log_artifacts=true"))
    assert list((run / "wandb").glob("offline-run-*"))
    assert _files_containing(run, FAKE_KEY) == []


def test_progress_writes_plain_lines_when_not_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="gpd_ds.progress"), \
            Progress(10, "train", unit="step", interval=0.0) as bar:
        for _ in range(3):
            bar.update(1, loss=1.5)
    lines = [r.message for r in caplog.records]
    assert any("train: 3/10 step" in line and "loss 1.5" in line and "eta" in line for line in lines)


@pytest.mark.slow
def test_resuming_another_directorys_checkpoint_starts_a_new_wandb_run(workspace: Path) -> None:
    source, fork = workspace / "fork-source", workspace / "fork"
    check(_run(workspace, source, {}, "--set", "run.max_steps=10"))
    check(_run(workspace, fork, {}, "--resume", str(source / "checkpoints" / "step000000010")))
    (first,), (second,) = ((read_run(f) for f in sorted((d / "wandb").glob("offline-run-*/run-*.wandb")))
                           for d in (source, fork))
    assert first["run_id"] != second["run_id"]
    assert second["train_steps"] == list(range(11, 21))  # the fork goes on from the source's step
    assert second["config"]["resumed_from"] == str(source / "checkpoints" / "step000000010")
    assert json.loads((fork / "config.json").read_text())["resumed_from"] == second["config"]["resumed_from"]
    assert json.loads((source / "config.json").read_text())["resumed_from"] is None
