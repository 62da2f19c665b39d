"""Loading never runs code: a crafted pickle payload in each kind of file gpd_ds loads is refused with an error
naming the file, on every path that loads it (resume, fallback resume, 2-rank ZeRO-2/ZeRO-3 resume, export, eval,
teacher weights), and the payload's marker file is never created. Normal checkpoints of every ZeRO stage still
resume."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from gpd_ds.cli import main as cli_main
from gpd_ds.safeload import UnsafeFileError, load_file
from tests.integration.launch_helpers import check, launch, overrides, single, workspace_with_data


class Payload:
    """Unpickling this opens (creates) ``marker``: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _poison(path: Path, marker: Path, where: tuple[str, ...] = ()) -> None:
    """Put a payload into the torch file ``path`` (at key path ``where``, or as a new top-level key)."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # the test's own, trusted file
    target = state
    for key in where:
        target = target[key]
    target["gpd_ds_test_payload"] = Payload(marker)
    torch.save(state, path)
    torch.load(path, weights_only=False)  # the file really is live: loading it unsafely runs the payload
    assert marker.is_file()
    marker.unlink()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return workspace_with_data(tmp_path_factory.mktemp("safe"))


def _args(tmp: Path, run: Path, **extra: object) -> list[str]:
    return ["--run-dir", str(run), *overrides(tmp / "data", **{
        "model.static_teacher_checkpoint": tmp / "teacher.safetensors", "run.max_steps": 10, **extra})]


@pytest.fixture(scope="module")
def runs(workspace: Path) -> dict[str, Path]:
    """Finished runs to copy and damage: 1 rank ZeRO-2, 2 ranks ZeRO-2, 2 ranks ZeRO-3 (checkpoints at 5, 10)."""
    out = {"one": workspace / "one", "zero2": workspace / "zero2", "zero3": workspace / "zero3"}
    check(single(workspace, _args(workspace, out["one"])))
    check(launch(workspace, 2, _args(workspace, out["zero2"])))
    check(launch(workspace, 2, _args(workspace, out["zero3"]), ds_config="ds_configs/zero3.json"))
    return out


def _copy(src: Path, tmp: Path, name: str) -> Path:
    dst = tmp / name
    shutil.copytree(src, dst)
    return dst


def _refused(result, marker: Path, file: str) -> None:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    assert "refusing to load" in result.stderr, result.stderr[-2000:]
    assert file in result.stderr, result.stderr[-2000:]
    assert "gpd_ds_test_payload" not in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists(), "the payload ran"


STEP10, STEP5 = "checkpoints/step000000010", "checkpoints/step000000005"


@pytest.mark.slow
def test_resume_refuses_a_payload_in_the_model_states(workspace: Path, runs: dict[str, Path]) -> None:
    run, marker = _copy(runs["one"], workspace, "poisoned-states"), workspace / "ran-states"
    _poison(run / STEP10 / "mp_rank_00_model_states.pt", marker)
    _refused(single(workspace, _args(workspace, run, **{"run.max_steps": 12})), marker, "mp_rank_00_model_states.pt")


@pytest.mark.slow
def test_fallback_resume_refuses_a_payload_in_the_client_state(workspace: Path, runs: dict[str, Path]) -> None:
    """The newest checkpoint is truncated (set aside), the previous one holds a payload inside the client state."""
    run, marker = _copy(runs["one"], workspace, "poisoned-fallback"), workspace / "ran-fallback"
    newest = run / STEP10 / "mp_rank_00_model_states.pt"
    newest.write_bytes(newest.read_bytes()[:2000])
    _poison(run / STEP5 / "mp_rank_00_model_states.pt", marker, where=("state", "best"))
    result = single(workspace, _args(workspace, run, **{"run.max_steps": 12}))
    _refused(result, marker, "step000000005/mp_rank_00_model_states.pt")
    assert (run / "checkpoints" / "step000000010.unreadable").is_dir()


@pytest.mark.slow
def test_two_rank_zero2_resume_refuses_a_payload_in_rank1s_optimizer_shard(workspace: Path,
                                                                           runs: dict[str, Path]) -> None:
    run, marker = _copy(runs["zero2"], workspace, "poisoned-zero2"), workspace / "ran-zero2"
    _poison(run / STEP10 / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    result = launch(workspace, 2, _args(workspace, run, **{"run.max_steps": 12}))
    _refused(result, marker, "zero_pp_rank_1_mp_rank_00_optim_states.pt")


@pytest.mark.slow
def test_two_rank_zero3_resume_refuses_a_payload_in_a_zero3_shard(workspace: Path, runs: dict[str, Path]) -> None:
    run, marker = _copy(runs["zero3"], workspace, "poisoned-zero3"), workspace / "ran-zero3"
    _poison(run / STEP10 / "zero_pp_rank_1_mp_rank_00_model_states.pt", marker)
    result = launch(workspace, 2, _args(workspace, run, **{"run.max_steps": 12}), ds_config="ds_configs/zero3.json")
    _refused(result, marker, "zero_pp_rank_1_mp_rank_00_model_states.pt")


class _Cli:
    def __init__(self, code: int, err: str) -> None:
        self.returncode, self.stderr, self.stdout = code, err, ""


def _cli(argv: list[str], capsys) -> _Cli:
    code = cli_main(argv)
    return _Cli(code, capsys.readouterr().err)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["export-last", "export-without-best", "eval-last"])
def test_export_and_eval_refuse_a_payload_in_the_last_checkpoint(workspace: Path, runs: dict[str, Path],
                                                                 command: str, capsys) -> None:
    run, marker = _copy(runs["one"], workspace, f"poisoned-{command}"), workspace / f"ran-{command}"
    _poison(run / STEP10 / "mp_rank_00_model_states.pt", marker, where=("module",))
    out = str(workspace / f"{command}.safetensors")
    argv = {"export-last": ["export", str(run), "--out", out, "--weights", "last"],
            "export-without-best": ["export", str(run), "--out", out],
            "eval-last": ["eval", str(run), "--data", str(workspace / "data"), "--workers", "0", "--weights", "last"]}
    if command == "export-without-best":  # no silent fallback to the last checkpoint: nothing is loaded
        shutil.rmtree(run / "best")
        result = _cli(argv[command], capsys)
        assert result.returncode == 2, result.stderr
        assert "has no best weights" in result.stderr
        assert "--weights last" in result.stderr
        assert not marker.exists()
        return
    _refused(_cli(argv[command], capsys), marker, "mp_rank_00_model_states.pt")


@pytest.mark.slow
def test_zero3_export_refuses_a_payload_in_an_optimizer_partition(workspace: Path, runs: dict[str, Path],
                                                                  capsys) -> None:
    """Exporting a ZeRO-3 run consolidates every rank's fp32 partition (DeepSpeed's zero_to_fp32 loader)."""
    run, marker = _copy(runs["zero3"], workspace, "poisoned-zero3-export"), workspace / "ran-zero3-export"
    _poison(run / STEP10 / "zero_pp_rank_1_mp_rank_00_optim_states.pt", marker)
    result = _cli(["export", str(run), "--out", str(workspace / "z3.safetensors"), "--weights", "last"], capsys)
    _refused(result, marker, "step000000010")


@pytest.mark.slow
@pytest.mark.parametrize("what", ["best", "exported"])
def test_a_pickle_posing_as_safetensors_is_refused(workspace: Path, runs: dict[str, Path], what: str,
                                                   capsys) -> None:
    run, marker = _copy(runs["one"], workspace, f"fake-{what}"), workspace / f"ran-{what}"
    if what == "best":
        torch.save({"w": Payload(marker)}, run / "best" / "model.safetensors")
        result = _cli(["export", str(run), "--out", str(workspace / "b.safetensors")], capsys)
    else:
        out = workspace / "student.safetensors"
        assert cli_main(["export", str(run), "--out", str(out)]) == 0
        torch.save({"w": Payload(marker)}, out)
        result = _cli(["eval", str(out), "--data", str(workspace / "data"), "--workers", "0"], capsys)
    assert result.returncode == 2, result.stderr
    assert "not a safetensors file" in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_static_teacher_pth_with_a_payload_is_refused(workspace: Path) -> None:
    marker = workspace / "ran-teacher"
    teacher = workspace / "teacher.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": Payload(marker)}, teacher)
    result = single(workspace, _args(workspace, workspace / "teacher-run",
                                     **{"model.static_teacher_checkpoint": teacher}))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "refusing to load" in result.stderr
    assert "teacher.pth" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()


def test_load_file_names_the_offending_global(tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    path = tmp_path / "x.pt"
    torch.save({"ok": torch.ones(2), "bad": Payload(marker)}, path)
    with pytest.raises(UnsafeFileError, match=r"refusing to load .*x\.pt: it holds (io|builtins)\.open"):
        load_file(path)
    assert not marker.exists()
    torch.save({"ok": torch.ones(2), "nested": [1, 2.0, "s", (3,)]}, path)
    assert load_file(path)["nested"] == [1, 2.0, "s", (3,)]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1])
def test_a_normal_checkpoint_of_each_zero_stage_resumes(workspace: Path, stage: int) -> None:
    """ZeRO-2 and ZeRO-3 resume in test_train.py / test_zero3.py; ZeRO-0 and ZeRO-1 here."""
    run = workspace / f"normal-zero{stage}"
    ds = f"ds_configs/zero{stage}.json"
    check(single(workspace, _args(workspace, run, **{"run.max_steps": 5}), ds_config=ds))
    check(single(workspace, _args(workspace, run, **{"run.max_steps": 7}), ds_config=ds))
    assert f"resumed from {run}/checkpoints/step000000005" in (run / "logs" / "rank0.log").read_text()


def test_a_nested_safe_loading_keeps_the_outer_allow_list(tmp_path: Path) -> None:
    """DeepSpeed's ZeRO-3 consolidation loads optimizer shards after a nested load has returned."""
    from deepspeed.runtime.zero.config import ZeroStageEnum

    from gpd_ds.safeload import safe_loading

    path = tmp_path / "shard.pt"
    torch.save({"zero_stage": ZeroStageEnum.weights}, path)
    with safe_loading():
        with safe_loading():
            assert torch.load(path, weights_only=False)["zero_stage"] == ZeroStageEnum.weights
        assert torch.load(path, weights_only=False)["zero_stage"] == ZeroStageEnum.weights  # still allowed
        torch.save({"f": print}, tmp_path / "evil.pt")
        with pytest.raises(Exception, match="GLOBAL"):
            torch.load(tmp_path / "evil.pt", weights_only=False)  # and still weights-only
