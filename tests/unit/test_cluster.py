"""Preflight checks of the launch scripts: hostfile, GPU count, data visibility."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gpd_ds.cluster import PreflightError, check_data, check_gpus, parse_hostfile


def test_hostfile_is_parsed(tmp_path: Path) -> None:
    f = tmp_path / "hostfile"
    f.write_text("# two nodes\nnode-a slots=8\n\nnode-b slots=8  # the second\n")
    assert parse_hostfile(f) == {"node-a": 8, "node-b": 8}


@pytest.mark.parametrize(("text", "match"), [
    (None, "does not exist"),
    ("node-a 8\n", r"hostfile .*:1: 'node-a 8' is not '<host> slots=<gpus>'"),
    ("node-a slots=8\nnode-a slots=8\n", "listed twice"),
    ("node-a slots=0\n", "slots=0; use >= 1"),
    ("# nothing\n", "lists no hosts"),
])
def test_bad_hostfiles(tmp_path: Path, text: str | None, match: str) -> None:
    f = tmp_path / "hostfile"
    if text is not None:
        f.write_text(text)
    with pytest.raises(PreflightError, match=match):
        parse_hostfile(f)


def _fake_nvidia_smi(tmp_path: Path, gpus: int, monkeypatch: pytest.MonkeyPatch) -> None:
    script = tmp_path / "nvidia-smi"
    lines = "\n".join(f"echo 'GPU {i}: NVIDIA A100-SXM4-80GB (UUID: GPU-{i})'" for i in range(gpus))
    script.write_text(f"#!/bin/sh\n{lines}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def test_fewer_gpus_than_requested_fails(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_nvidia_smi(tmp_path, 2, monkeypatch)
    assert check_gpus(2, allow_cpu=False) == "2 GPU(s) visible, 2 used"
    with pytest.raises(PreflightError, match="has 2 GPU\\(s\\) but 4 requested"):
        check_gpus(4, allow_cpu=False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    with pytest.raises(PreflightError, match="has 1 GPU\\(s\\) but 2 requested"):
        check_gpus(2, allow_cpu=False)


def test_no_gpu_needs_an_explicit_cpu_rehearsal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(PreflightError, match=r"no GPU visible .* GPD_DS_ALLOW_CPU=1"):
        check_gpus(8, allow_cpu=False)
    assert "CPU" in check_gpus(8, allow_cpu=True)


def test_data_must_be_visible(tmp_path: Path) -> None:
    with pytest.raises(PreflightError, match=r"is not visible on .*no .*_info.json"):
        check_data(str(tmp_path))
    (tmp_path / "_info.json").write_text(json.dumps({"splits": {"train": {"filenames": ["a.tar", "b.tar"]}}}))
    (tmp_path / "a.tar").write_bytes(b"")
    with pytest.raises(PreflightError, match=r"missing on .*\['b.tar'\]"):
        check_data(str(tmp_path))
    (tmp_path / "b.tar").write_bytes(b"")
    assert "visible" in check_data(str(tmp_path))
    assert "not checked" in check_data("https://example.org/wds")
