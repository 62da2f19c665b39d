"""The ecosystem around a run, offline: gpd-ds export --hf-dir / --push-to-hub (timm's hub layout, loaded back by
timm alone), and gpd-ds wandb-dashboard (the workspace view, built against the metric names a run logs)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch

from gpd_ds.cli import main as cli_main
from gpd_ds.export import load_exported
from tests.integration.launch_helpers import NUM_CLASSES, check, overrides, single, workspace_with_data


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = workspace_with_data(tmp_path_factory.mktemp("hub"))
    run = tmp / "run"
    args = overrides(tmp / "data", **{"model.static_teacher_checkpoint": tmp / "teacher.safetensors",
                                      "optim.epochs": 1})
    check(single(tmp, ["--run-dir", str(run), *args]))
    return run


def _last_eval(run: Path) -> dict:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return next(r for r in reversed(rows) if "eval/student/top1" in r)


@pytest.mark.slow
def test_hf_dir_loads_with_timm_alone_and_gives_the_exported_logits(run: Path, tmp_path: Path, capsys) -> None:
    out, hf = tmp_path / "student.safetensors", tmp_path / "hub"
    assert cli_main(["export", str(run), "--out", str(out), "--hf-dir", str(hf)]) == 0
    assert "local-dir:" in capsys.readouterr().out
    assert {"config.json", "model.safetensors", "README.md"} <= {p.name for p in hf.iterdir()}
    assert not list(hf.glob("*.bin"))  # no pickled weights
    config = json.loads((hf / "config.json").read_text())
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert config["architecture"] == "test_resnet"
    assert config["num_classes"] == NUM_CLASSES
    assert config["label_names"] == sidecar["classes"]
    pre = config["pretrained_cfg"]
    assert tuple(pre["input_size"]) == (3, 32, 32)
    assert pre["mean"] == pytest.approx(sidecar["mean"])
    assert pre["std"] == pytest.approx(sidecar["std"])
    assert pre["crop_pct"] == sidecar["crop_pct"]
    assert pre["interpolation"] == sidecar["interpolation"]

    loaded = timm.create_model(f"local-dir:{hf}", pretrained=True).eval()
    exported, _ = load_exported(out)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), exported(x), rtol=0, atol=0)
    data = timm.data.resolve_data_config({}, model=loaded)
    assert data["input_size"] == (3, 32, 32)
    assert data["crop_pct"] == sidecar["crop_pct"]


@pytest.mark.slow
def test_the_model_card_holds_the_runs_numbers(run: Path, tmp_path: Path) -> None:
    assert cli_main(["export", str(run), "--hf-dir", str(tmp_path / "hub")]) == 0
    card = (tmp_path / "hub" / "README.md").read_text()
    last = _last_eval(run)
    record = json.loads((run / "config.json").read_text())
    for model in ("student", "dynamic_teacher", "static_teacher"):
        assert f"{model.replace('_', ' ')}: {last[f'eval/{model}/top1']:.2f}" in card
    assert "recipe `demo`" in card
    assert "scenario distill" in card
    assert f"{record['total_steps']} optimizer steps" in card
    assert "widened 2x by inverse reparameterization" in card
    assert "arXiv:2410.04140" in card
    assert card.startswith("---\n")  # the hub's metadata block


def test_push_to_hub_without_a_token_fails_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login either
    assert cli_main(["export", str(tmp_path / "no-run"), "--push-to-hub", "lab/model"]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err


def test_push_to_hub_offline_fails_before_any_work(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: what an offline machine sees
    assert cli_main(["export", str(tmp_path / "no-run"), "--push-to-hub", "lab/model"]) == 2
    err = capsys.readouterr().err
    assert "cannot be reached" in err
    assert "nothing was exported" in err


@pytest.mark.parametrize("repo", ["model", "a/b/c", "/model"])
def test_push_to_hub_needs_an_org_and_a_name(tmp_path: Path, repo: str, capsys) -> None:
    assert cli_main(["export", str(tmp_path), "--push-to-hub", repo]) == 2
    assert "use ORG/NAME" in capsys.readouterr().err


def test_export_without_a_target_says_which_flags_exist(tmp_path: Path, capsys) -> None:
    assert cli_main(["export", str(tmp_path)]) == 2
    assert "--out FILE.safetensors, --hf-dir DIR" in capsys.readouterr().err


@pytest.mark.slow
def test_the_wandb_dashboard_builds_offline_from_the_metrics_a_run_logs(run: Path, monkeypatch, capsys) -> None:
    from gpd_ds import dashboard

    logged = set().union(*(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()))
    gpu_only = {"train/gpu_mem_gb"}
    assert dashboard.metric_names() - gpu_only <= logged | {"best/student_top1"}  # the summary key
    view = dashboard.build("my-team", "gpd_ds")
    assert [s.name for s in view.sections] == ["Dynamic teacher growth", "EMA", "Loss terms", "System"]
    growth = view.sections[0].panels[0]
    assert growth.x == "epoch"
    assert growth.y == ["eval/static_teacher/top1", "eval/dynamic_teacher/top1", "eval/student/top1"]
    assert "eval/dynamic_teacher/replica_divergence" in dashboard.metric_names()
    assert view._to_model().model_dump_json()  # the whole view converts to what W&B's API receives
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert cli_main(["wandb-dashboard", "--entity", "my-team", "--project", "gpd_ds"]) == 0
    out = capsys.readouterr().out
    assert "Dynamic teacher: replica divergence" in out
    assert "nothing was saved" in out


@pytest.mark.slow
def test_replica_divergence_is_logged_and_grows_from_ir(run: Path) -> None:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    key = "eval/dynamic_teacher/replica_divergence"
    values = [r[key] for r in rows if key in r]
    assert len(values) >= 2
    assert values[0] < 1e-3  # at IR the replicas differ only by the symmetry-breaking noise
    assert values[-1] > 10 * values[0]
