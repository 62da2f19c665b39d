"""The checkpoint rules that need no engine: starting over, pruning, compatibility, error classes, metrics
rewinding, stop requests, per-rank RNG after an elastic resume, stale /dev/shm buffers."""

from __future__ import annotations

import json
import os
import pickle
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gpd_ds import checkpoint, distributed, preemption
from gpd_ds.checkpoint import (
    MARKER,
    CheckpointError,
    IncompatibleCheckpointError,
    Marker,
    ResumeError,
    check_compatible,
    complete_checkpoints,
    prepare_run_dir,
    tag_for,
)
from gpd_ds.config import TrainConfig
from gpd_ds.distributed import DistInfo
from gpd_ds.safeload import UnsafeFileError
from gpd_ds.tracking import read_metrics, rewind_metrics

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _checkpoint(root: Path, step: int, lineage: str | None = "run-a", complete: bool = True, **marker) -> Path:
    path = root / tag_for(step)
    path.mkdir(parents=True)
    (path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 100)
    if complete:
        (path / MARKER).write_text(json.dumps({"step": step, "world_size": 1, "lineage": lineage, **marker}))
    return path


def test_resume_none_over_checkpoints_is_refused_and_overwrite_removes_them(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root, 5)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "best").mkdir()
    with pytest.raises(ResumeError, match=r"--resume none: .* holds 1 complete checkpoint.*--overwrite"):
        prepare_run_dir(tmp_path, "none", overwrite=False, info=ONE)
    assert complete_checkpoints(root)
    prepare_run_dir(tmp_path, "none", overwrite=True, info=ONE)
    assert not root.exists()
    assert not (tmp_path / "metrics.jsonl").exists()
    assert not (tmp_path / "best").exists()


def test_start_removes_incomplete_step_directories_only(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    good = _checkpoint(root, 5)
    partial = _checkpoint(root, 10, complete=False)
    aside = root / "step000000015.unreadable"
    aside.mkdir()
    prepare_run_dir(tmp_path, "auto", overwrite=False, info=ONE)
    assert good.is_dir()
    assert aside.is_dir()
    assert not partial.exists()


def test_pruning_keeps_the_newest_of_this_lineage_and_never_touches_another(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    foreign = [_checkpoint(root, s, lineage="someone-else") for s in (30, 40)]
    ours = [_checkpoint(root, s) for s in (5, 10, 15, 20)]
    checkpoint._prune(root, keep=2, lineage="run-a", newest=tag_for(20))
    assert [p.exists() for p in ours] == [False, False, True, True]
    assert all(p.exists() for p in foreign)


def test_pruning_keeps_the_new_checkpoint_even_below_older_step_names(tmp_path: Path) -> None:
    """A run resumed from step 10 of its lineage next to another lineage's step 40: the new step 15 stays."""
    root = tmp_path / "checkpoints"
    other = _checkpoint(root, 40, lineage="old-run")
    mine = [_checkpoint(root, s) for s in (10, 15)]
    checkpoint._prune(root, keep=1, lineage="run-a", newest=tag_for(15))
    assert other.exists()
    assert mine[1].exists()
    assert not mine[0].exists()


def test_a_save_never_writes_into_an_existing_step_directory(tmp_path: Path) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root, 5)
    with pytest.raises(CheckpointError, match="exists already; a save never writes into an existing checkpoint"):
        checkpoint._check_before_save(root, tag_for(5))


def test_a_save_without_room_for_another_checkpoint_is_refused(tmp_path: Path, monkeypatch) -> None:
    root = tmp_path / "checkpoints"
    _checkpoint(root, 5)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage", lambda _: type("U", (), {"free": 50})())
    with pytest.raises(checkpoint.StorageError, match=r"not enough space .*: 50 B free .*step000000005\) took 1\d\d B"):
        checkpoint._check_before_save(root, tag_for(10))


def _marker(tmp_path: Path, config: dict, zero_stage: int = 2) -> Marker:
    return Marker(tmp_path / tag_for(5), 5, 1, zero_stage, "run-a", config)


def test_an_incompatible_config_names_every_key_that_differs(tmp_path: Path) -> None:
    old = TrainConfig().to_dict()
    new = TrainConfig().to_dict()
    new["model"]["width_ratio"], new["optim"]["optimizer"] = 4, "adamw"
    with pytest.raises(IncompatibleCheckpointError, match=r"model.width_ratio: 2 in the checkpoint, 4 now; "
                                                          r"optim.optimizer: 'sgd' in the checkpoint, 'adamw' now"):
        check_compatible(_marker(tmp_path, old), new, zero_stage=2)


def test_other_config_changes_continue_with_a_warning_naming_them(tmp_path: Path, caplog) -> None:
    old, new = TrainConfig().to_dict(), TrainConfig().to_dict()
    new["optim"]["epochs"] = old["optim"]["epochs"] + 10
    check_compatible(_marker(tmp_path, old), new, zero_stage=2)
    assert f"optim.epochs {old['optim']['epochs']} -> {new['optim']['epochs']}" in caplog.text


def test_another_zero_stage_is_incompatible(tmp_path: Path) -> None:
    with pytest.raises(IncompatibleCheckpointError, match="ZeRO stage 2 and this job runs stage 3"):
        check_compatible(_marker(tmp_path, TrainConfig().to_dict()), TrainConfig().to_dict(), zero_stage=3)


@pytest.mark.parametrize(("error", "kind"), [
    (RuntimeError("PytorchStreamReader failed reading zip archive: failed finding central directory"), "unreadable"),
    (EOFError("Ran out of input"), "unreadable"),
    (OSError(5, "Input/output error"), "unreadable"),
    (pickle.UnpicklingError("invalid load key, 'x'."), "unreadable"),
    (pickle.UnpicklingError("Unsupported global: GLOBAL posix.system was not allowed"), "unsafe"),
    (UnsafeFileError("refusing to load x"), "unsafe"),
    (RuntimeError("Error(s) in loading state_dict for GPDModel: size mismatch for fc.weight"), "incompatible"),
    (KeyError("base_optimizer_state"), "incompatible"),
])
def test_load_errors_are_classified(error: BaseException, kind: str) -> None:
    assert checkpoint._classify(error) == kind


def test_rewind_metrics_cuts_back_to_the_resumed_step_and_drops_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": float(s)} for s in range(1, 9)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 9, "train/lo')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1}\n{"ste\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2 is not JSON"):  # only a torn *last* line is repaired
        read_metrics(bad)
    assert read_metrics(path) == (rows, True)
    assert rewind_metrics(path, 5) == 8  # what the killed run had logged (W&B has those steps)
    assert read_metrics(path) == (rows[:5], False)
    assert rewind_metrics(path, None) == 5  # a fresh start keeps nothing
    assert path.read_text() == ""


def test_seeds_after_an_elastic_resume_differ_per_rank_and_repeat() -> None:
    seeds = [distributed.seed_for_new_rank(42, 1000, rank) for rank in range(4)]
    assert len(set(seeds)) == 4
    assert seeds == [distributed.seed_for_new_rank(42, 1000, rank) for rank in range(4)]
    assert distributed.seed_for_new_rank(42, 1001, 0) != seeds[0]


def test_rng_state_round_trips_as_plain_data(tmp_path: Path) -> None:
    distributed.seed_all(3)
    state = distributed.rng_state()
    torch.save(state, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    distributed.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))  # no numpy objects inside
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_stop_request_takes_the_first_signal_and_a_second_ctrl_c_stops_at_once() -> None:
    previous = {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS}
    stop = preemption.StopRequest().install()
    try:
        with pytest.raises(preemption.StoppedOutsideTraining, match="during start-up on SIGTERM, before the first"):
            os.kill(os.getpid(), signal.SIGTERM)  # start-up: nothing to save, stop at once
        assert stop.local_code() == 0
        with stop.deferred():  # the training loop: recorded, saved at the next agreed step
            os.kill(os.getpid(), signal.SIGUSR1)
            assert stop.local_code() == signal.SIGUSR1
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.local_code() == signal.SIGUSR1
            with pytest.raises(KeyboardInterrupt):  # the handler runs as soon as kill() returns
                os.kill(os.getpid(), signal.SIGINT)
    finally:
        stop.uninstall()
    assert {s: signal.getsignal(s) for s in preemption.STOP_SIGNALS} == previous  # forked children inherit them
    assert preemption.describe([0, signal.SIGTERM, signal.SIGTERM]) == "SIGTERM on ranks [1, 2]"


def test_the_stop_check_interval_follows_the_slowest_rank_and_bounds(monkeypatch) -> None:
    from gpd_ds.train import stop_check

    clock = iter([100.0, 100.5, 101.5, 181.5])
    monkeypatch.setattr(stop_check.time, "monotonic", lambda: next(clock))
    gathered = []
    monkeypatch.setattr(stop_check.distributed, "gather_rows",
                        lambda row: gathered.append(row) or [row, [0.0, row[1] * 2]])  # rank 1 twice as slow
    check = stop_check.StopCheck(preemption.StopRequest(), max_interval=5, latency_s=5.0, step=10)
    assert check.at(10) is None
    assert check.at(11) == [0, 0]  # the first check: after the first step (0.5 s; the slowest rank 1 s)
    assert check.interval == 5  # 5 s / 1 s, capped at 5
    assert [check.at(s) for s in (12, 13, 14, 15)] == [None] * 4
    assert check.at(16) == [0, 0]  # 1 s for 5 steps: 0.2 s, slowest 0.4 s -> 12 steps, capped at 5
    assert check.interval == 5
    assert check.at(21) == [0, 0]  # 80 s for 5 steps: 16 s per step (32 s on rank 1) -> every step
    assert check.interval == 1
    assert gathered[-1] == [0.0, 16.0]


def test_stale_shm_buffers_are_removed_and_live_ones_kept(tmp_path: Path, monkeypatch) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    stale = shm / f"deepspeed_allreduce_buffer_gpdtest_{os.getpid()}_stale_0"
    young = shm / f"deepspeed_allreduce_buffer_gpdtest_{os.getpid()}_young_0"
    mapped = shm / f"deepspeed_allreduce_buffer_gpdtest_{os.getpid()}_mapped_0"
    for p in (stale, young, mapped):
        p.write_bytes(b"\0" * 4096)
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(mapped, (old, old))
    import mmap

    with mapped.open("r+b") as f, mmap.mmap(f.fileno(), 4096):
        try:
            removed = distributed.remove_stale_shm_buffers()
            assert stale in removed
            assert not stale.exists()
            assert young.exists()
            assert mapped.exists()
        finally:
            for p in (stale, young, mapped):
                p.unlink(missing_ok=True)


def test_a_long_wait_is_named_while_it_lasts(capsys) -> None:
    """Whatever start-up waits on for more than ~10 s (a rendezvous, an op build, W&B) is named while it waits."""
    import time

    from gpd_ds.progress import named_while_waiting

    asked = []
    with named_while_waiting(lambda: asked.append(1) or "the rendezvous of 2 ranks at h:1", after_s=0.1,
                             every_s=0.2):
        time.sleep(0.45)
    time.sleep(0.3)  # nothing after the block ends
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == len(asked) == 2
    assert lines[0].startswith("gpd_ds rank ")
    assert lines[0].endswith(" s for the rendezvous of 2 ranks at h:1")


def test_a_setting_newer_than_the_checkpoint_at_its_default_is_no_change(caplog) -> None:
    """Resuming a checkpoint written before a setting existed: the new setting at its default keeps the earlier
    behaviour, so it is not listed among the changes (a changed value still is)."""
    from gpd_ds.checkpoint import Marker, check_compatible

    config = json.loads(json.dumps(TrainConfig().to_dict(), default=str))
    old = json.loads(json.dumps(config))
    del old["loss"]["dist_beta"], old["model"]["zero_init_last"]
    old["optim"]["lr"] = 0.2
    with caplog.at_level("WARNING", logger="gpd_ds.checkpoint"):
        check_compatible(Marker(Path("step000000005"), 5, 1, 2, None, old), config, 2)
    assert "continuing with the new values: optim.lr 0.2 -> 0.1" in caplog.text
    assert "dist_beta" not in caplog.text
    assert "zero_init_last" not in caplog.text
    config["loss"]["dist_beta"] = 2.0
    caplog.clear()
    with caplog.at_level("WARNING", logger="gpd_ds.checkpoint"):
        check_compatible(Marker(Path("step000000005"), 5, 1, 2, None, old), config, 2)
    assert "loss.dist_beta None -> 2.0" in caplog.text


def test_tap_lists_newer_than_the_checkpoint_resume_and_changed_taps_are_refused(tmp_path: Path) -> None:
    """A checkpoint from before loss.student_taps existed resumes (its connectors read the default taps); changing
    the taps or the feature loss changes the connectors' tensors and is refused."""
    config = json.loads(json.dumps(TrainConfig().to_dict(), default=str))
    old = json.loads(json.dumps(config))
    del old["loss"]["student_taps"], old["loss"]["teacher_taps"]
    check_compatible(_marker(tmp_path, old), config, zero_stage=2)
    config["loss"]["student_taps"] = ["stages.1"]
    with pytest.raises(IncompatibleCheckpointError, match=r"loss.student_taps: None in the checkpoint, "):
        check_compatible(_marker(tmp_path, old), config, zero_stage=2)
    before, after = TrainConfig().to_dict(), TrainConfig().to_dict()
    before["loss"]["kd"], after["loss"]["kd"] = "dkd+reviewkd", "dkd+fitnet"
    with pytest.raises(IncompatibleCheckpointError, match=r"loss.kd: 'dkd\+reviewkd' in the checkpoint"):
        check_compatible(_marker(tmp_path, before), after, zero_stage=2)
    after["loss"]["kd"] = "kl+reviewkd"  # the same connectors: a change of the logit term only
    check_compatible(_marker(tmp_path, before), after, zero_stage=2)
