"""Summarise experiments/cifar10/run.sh: the results table (markdown) and the report plots.

    python experiments/cifar10/summarize.py runs/cifar10 [--images docs/images]

Reads every run's metrics.jsonl. Accuracies are the **last** evaluation (end of training), not the best one: the
test split is the only held-out data, so picking the best evaluation would select on it. Prints the table and
writes it to OUT/results.md; renders `gpd-ds report` plots of the GPD runs into OUT/report_* and copies the ones
the results page shows into --images.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
from pathlib import Path

from gpd_ds.report import load_metrics, render

ARMS = [  # (scenario, arm label, run-name prefix)
    ("(a) static teacher", "student CE only", "a_ce"),
    ("(a) static teacher", "KD", "a_kd"),
    ("(a) static teacher", "DKD", "a_dkd"),
    ("(a) static teacher", "KD + GPD", "a_kd_gpd"),
    ("(a) static teacher", "DKD + GPD", "a_dkd_gpd"),
    ("(b) from scratch", "baseline (= CE only)", "a_ce"),
    ("(b) from scratch", "GPD", "b_gpd"),
    ("(c) fine-tuning", "plain fine-tuning", "c_plain"),
    ("(c) fine-tuning", "GPD fine-tuning", "c_gpd"),
]


def _last(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if key in r]
    return values[-1] if values else None


def _stats(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _run(run_dir: Path) -> dict:
    rows = load_metrics(run_dir)
    rates = [r["train/images_per_s"] for r in rows if "train/images_per_s" in r]
    return {"student": _last(rows, "eval/student/top1"), "dynamic": _last(rows, "eval/dynamic_teacher/top1"),
            "static": _last(rows, "eval/static_teacher/top1"), "wall_min": rows[-1]["time"] / 60 if rows else None,
            "img_s": statistics.median(rates) if rates else None}


def table(root: Path) -> str:
    runs = {}
    for d in sorted((root / "runs").iterdir()):
        if (d / "export" / "student.safetensors").is_file():  # finished runs only
            runs[d.name] = _run(d)
    lines = ["| scenario | arm | seeds | student top-1 | per seed | dynamic teacher top-1 | static teacher top-1 "
             "| wall-clock (min) | train img/s |", "|---|---|---|---|---|---|---|---|---|"]
    for scenario, label, prefix in ARMS:
        names = sorted(n for n in runs if re.fullmatch(rf"{prefix}_s\d+", n))
        got = [runs[n] for n in names if runs[n]["student"] is not None]
        if not got:
            continue
        col = {k: [g[k] for g in got if g[k] is not None] for k in got[0]}
        lines.append(f"| {scenario} | {label} | {len(got)} | {_stats(col['student'])} | "
                     f"{', '.join(f'{v:.2f}' for v in col['student'])} | {_stats(col['dynamic'])} | "
                     f"{_stats(col['static'])} | {_stats(col['wall_min'])} | {_stats(col['img_s'])} |")
    if "teacher" in runs:
        t = runs["teacher"]
        lines.append(f"| teacher | cifar_resnet18, CE | 1 | {t['student']:.2f} | | | | {t['wall_min']:.1f} | "
                     f"{t['img_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="OUT of run.sh (holds runs/)")
    parser.add_argument("--images", type=Path, default=None, help="copy the shown plots here (docs/images)")
    args = parser.parse_args()
    text = table(args.root)
    (args.root / "results.md").write_text(text + "\n")
    print(text)
    runs = args.root / "runs"
    reports = {  # plot name -> (runs, labels)
        "growth": (["a_dkd_gpd_s1"], ["DKD+GPD seed 1"]),
        "distill": (["a_dkd_s1", "a_dkd_gpd_s1"], ["DKD", "DKD+GPD"]),
        "scratch": (["a_ce_s1", "b_gpd_s1"], ["CE only", "GPD from scratch"]),
        "finetune": (["c_plain_s1", "c_gpd_s1"], ["plain fine-tuning", "GPD fine-tuning"]),
    }
    for name, (dirs, labels) in reports.items():
        paths = [runs / d for d in dirs]
        if not all((p / "metrics.jsonl").is_file() for p in paths):
            continue
        pngs, _ = render(paths, args.root / f"report_{name}", labels)
        if args.images is not None:
            args.images.mkdir(parents=True, exist_ok=True)
            for png in pngs:
                if png.stem == "accuracy" or (png.stem == "gaps" and name == "growth"):
                    shutil.copy(png, args.images / f"cifar10_{name}_{png.stem}.png")


if __name__ == "__main__":
    main()
