"""``gpd-ds report RUN_DIR [RUN_DIR ...]``: PNG plots and a self-contained HTML page from ``metrics.jsonl``.

Plots: the accuracies of the static teacher, the dynamic teacher and the student over epochs (the dynamic
teacher's growth), the two gaps, the loss terms, the learning rate and the throughput. Several runs are overlaid
(one colour per run), e.g. KD against GPD.
"""

from __future__ import annotations

import base64
import html
import logging
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after selecting the headless backend

from gpd_ds.errors import UserInputError
from gpd_ds.tracking import read_metrics

log = logging.getLogger(__name__)

MODELS = (("static_teacher", "static teacher", ":"), ("dynamic_teacher", "dynamic teacher", "--"),
          ("student", "student", "-"))
GAPS = (("eval/gap/static_minus_dynamic", "static - dynamic", "--"),
        ("eval/gap/dynamic_minus_student", "dynamic - student", "-"))


class ReportError(UserInputError, ValueError):
    """A run directory cannot be reported on."""


def load_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{str(run_dir)!r} has no metrics.jsonl; pass run directories written by gpd-ds train")
    try:
        rows, torn = read_metrics(path)
    except ValueError as e:
        raise ReportError(str(e)) from e
    if torn:
        log.warning("%s: the last line is incomplete (the run was killed while writing it); left out", path)
    return rows


def _series(rows: list[dict], key: str, x: str) -> tuple[list[float], list[float]]:
    points = [(r[x], r[key]) for r in rows if key in r and x in r]
    return [p[0] for p in points], [p[1] for p in points]


# line styles and markers that tell the terms of one run apart (its colour tells the runs apart)
TERM_STYLES = ("-", "--", ":", "-.")
TERM_MARKERS = (None, "s", "^", "x")


def term_lines(keys: list[str]) -> list[tuple[str, str, str, str | None]]:
    """(key, label, linestyle, marker) for each loss term: a style of its own, cycling styles, then markers."""
    return [(k, k.removeprefix("train/"), TERM_STYLES[i % len(TERM_STYLES)],
             TERM_MARKERS[i // len(TERM_STYLES) % len(TERM_MARKERS)]) for i, k in enumerate(keys)]


def _plot(runs: dict[str, list[dict]], out: Path, title: str, ylabel: str, lines: list[tuple], x: str) -> Path | None:
    """One figure: for every run, every (key, label, linestyle[, marker]) in ``lines`` against ``x``. Colour is
    per run, or per line where a single run draws several (the loss terms)."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    drawn = 0
    colour_per_line = len(runs) == 1 and len(lines) > 1
    for i, (name, rows) in enumerate(runs.items()):
        for j, (key, label, style, *marker) in enumerate(lines):
            xs, ys = _series(rows, key, x)
            if xs:
                dot = marker[0] if marker else ("o" if len(xs) < 30 else None)
                ax.plot(xs, ys, style, color=f"C{j if colour_per_line else i}", marker=dot, markersize=3,
                        markevery=max(1, len(xs) // 12), label=f"{name}: {label}" if len(runs) > 1 else label)
                drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def render(run_dirs: list[Path], out_dir: Path, labels: list[str] | None = None) -> tuple[list[Path], Path]:
    """Write the PNGs and ``report.html`` into ``out_dir``; return (pngs, html path)."""
    if labels and len(labels) != len(run_dirs):
        raise ReportError(f"{len(labels)} labels for {len(run_dirs)} runs; give one label per run")
    names = labels or [Path(d).name for d in run_dirs]
    runs = dict(zip(names, (load_metrics(d) for d in run_dirs), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)
    train_keys = sorted({k for rows in runs.values() for r in rows for k in r if k.startswith("train/")})
    term_keys = [k for k in train_keys if k not in ("train/lr", "train/images_per_s", "train/data_wait",
                                                    "train/bad_samples", "train/grad_norm", "train/loss_scale",
                                                    "train/skipped_steps", "train/gpu_mem_gb")]
    figures = [
        _plot(runs, out_dir / "accuracy.png", "Top-1: static teacher, dynamic teacher, student", "top-1 (%)",
              [(f"eval/{m}/top1", label, style) for m, label, style in MODELS], "epoch"),
        _plot(runs, out_dir / "gaps.png", "Gaps between the models", "top-1 difference (points)",
              list(GAPS), "epoch"),
        _plot(runs, out_dir / "divergence.png", "Replica divergence of the dynamic teacher (0 at IR: a tiled student)",
              "relative spread of the replicas", [("eval/dynamic_teacher/replica_divergence", "replica divergence",
                                                   "-")], "epoch"),
        _plot(runs, out_dir / "ema.png", "Top-1 of the EMA weights", "top-1 (%)",
              [("eval/dynamic_teacher_ema/top1", "dynamic teacher EMA", "--"),
               ("eval/student_ema/top1", "student EMA", "-")], "epoch"),
        _plot(runs, out_dir / "losses.png", "Training loss terms", "loss",
              term_lines(term_keys), "step"),
        _plot(runs, out_dir / "lr.png", "Learning rate", "lr", [("train/lr", "lr", "-")], "step"),
        _plot(runs, out_dir / "throughput.png", "Throughput", "images/s",
              [("train/images_per_s", "images/s", "-")], "step"),
    ]
    pngs = [f for f in figures if f is not None]
    page = out_dir / "report.html"
    page.write_text(_html(runs, pngs))
    return pngs, page


def _final(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r]
    if not values:
        return "-"
    v = values[-1]
    return f"{v:.2f}" if v == 0 or abs(v) >= 0.01 else f"{v:.2e}"  # the replica divergence starts near 1e-5


def _html(runs: dict[str, list[dict]], pngs: list[Path]) -> str:
    cols = ["eval/static_teacher/top1", "eval/dynamic_teacher/top1", "eval/student/top1", "eval/student_ema/top1",
            "eval/gap/static_minus_dynamic", "eval/gap/dynamic_minus_student", "eval/dynamic_teacher/growth",
            "eval/dynamic_teacher/replica_divergence"]
    head = "".join(f"<th>{html.escape(c.removeprefix('eval/'))}</th>" for c in cols)
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{max((r['step'] for r in rows), default=0)}</td>"
        + "".join(f"<td>{_final(rows, c)}</td>" for c in cols) + "</tr>" for name, rows in runs.items())
    images = "".join(
        f'<figure><img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        f"</figure>" for p in pngs)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>gpd_ds report</title><style>"
            "body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
            "padding:4px 8px;text-align:right}img{max-width:100%}</style></head><body>"
            f"<h1>gpd_ds report</h1><h2>Final values</h2><table><tr><th>run</th><th>step</th>{head}</tr>{body}"
            f"</table><h2>Plots</h2>{images}</body></html>")
