"""gpd-ds report: every loss term of a run gets a line of its own look."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt

from gpd_ds import report
from gpd_ds.report import render, term_lines

TERMS = ["train/loss", "train/ce_student", "train/ce_dynamic_teacher", "train/kd_static_to_student",
         "train/kd_static_to_dynamic_teacher", "train/sce_dynamic_to_student", "train/reviewkd_static_to_student",
         "train/reviewkd_static_to_dynamic_teacher"]


def test_every_term_has_its_own_line_style_and_marker() -> None:
    lines = term_lines(TERMS)
    assert [k for k, *_ in lines] == TERMS
    assert len({(style, marker) for _, _, style, marker in lines}) == len(TERMS)
    assert lines[0][1] == "loss"  # labelled without the train/ prefix


def test_the_losses_plot_of_one_run_draws_each_term_in_its_own_colour_and_style(tmp_path: Path, monkeypatch) -> None:
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": s, "epoch": s / 10, **{k: 1.0 / (s + i) for i, k in enumerate(TERMS)}} for s in range(1, 21)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn: dict[str, list] = {}
    savefig = plt.Figure.savefig

    def keep(fig, path, *args, **kwargs):  # read the lines of each figure as it is saved
        drawn[Path(path).name] = [(ln.get_color(), ln.get_linestyle(), ln.get_marker()) for ln in fig.axes[0].lines]
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(plt.Figure, "savefig", keep)
    render([run], tmp_path / "out")
    assert len(drawn["losses.png"]) == len(TERMS)
    assert len(set(drawn["losses.png"])) == len(TERMS)
    assert len({colour for colour, _, _ in drawn["losses.png"]}) == len(TERMS)
    assert report.TERM_STYLES[0] == "-"
