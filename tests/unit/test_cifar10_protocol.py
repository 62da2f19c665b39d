"""experiments/cifar10: the protocol driver's bookkeeping and the summary's statistics (no training here)."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from tests.integration.launch_helpers import REPO

HERE = REPO / "experiments" / "cifar10"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"cifar10_{name}", HERE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


protocol, summarize = _module("protocol"), _module("summarize")


def test_the_t_interval_matches_a_hand_computed_one() -> None:
    # diffs 1..5: mean 3, sd sqrt(2.5), se sqrt(2.5/5) = 0.7071, t(0.975, 4) = 2.776
    mean, low, high = summarize.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0
    assert high - mean == pytest.approx(2.776 * 0.70711, rel=1e-4)
    assert mean - low == pytest.approx(high - mean)
    assert summarize.t_interval([0.5]) is None


def test_t_quantiles_are_students() -> None:
    # spot values of the two-sided 95% quantile (any statistics table)
    assert summarize.T975[1] == 12.706
    assert summarize.T975[4] == 2.776
    assert summarize.T975[9] == 2.262


def _result(arm: str, seed: int, student: float, digest: str, dynamic: float | None = None) -> dict:
    final = {"epoch": 15.0, "step": 1170, "student": student}
    if dynamic is not None:
        final["dynamic_teacher"] = dynamic
    return {"arm": arm, "scenario": arm[0], "label": arm, "seed": seed, "protocol_digest": digest,
            "evals": [final], "final": final, "wall_clock_s": 60.0, "train_images_per_s": 100.0}


def test_comparisons_pair_by_seed_and_count_the_gains(tmp_path: Path) -> None:
    digest = protocol.protocol_digest()
    base = {1: 60.0, 2: 61.0, 3: 59.0, 4: 60.5, 5: 62.0}
    gain = {1: 0.5, 2: 1.0, 3: -0.2, 4: 0.8, 5: 0.6}
    for seed in base:
        (tmp_path / f"a_dkd_s{seed}.json").write_text(json.dumps(_result("a_dkd", seed, base[seed], digest)))
        (tmp_path / f"a_dkd_gpd_s{seed}.json").write_text(json.dumps(
            _result("a_dkd_gpd", seed, base[seed] + gain[seed], digest, dynamic=base[seed] + 2)))
    arms, teacher = summarize.load(tmp_path)
    assert teacher is None
    seeds, diffs = summarize.paired(arms["a_dkd"], arms["a_dkd_gpd"])
    assert seeds == [1, 2, 3, 4, 5]
    assert diffs == pytest.approx(list(gain.values()))
    row = next(line for line in summarize.comparison_table(arms).splitlines() if "DKD -> DKD + GPD" in line)
    assert f"{statistics.mean(gain.values()):+.2f}" in row
    assert "| 4/5 |" in row


def test_results_of_two_protocols_are_not_summarised_together(tmp_path: Path) -> None:
    (tmp_path / "a_ce_s1.json").write_text(json.dumps(_result("a_ce", 1, 60.0, "aaaa")))
    (tmp_path / "a_ce_s2.json").write_text(json.dumps(_result("a_ce", 2, 60.0, "bbbb")))
    with pytest.raises(SystemExit, match="mixes protocols"):
        summarize.load(tmp_path)


def test_every_arm_the_comparisons_name_is_in_the_protocol() -> None:
    names = {a.name for a in protocol.ARMS}
    for _, _, base, treat, _ in summarize.COMPARISONS:
        assert {base, treat} <= names


def test_the_teacher_digest_ignores_the_students_schedule(monkeypatch) -> None:
    teacher, student = protocol.protocol_digest(teacher=True), protocol.protocol_digest()
    monkeypatch.setitem(protocol.PROTOCOL, "epochs", protocol.PROTOCOL["epochs"] + 1)
    assert protocol.protocol_digest(teacher=True) == teacher
    assert protocol.protocol_digest() != student


def test_commands_differ_between_arms_only_in_the_arms_overrides(tmp_path: Path) -> None:
    ce, gpd = (protocol.command(next(a for a in protocol.ARMS if a.name == n), 3, tmp_path, tmp_path / n, 1)
               for n in ("a_ce", "b_gpd"))
    shared = [c for c in ce if c.startswith(("run.seed", "optim.epochs", "data.root", "run.eval_every"))]
    assert shared == [c for c in gpd if c.startswith(("run.seed", "optim.epochs", "data.root", "run.eval_every"))]
    assert "run.seed=3" in shared
    assert "model.method=plain" in ce
    assert "model.method=gpd" in gpd


def test_long_arms_train_their_cost_ratio_in_epochs_and_only_that_differs() -> None:
    arms = {a.name: a for a in protocol.ARMS}
    kd, kd_long = (protocol.command(arms[n], 2, Path("s"), Path("r"), 1) for n in ("a_kd", "a_kd_long"))
    assert "optim.epochs=20" in kd
    assert round(20 * protocol.COST_RATIO["kl"]) == 44
    assert "optim.epochs=44" in kd_long
    assert [c for c in kd if not c.startswith(("optim.epochs", "--run-dir")) and "a_kd" not in c] == \
        [c for c in kd_long if not c.startswith(("optim.epochs", "--run-dir")) and "a_kd" not in c]
    vit = protocol.command(arms["v_kd_gpd"], 2, Path("s"), Path("r"), 1)
    assert "model.student=vit_tiny_patch16_224" in vit
    assert "optim.optimizer=adamw" in vit


def test_results_of_each_precision_live_apart_and_are_not_summarised_together(tmp_path: Path) -> None:
    arm = next(a for a in protocol.ARMS if a.name == "a_kd")
    assert protocol.result_path(arm, 1, "bf16").parent.name == "results"
    assert protocol.result_path(arm, 1, "fp32").parent.name == "results_fp32"
    assert protocol.result_path(protocol.TEACHER_ARM, 0, "fp32").parent.name == "results"  # one static teacher
    assert protocol.ce_student(3, "fp32").name == "a_ce_s3_fp32.safetensors"
    digest = protocol.protocol_digest()
    for seed, enabled in ((1, True), (2, False)):
        r = _result("a_ce", seed, 60.0, digest)
        r["precision"] = {"enabled": enabled, "dtype": "bfloat16"} if enabled else {"enabled": False}
        (tmp_path / f"a_ce_s{seed}.json").write_text(json.dumps(r))
    with pytest.raises(SystemExit, match=r"mixes precisions \['bf16', 'fp32'\]"):
        summarize.load(tmp_path)


def test_the_cost_plot_places_each_arm_at_its_training_time(tmp_path: Path) -> None:
    digest = protocol.protocol_digest()
    for arm, epochs, rate in (("a_kd", 20, 600.0), ("a_kd_long", 44, 600.0), ("a_kd_gpd", 20, 280.0)):
        for seed in (1, 2):
            r = _result(arm, seed, 70.0 + seed, digest)
            r["final"]["epoch"], r["train_images_per_s"] = float(epochs), rate
            (tmp_path / f"{arm}_s{seed}.json").write_text(json.dumps(r))
    arms, _ = summarize.load(tmp_path)
    assert summarize.train_hours(arms["a_kd_long"][1]) == pytest.approx(44 * 10_000 / 600 / 3600)
    kd = summarize.cost_points(arms)[1]  # COST_CURVES[1]: KD at 20 and 44 epochs; top-1 71 and 72 on the 2 seeds
    half = 12.706 * statistics.stdev([71.0, 72.0]) / math.sqrt(2)  # the 95% t-interval's half-width, 1 d.f.
    assert kd == [pytest.approx((20 * 10_000 / 600 / 60, 71.5, half), rel=1e-4),
                  pytest.approx((44 * 10_000 / 600 / 60, 71.5, half), rel=1e-4)]
    assert summarize.cost_plot(arms, tmp_path / "img", "_x") == tmp_path / "img" / "cifar10_cost_x.png"
    assert (tmp_path / "img" / "cifar10_cost_x.png").stat().st_size > 0


def test_a_partial_plan_counts_its_own_arms_and_draws_only_the_growth_it_has(tmp_path: Path) -> None:
    digest = protocol.protocol_digest()
    for arm, seeds in (("a_kd", (1, 2, 3)), ("a_kd_gpd", (1, 2))):
        for seed in seeds:
            r = _result(arm, seed, 70.0, digest, dynamic=72.0 if arm.endswith("gpd") else None)
            (tmp_path / f"{arm}_s{seed}.json").write_text(json.dumps(r))
    arms, _ = summarize.load(tmp_path)
    assert summarize.status(arms, [1, 2, 3, 4, 5]) == "5 runs of 2 arms done; seeds every one of them has: 1, 2."
    # the extension's GPD arm is drawn; the first protocol's growth figure, with none of its arms here, is not
    assert summarize.curves(arms, tmp_path / "img", "_x") == [tmp_path / "img" / "cifar10_growth_extension_x.png"]
