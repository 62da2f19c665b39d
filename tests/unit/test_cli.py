"""`gpd-ds inspect` prints sizes, GMACs and IR error; bad names exit with a clear error."""

from __future__ import annotations

import os
import re

import pytest

from gpd_ds.cli import main


def test_inspect_prints_sizes_gmacs_and_ir_error(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--student", "torchvision:resnet18", "--image-size", "64"]) == 0
    out = capsys.readouterr().out
    student = re.search(r"^student\s+([\d.]+)\s+([\d.]+)  \(params: the exported plain model\)$", out, re.M)
    teacher = re.search(r"^dynamic teacher\s+([\d.]+)\s+([\d.]+)  \(params: trained tensors\)$", out, re.M)
    assert float(student.group(1)) == pytest.approx(11.69, abs=0.01)
    assert float(teacher.group(1)) == pytest.approx(45.69, abs=0.01)
    # GMACs scale with the image: 1.814 at 224 px -> (64/224)^2 of that, teacher about 3.9x
    assert float(student.group(2)) == pytest.approx(1.814 * (64 / 224) ** 2, rel=0.02)
    assert 3.5 < float(teacher.group(2)) / float(student.group(2)) < 4.0
    error = re.search(r"teacher vs student ([\de.+-]+), student vs source ([\de.+-]+)", out)
    assert float(error.group(1)) < 1e-3
    assert float(error.group(2)) == 0.0


def test_inspect_vit_with_branches(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--student", "deit_tiny_patch16_224", "--image-size", "32", "--branches"]) == 0
    assert "dynamic teacher" in capsys.readouterr().out


def test_inspect_unknown_model_exits_2(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--student", "resnet81"]) == 2
    assert "unknown model 'resnet81'" in capsys.readouterr().err


def test_inspect_with_branches_labels_exported_parameters_and_branch_tensors(capsys: pytest.CaptureFixture) -> None:
    assert main(["inspect", "--student", "resnet18", "--image-size", "32", "--branches"]) == 0
    out = capsys.readouterr().out
    student = re.search(r"^student\s+([\d.]+)\s+[\d.]+\s+\(params: the exported plain model\)$", out, re.M)
    assert float(student.group(1)) == pytest.approx(11.69, abs=0.01)  # resnet18, not its branch tensors
    assert re.search(r"^dynamic teacher\s+[\d.]+\s+[\d.]+\s+\(params: trained tensors\)$", out, re.M)
    branch = re.search(r"the student view trains ([\d.]+) M branch tensors, merged into 11.69 M", out)
    assert float(branch.group(1)) > 30


def test_eval_workers_default_to_the_cores_this_process_may_use() -> None:
    from gpd_ds.cli import available_cores, build_parser

    assert build_parser().parse_args(["eval", "x", "--data", "d"]).workers is None  # resolved when it runs
    assert 1 <= available_cores() <= (os.cpu_count() or 1)


def test_recipes_lists_every_recipe_with_scenario_teachers_epochs_and_paper(capsys: pytest.CaptureFixture) -> None:
    from gpd_ds.recipes import RECIPES

    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for name, build in RECIPES.items():
        cfg = build()
        row = next(line for line in out.splitlines() if line.split()[:1] == [name])
        assert cfg.model.student in row
        assert (cfg.model.static_teacher or "-") in row
        assert f"  {cfg.optim.epochs}  " in row
        assert build.paper in row
        # the listed scenario is the config's, except where the user supplies the student's weights
        expected = {"distill": "(a)", "scratch": "(b)", "finetune": "(c)"}[cfg.scenario]
        assert build.scenario.startswith((expected, "plain", "(c)"))
    assert "DKD 71.70 -> DKD + GPD 72.71" in out
    assert main(["recipes", "--markdown"]) == 0
    assert "| `resnet18_from_resnet34` | (a) static teacher |" in capsys.readouterr().out


def test_train_help_names_the_recipes_without_importing_torch() -> None:
    import subprocess
    import sys
    import time

    from gpd_ds.recipes import RECIPES

    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "gpd_ds.cli", "train", "--help"], capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    assert done.returncode == 0, done.stderr
    for name in RECIPES:
        assert f"  {name} " in done.stdout
    assert "--deepspeed_config" in done.stdout
    print(f"gpd-ds train --help: {elapsed:.2f} s in a fresh interpreter")  # measured, not asserted (-s shows it)
    probe = "import sys, gpd_ds.train_cli; print(sorted(m for m in ('torch', 'timm', 'deepspeed') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"


def test_output_into_a_closed_pipe_exits_quietly() -> None:
    """`gpd-ds recipes | head -1`: the reader is gone before the table is written; no traceback, shell's 141."""
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the child starts: its first flush must meet EPIPE, every time
    try:
        done = subprocess.run([sys.executable, "-m", "gpd_ds.cli", "recipes"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "Exception ignored" not in done.stderr, done.stderr
