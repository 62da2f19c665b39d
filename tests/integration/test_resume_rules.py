"""Resume rules through real runs (1 CPU rank, `python launch/train.py`): they never lose work silently.

Unreadable checkpoints only -> a clear error, nothing trained; an incompatible config -> an error naming the keys;
``--resume none`` over checkpoints refused, ``--overwrite`` starts over; resuming an older checkpoint under newer
ones refused; a resume into another run dir leaves the source untouched; a full disk (a small tmpfs) -> a clear
error, the last good checkpoint intact, and a resume once there is room; a read-only run dir -> a clear error."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.launch_helpers import check, overrides, single, train_losses, workspace_with_data

CKPT = "checkpoints"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("rules"))


def _args(tmp: Path, run: Path, **extra: object) -> list[str]:
    return ["--run-dir", str(run), *overrides(tmp / "data", **{"model.static_teacher": "none", "run.max_steps": 10,
                                                                **extra})]


@pytest.fixture(scope="module")
def finished(workspace: Path) -> Path:
    """A run stopped at step 10 with checkpoints at steps 5 and 10."""
    run = workspace / "finished"
    check(single(workspace, _args(workspace, run)))
    assert sorted(p.name for p in (run / CKPT).glob("step*")) == ["step000000005", "step000000010"]
    return run


def _copy(src: Path, tmp: Path, name: str) -> Path:
    shutil.copytree(src, tmp / name)
    return tmp / name


def _failed(result, *fragments: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr[-2000:]


@pytest.mark.slow
def test_all_checkpoints_unreadable_stops_instead_of_starting_over(workspace: Path, finished: Path) -> None:
    run = _copy(finished, workspace, "all-corrupt")
    metrics = (run / "metrics.jsonl").read_text()
    for step in ("step000000005", "step000000010"):
        states = run / CKPT / step / "mp_rank_00_model_states.pt"
        states.write_bytes(states.read_bytes()[:3000])
    result = single(workspace, _args(workspace, run, **{"run.max_steps": 15}))
    _failed(result, "none of the 2 complete checkpoint(s)", "Nothing was trained", "--resume none --overwrite")
    assert sorted(p.name for p in (run / CKPT).glob("step*")) == ["step000000005.unreadable",
                                                                 "step000000010.unreadable"]
    assert (run / "metrics.jsonl").read_text() == metrics


@pytest.mark.slow
def test_an_incompatible_config_stops_and_names_the_keys(workspace: Path, finished: Path) -> None:
    run = _copy(finished, workspace, "incompatible")
    record = (run / "config.json").read_text()
    result = single(workspace, _args(workspace, run, **{"run.max_steps": 15, "model.width_ratio": 4,
                                                        "model.branches": True}))
    _failed(result, "model.branches: False in the checkpoint, True now",
            "model.width_ratio: 2 in the checkpoint, 4 now", "new --run-dir")
    assert (run / "config.json").read_text() == record  # the run's record is not replaced by the refused config
    assert sorted(p.name for p in (run / CKPT).glob("step*")) == ["step000000005", "step000000010"]


@pytest.mark.slow
def test_resume_none_is_refused_over_checkpoints_and_overwrite_starts_over(workspace: Path, finished: Path) -> None:
    run = _copy(finished, workspace, "restart")
    result = single(workspace, [*_args(workspace, run), "--resume", "none"])
    _failed(result, "--resume none", "holds 2 complete checkpoint(s)", "--overwrite")
    result = single(workspace, [*_args(workspace, run, **{"run.max_steps": 15}), "--resume", "none", "--overwrite"])
    check(result)
    assert [s for s, _ in train_losses(run)] == list(range(1, 16))  # one run, from step 0, every step once
    markers = [json.loads((p / "gpd_complete.json").read_text()) for p in sorted((run / CKPT).glob("step*"))]
    assert [m["step"] for m in markers] == [10, 15]
    assert len({m["lineage"] for m in markers}) == 1
    result = single(workspace, [*_args(workspace, run), "--resume", "auto", "--overwrite"])
    _failed(result, "--overwrite deletes the run directory's checkpoints and only goes with --resume none")


@pytest.mark.slow
def test_resuming_an_older_checkpoint_under_newer_ones_is_refused(workspace: Path, finished: Path) -> None:
    run = _copy(finished, workspace, "older")
    older = run / CKPT / "step000000005"
    _failed(single(workspace, [*_args(workspace, run, **{"run.max_steps": 15}), "--resume", str(older)]),
            "would overwrite the newer checkpoints ['step000000010']")


@pytest.mark.slow
def test_a_resume_into_another_run_dir_leaves_the_source_untouched(workspace: Path, finished: Path) -> None:
    source = _copy(finished, workspace, "source")
    before = sorted(p.name for p in (source / CKPT).iterdir())
    branch = workspace / "branch"
    check(single(workspace, [*_args(workspace, branch, **{"run.max_steps": 20}), "--resume",
                             str(source / CKPT / "step000000005")]))
    assert sorted(p.name for p in (source / CKPT).iterdir()) == before
    assert sorted(p.name for p in (branch / CKPT).glob("step*")) == ["step000000015", "step000000020"]
    assert [s for s, _ in train_losses(branch)] == list(range(6, 21))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str, read_only: bool = False) -> Iterator[Path]:
    path.mkdir(parents=True)
    options = f"size={size}" + (",ro" if read_only else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                             text=True)
    if mounted.returncode:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.strip()})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _checkpoint_bytes(run: Path) -> int:
    return sum(f.stat().st_size for f in (run / CKPT / "step000000005").rglob("*") if f.is_file())


@pytest.mark.slow
def test_a_full_disk_mid_save_is_a_clear_error_and_leaves_no_partial_checkpoint(workspace: Path,
                                                                                finished: Path) -> None:
    size = _checkpoint_bytes(finished)
    with _tmpfs(workspace / "tiny", f"{size // 2}") as disk:
        run = disk / "run"
        result = single(workspace, _args(workspace, run))
        _failed(result, "writing checkpoint", "step000000005 failed on 1 rank(s)", "partial checkpoint removed",
                "free on that file system: it is probably full", "no earlier one was lost")
        assert not list((run / CKPT).glob("step*"))


@pytest.mark.slow
def test_no_room_for_the_next_checkpoint_keeps_the_last_and_resumes_after_cleanup(workspace: Path,
                                                                                 finished: Path) -> None:
    size = _checkpoint_bytes(finished)
    with _tmpfs(workspace / "small", f"{int(size * 1.6)}") as disk:
        run = disk / "run"
        result = single(workspace, _args(workspace, run))
        _failed(result, "not enough space to save checkpoint", "step000000010", "step000000005 is intact")
        assert sorted(p.name for p in (run / CKPT).glob("step*")) == ["step000000005"]
        subprocess.run(["mount", "-o", f"remount,size={size * 4}", str(disk)], check=True)
        check(single(workspace, _args(workspace, run)))
        assert f"resumed from {run}/{CKPT}/step000000005" in (run / "logs" / "rank0.log").read_text()
        assert [s for s, _ in train_losses(run)] == list(range(1, 11))


@pytest.mark.slow
def test_a_read_only_run_dir_is_a_clear_error_before_any_work(workspace: Path) -> None:
    with _tmpfs(workspace / "readonly", "1m", read_only=True) as disk:
        result = single(workspace, _args(workspace, disk / "run"))
        _failed(result, "--run-dir", "cannot be written", "Read-only file system")
