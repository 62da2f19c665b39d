"""Summarise the CIFAR-10 protocol (experiments/cifar10/protocol.py) from its result files only.

    python experiments/cifar10/summarize.py [--results experiments/cifar10/results] [--images docs/images]
                                            [--doc docs/results_cifar10.md]

Prints (and writes to ``results/summary.md``) the per-arm table (mean, std over seeds, each seed), the paired
comparisons (mean of the per-seed differences, 95% t-interval over the seeds, seeds that gained) and the cost;
with ``--images``, the growth and gap curves (mean over seeds, per evaluation). Accuracies are the **last**
evaluation (end of training), never the best one: the test split is the only held-out data, so picking the best
evaluation would select on it. With ``--doc``, the summary replaces what lies between the page's
``<!-- results:begin -->`` and ``<!-- results:end -->`` lines (``results_fp32``'s for that directory; the rest of
the page is written by hand). One directory holds runs of one precision (bf16 or float32) and is summarised alone.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

HERE = Path(__file__).resolve().parent

# two-sided 95% quantiles of Student's t, by degrees of freedom (seeds - 1)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093, 20: 2.086}

# (group, question, baseline arm, treatment arm, paper's ImageNet difference)
COMPARISONS = (
    ("(a) static teacher", "CE -> KD", "a_ce", "a_kd", ""),
    ("(a) static teacher", "CE -> DKD", "a_ce", "a_dkd", ""),
    ("(a) static teacher", "KD -> KD + GPD", "a_kd", "a_kd_gpd", ""),
    ("(a) static teacher", "DKD -> DKD + GPD", "a_dkd", "a_dkd_gpd", "+1.01 (R34->R18), +1.58 (R50->MBv1)"),
    ("(b) from scratch", "CE -> GPD", "a_ce", "b_gpd", "+1.80 (R18)"),
    ("(c) fine-tuning", "plain -> GPD fine-tuning", "c_plain", "c_gpd", "+0.89 (R18)"),
    ("control: peer", "CE -> online peer", "a_ce", "b_peer", ""),
    ("control: peer", "online peer -> GPD", "b_peer", "b_gpd", ""),
    ("control: static teacher mode", "DKD + GPD: eval -> train mode", "a_dkd_gpd", "a_dkd_gpd_trainmode", ""),
    ("control: static teacher mode", "DKD -> DKD + GPD, train-mode teacher (post hoc)", "a_dkd",
     "a_dkd_gpd_trainmode", ""),
    ("control: branches", "GPD from scratch: plain IR -> branches", "b_gpd", "b_gpd_branches", ""),
    ("control: width", "GPD from scratch: r = 2 -> r = 4", "b_gpd", "b_gpd_r4", ""),
    # issue 34: equal compute (the KD / DKD arm trained as long as its GPD arm costs), and equal epochs at 44
    ("equal compute", "KD 44 ep -> KD + GPD 20 ep", "a_kd_long", "a_kd_gpd", ""),
    ("equal compute", "DKD 45 ep -> DKD + GPD 20 ep", "a_dkd_long", "a_dkd_gpd", ""),
    ("longer training", "KD 20 ep -> KD 44 ep", "a_kd", "a_kd_long", ""),
    ("longer training", "DKD 20 ep -> DKD 45 ep", "a_dkd", "a_dkd_long", ""),
    ("equal epochs, 44", "KD -> KD + GPD, 44 epochs", "a_kd_long", "a_kd_gpd_long", ""),
    ("longer training", "KD + GPD 20 ep -> 44 ep", "a_kd_gpd", "a_kd_gpd_long", ""),
    ("DIST", "CE -> DIST", "a_ce", "a_dist", ""),
    ("DIST", "DIST -> DIST + GPD", "a_dist", "a_dist_gpd", ""),
    ("ViT student", "CE -> KD", "v_ce", "v_kd", ""),
    ("ViT student", "KD -> KD + GPD", "v_kd", "v_kd_gpd", ""),
    ("ViT student", "CE -> GPD from scratch", "v_ce", "v_gpd", ""),
)


# the protocol's arms in its order (protocol.ARMS), and how the tables name the scenario letters
ORDER = ("a_ce", "a_kd", "a_dkd", "a_kd_gpd", "a_dkd_gpd", "b_gpd", "c_plain", "c_gpd", "b_peer",
         "a_dkd_gpd_trainmode", "b_gpd_branches", "b_gpd_r4", "a_kd_long", "a_dkd_long", "a_kd_gpd_long", "a_dist",
         "a_dist_gpd", "v_ce", "v_kd", "v_kd_gpd", "v_gpd")
SCENARIOS = {"a": "(a) static teacher", "b": "(b) from scratch", "c": "(c) fine-tuning"}


def load(results: Path) -> tuple[dict[str, dict[int, dict]], dict | None]:
    """{arm: {seed: result}} and the teacher's result; every file must come from one protocol."""
    arms: dict[str, dict[int, dict]] = {}
    teacher, digests, precisions = None, set(), set()
    for path in sorted(results.glob("*.json")):
        r = json.loads(path.read_text())
        if r["arm"] == "teacher":  # its digest covers the teacher's part of the protocol only
            teacher = r
        else:
            digests.add(r["protocol_digest"])
            precisions.add(precision(r))
            arms.setdefault(r["arm"], {})[r["seed"]] = r
    if len(digests) > 1:
        raise SystemExit(f"{results} mixes protocols {sorted(digests)}: summarise one protocol at a time")
    if len(precisions) > 1:
        raise SystemExit(f"{results} mixes precisions {sorted(precisions)}: a comparison pairs runs of one "
                         "precision (results/ bf16, results_fp32/ float32)")
    if teacher is None and (results.parent / "results" / "teacher.json").is_file():
        teacher = json.loads((results.parent / "results" / "teacher.json").read_text())  # one teacher for all
    return arms, teacher


def precision(r: dict) -> str:
    """bf16 or fp32: what the run's autocast was (older test fixtures record none: bf16, the protocol's)."""
    autocast = r.get("precision") or {"enabled": True}
    return "bf16" if autocast.get("enabled") else "fp32"


def final(r: dict, model: str = "student") -> float | None:
    return r["final"].get(model)


def mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def paired(base: dict[int, dict], treat: dict[int, dict]) -> tuple[list[int], list[float]]:
    seeds = sorted(set(base) & set(treat))
    return seeds, [final(treat[s]) - final(base[s]) for s in seeds]


def t_interval(diffs: list[float]) -> tuple[float, float, float] | None:
    """(mean, low, high) of the 95% t-interval of the mean paired difference; None below 2 seeds."""
    if len(diffs) < 2:
        return None
    m, half = statistics.mean(diffs), T975[len(diffs) - 1] * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return m, m - half, m + half


def arm_table(arms: dict[str, dict[int, dict]], teacher: dict | None) -> str:
    lines = ["| scenario | arm | seeds | student top-1 | per seed | dynamic teacher (or peer) top-1 | "
             "gap dynamic - student | wall-clock (min) | train img/s |", "|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(arms, key=lambda a: ORDER.index(a) if a in ORDER else len(ORDER)):
        runs = arms[name]
        rs = [runs[s] for s in sorted(runs)]
        student = [final(r) for r in rs]
        dynamic = [final(r, "dynamic_teacher") for r in rs if final(r, "dynamic_teacher") is not None]
        gaps = [final(r, "dynamic_teacher") - final(r) for r in rs if final(r, "dynamic_teacher") is not None]
        scenario = SCENARIOS.get(rs[0]["scenario"], rs[0]["scenario"])
        lines.append(f"| {scenario} | {rs[0]['label']} (`{name}`) | {len(rs)} | {mean_std(student)} | "
                     f"{', '.join(f'{v:.2f}' for v in student)} | {mean_std(dynamic)} | "
                     f"{mean_std(gaps) if gaps else '-'} | {statistics.mean(r['wall_clock_s'] for r in rs) / 60:.1f} | "
                     f"{statistics.median(r['train_images_per_s'] for r in rs):.0f} |")
    if teacher is not None:
        lines.append(f"| teacher | {teacher['label']} | 1 | {final(teacher):.2f} | | | | "
                     f"{teacher['wall_clock_s'] / 60:.1f} | {teacher['train_images_per_s']:.0f} |")
    return "\n".join(lines)


def comparison_table(arms: dict[str, dict[int, dict]]) -> str:
    lines = ["| group | comparison | seeds | mean paired difference | 95% CI | seeds gained | paper (ImageNet) |",
             "|---|---|---|---|---|---|---|"]
    for group, question, base, treat, paper in COMPARISONS:
        if base not in arms or treat not in arms:
            continue
        seeds, diffs = paired(arms[base], arms[treat])
        if not seeds:
            continue
        ci = t_interval(diffs)
        significant = ci is not None and (ci[1] > 0 or ci[2] < 0)
        mean = f"{statistics.mean(diffs):+.2f}"
        lines.append(f"| {group} | {question} | {len(seeds)} | {f'**{mean}**' if significant else mean} | "
                     f"{f'[{ci[1]:+.2f}, {ci[2]:+.2f}]' if ci else '-'} | "
                     f"{sum(d > 0 for d in diffs)}/{len(diffs)} | {paper} |")
    return "\n".join(lines)


# the dynamic teacher's growth, one figure per group of GPD arms (a figure with none of its arms is not drawn)
GROWTH_PANELS = {
    "growth": [("a_dkd_gpd", "DKD + GPD"), ("b_gpd", "GPD from scratch"), ("b_peer", "online peer"),
               ("b_gpd_r4", "GPD from scratch, r = 4")],
    "growth_extension": [("a_kd_gpd", "KD + GPD"), ("a_kd_gpd_long", "KD + GPD, 44 epochs"),
                         ("a_dist_gpd", "DIST + GPD"), ("v_kd_gpd", "ViT: KD + GPD"),
                         ("v_gpd", "ViT: GPD from scratch")],
}


def curves(arms: dict[str, dict[int, dict]], images: Path, suffix: str = "") -> list[Path]:
    """Mean over seeds, per evaluation: top-1 of student and dynamic teacher, and their gap, for GPD arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    written = []
    for name, shown in GROWTH_PANELS.items():
        shown = [(arm, label) for arm, label in shown if arm in arms]
        if not shown:
            continue
        fig, (acc, gap) = plt.subplots(1, 2, figsize=(11, 4))
        for i, (arm, label) in enumerate(shown):
            runs = list(arms[arm].values())
            epochs = [e["epoch"] for e in runs[0]["evals"]]
            colour = f"C{i}"
            for model, style in (("student", "-"), ("dynamic_teacher", "--")):
                ys = [statistics.mean(r["evals"][k][model] for r in runs) for k in range(len(epochs))]
                acc.plot(epochs, ys, style, color=colour, label=f"{label}: {model.replace('_', ' ')}")
            gaps = [statistics.mean(r["evals"][k]["dynamic_teacher"] - r["evals"][k]["student"] for r in runs)
                    for k in range(len(epochs))]
            gap.plot(epochs, gaps, "-", color=colour, label=label)
        static = next((r["final"]["static_teacher"] for arm, _ in shown for r in arms[arm].values()
                       if "static_teacher" in r["final"]), None)
        if static is not None:
            acc.axhline(static, color="k", linestyle=":", label="static teacher")
        acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="mean over seeds")
        gap.axhline(0, color="k", linewidth=0.5)
        gap.set(xlabel="epoch", ylabel="dynamic teacher - student (top-1 points)", title="gap, mean over seeds")
        acc.legend(fontsize=7)
        gap.legend(fontsize=7)
        fig.tight_layout()
        path = images / f"cifar10_{name}{suffix}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# accuracy against training cost: (label, arms in order of length)
COST_CURVES = (("CE", ("a_ce",)), ("KD", ("a_kd", "a_kd_long")), ("KD + GPD", ("a_kd_gpd", "a_kd_gpd_long")),
               ("DKD", ("a_dkd", "a_dkd_long")), ("DKD + GPD", ("a_dkd_gpd",)), ("DIST", ("a_dist",)),
               ("DIST + GPD", ("a_dist_gpd",)), ("ViT: CE", ("v_ce",)), ("ViT: KD", ("v_kd",)),
               ("ViT: KD + GPD", ("v_kd_gpd",)), ("ViT: GPD from scratch", ("v_gpd",)))


def train_hours(r: dict, images: int = 10_000) -> float:
    """A run's training cost on this machine: its epochs x images at its median training rate (evaluation and
    start-up not counted)."""
    return r["final"]["epoch"] * images / r["train_images_per_s"] / 3600


def cost_points(arms: dict[str, dict[int, dict]]) -> dict[int, list[tuple[float, float, float]]]:
    """{index in ``COST_CURVES``: [(training minutes, mean top-1, 95% t half-width)]} of the curves with results."""
    curves = {}
    for i, (_, names) in enumerate(COST_CURVES):
        points = []
        for name in (n for n in names if n in arms):
            runs = list(arms[name].values())
            top1 = [final(r) for r in runs]
            ci = t_interval(top1)
            points.append((60 * statistics.mean(train_hours(r) for r in runs), statistics.mean(top1),
                           ci[2] - ci[0] if ci else 0.0))  # (mean, low, high): the half-width
        if points:
            curves[i] = points
    return curves


def cost_plot(arms: dict[str, dict[int, dict]], images: Path, suffix: str = "") -> Path | None:
    """Student top-1 (mean over seeds, 95% t-interval) against training minutes (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = cost_points(arms)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, points in curves.items():
        label, names = COST_CURVES[i]
        xs, ys, errs = zip(*points, strict=True)
        ax.errorbar(xs, ys, yerr=errs, fmt="s--" if names[0].startswith("v_") else "o-", color=f"C{i}", capsize=3,
                    label=label)
    ax.set(xlabel="training minutes per run (this 2-core machine, 1 thread, 2 runs at once)",
           ylabel="student test top-1 (%)", title="accuracy against cost (mean over seeds, 95% t-interval)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    images.mkdir(parents=True, exist_ok=True)
    path = images / f"cifar10_cost{suffix}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def status(arms: dict[str, dict[int, dict]], seeds: list[int]) -> str:
    """Runs done, and the seeds every arm with a result has (the arms a directory's plan ran so far)."""
    done = sum(len(runs) for runs in arms.values())
    complete = [s for s in seeds if all(s in runs for runs in arms.values())]
    return (f"{done} runs of {len(arms)} arms done; seeds every one of them has: "
            f"{', '.join(map(str, complete)) or 'none yet'}.")


def write_into(doc: Path, text: str, block: str = "results") -> None:
    """Replace the page's ``<!-- {block}:begin -->`` ... ``<!-- {block}:end -->`` block (one per results
    directory: results, results_fp32)."""
    begin, end = f"<!-- {block}:begin -->", f"<!-- {block}:end -->"
    page = doc.read_text()
    if begin not in page or end not in page:
        raise SystemExit(f"{doc} has no {begin} ... {end} block to fill")
    head, rest = page.split(begin, 1)
    doc.write_text(f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=HERE / "results")
    parser.add_argument("--images", type=Path, default=None, help="write the curves here (docs/images)")
    parser.add_argument("--doc", type=Path, default=None, help="fill the results block of this page")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
    args = parser.parse_args()
    arms, teacher = load(args.results)
    if not arms:
        raise SystemExit(f"no results in {args.results}: run experiments/cifar10/protocol.py first")
    text = (f"{status(arms, args.seeds)}\n\n"
            f"Per arm (top-1 %, last evaluation, mean ± std over seeds):\n\n{arm_table(arms, teacher)}\n\n"
            f"Paired by seed (treatment - baseline, top-1 points; bold: the 95% t-interval excludes 0):\n\n"
            f"{comparison_table(arms)}\n")
    (args.results / "summary.md").write_text(text)
    print(text)
    if args.doc is not None:
        write_into(args.doc, text, args.results.name)
    if args.images is not None:
        suffix = args.results.name.removeprefix("results")  # "" or "_fp32"
        for path in [*curves(arms, args.images, suffix), cost_plot(arms, args.images, suffix)]:
            if path is not None:
                print(f"wrote {path}")


if __name__ == "__main__":
    main()
