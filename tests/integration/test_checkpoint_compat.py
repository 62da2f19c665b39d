"""A run started with gpd_ds 0.2.x resumes under this version and continues exactly as it would have.

``tests/fixtures/run_v0_2/`` is a run directory written by gpd_ds 0.2.0 (commit 53d03ad): the demo recipe on the
small test data, a 4/8-channel ``test_resnet`` student (a checkpoint under 1 MB), stopped by run.max_steps=5 with its
checkpoint at step 5 (EMA, best weights, data position, RNG in the 0.2.x client-state layout).
``uninterrupted_metrics.jsonl`` is the same run trained by 0.2.0 to step 10 without a stop. The data and the static
teacher are remade here from the same seeds.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from gpd_ds.checkpoint import complete_checkpoints
from gpd_ds.export import run_weights
from gpd_ds.safeload import load_file
from tests.integration.launch_helpers import check, overrides, single, train_losses, workspace_with_data

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "run_v0_2"
STUDENT_KWARGS = json.dumps({"channels": [4, 4, 8, 8], "stem_width": 4})


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def resumed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = workspace_with_data(tmp_path_factory.mktemp("compat"))
    run = tmp / "run"
    shutil.copytree(FIXTURE, run)
    (run / "uninterrupted_metrics.jsonl").unlink()
    ema, meta = run_weights(run, "last_ema")  # export reads the 0.2.x layout too
    assert meta == {"weights": "ema", "step": 5}
    assert ema
    args = overrides(tmp / "data", **{"model.static_teacher_checkpoint": tmp / "teacher.safetensors",
                                      "run.max_steps": 10, "model.student_kwargs": STUDENT_KWARGS})
    check(single(tmp, ["--run-dir", str(run), *args]))
    return run


@pytest.mark.slow
def test_a_0_2_checkpoint_resumes_exactly_as_the_uninterrupted_0_2_run(resumed: Path) -> None:
    expected = _rows(FIXTURE / "uninterrupted_metrics.jsonl")
    assert train_losses(resumed) == [(r["step"], r["train/loss"]) for r in expected if "train/loss" in r]
    evals = [{k: v for k, v in r.items() if k.endswith("/top1")} for r in _rows(resumed / "metrics.jsonl")
             if "eval/student/top1" in r]
    assert evals[-1] == {k: v for k, v in expected[-1].items() if k.endswith("/top1")}
    assert evals[-1]["eval/static_teacher/top1"] == 10.0  # remembered from 0.2.x's "kept", not measured again


@pytest.mark.slow
def test_the_resumed_run_writes_the_new_layout_and_keeps_its_lineage(resumed: Path) -> None:
    newest = complete_checkpoints(resumed / "checkpoints")[0]
    assert newest.name == "step000000010"
    old = json.loads((FIXTURE / "checkpoints/step000000005/gpd_complete.json").read_text())
    assert json.loads((newest / "gpd_complete.json").read_text())["lineage"] == old["lineage"]
    client = load_file(newest / "mp_rank_00_model_states.pt")
    assert client["state_version"] == 2
    assert set(client["state"]) == {"ranks", "ema", "best", "evaluator", "tracker", "lineage"}
    assert client["state"]["lineage"] == old["lineage"]
    assert all(isinstance(v, torch.Tensor) for v in client["state"]["ema"]["whole"].values())
