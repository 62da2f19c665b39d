"""``gpd-ds``: command-line entry point. Parses arguments and dispatches; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from gpd_ds.errors import UserInputError

# Subcommands import what they need when they run, so `gpd-ds --help` and argument errors are instant.


def _inspect(args: argparse.Namespace) -> int:
    from gpd_ds.gpd import expand
    from gpd_ds.gpd.summary import summarize
    from gpd_ds.models import create_model

    student = create_model(args.student, num_classes=args.num_classes, image_size=args.image_size)
    size = (3, args.image_size, args.image_size)
    model = expand(student, width_ratio=args.width_ratio, branches=args.branches,
                   pretrained_student=args.pretrained_student, input_size=size)
    s = summarize(model, size)
    source_err = f"{s.student_vs_source:.3g}" if model.student_is_source else "n/a (branch mix differs by design)"
    print(f"student         {args.student}  (input {size[0]}x{size[1]}x{size[2]}, r={args.width_ratio}, "
          f"branches={args.branches})")
    exported = sum(p.numel() for p in model.source.parameters())  # the plain model export writes (CBR merged)
    print(f"{'':16}{'params (M)':>12}{'GMACs/img':>12}")
    print(f"{'student':16}{exported / 1e6:12.2f}{s.student_gmacs:12.3f}  (params: the exported plain model)")
    print(f"{'dynamic teacher':16}{s.teacher_params / 1e6:12.2f}{s.teacher_gmacs:12.3f}  (params: trained tensors)")
    if s.student_params != exported:
        print(f"the student view trains {s.student_params / 1e6:.2f} M branch tensors, merged into "
              f"{exported / 1e6:.2f} M parameters at export (channel-branch reparameterization)")
    if model.branches:
        print(f"branch kernel merge per forward (any batch): student {s.student_merge_gmacs:.3f}, "
              f"dynamic teacher {s.teacher_merge_gmacs:.3f} GMACs")
    print(f"ratio teacher/student: params {s.teacher_params / exported:.2f}x, "
          f"GMACs {s.teacher_gmacs / s.student_gmacs:.2f}x")
    print(f"IR error (max |logit diff|, max |logit| {s.max_logit:.3g}): teacher vs student {s.teacher_vs_student:.3g}, "
          f"student vs source {source_err}")
    return 0


def _make_shards(args: argparse.Namespace) -> int:
    from gpd_ds.data.shards import MAX_IMAGE_PIXELS, make_shards, summary_lines

    # The parser's default is None so that `gpd-ds --help` need not import the shard writer for the number.
    max_pixels = MAX_IMAGE_PIXELS if args.max_pixels is None else args.max_pixels
    entry = make_shards(args.src, args.out, args.split, shard_size=args.shard_size, workers=args.workers,
                        shuffle_seed=args.shuffle_seed, prefix=args.prefix, class_mapping=args.class_mapping,
                        resume=args.resume, max_pixels=max_pixels, strict=args.strict, max_side=args.max_side,
                        jpeg_quality=args.jpeg_quality)
    for line in summary_lines(entry, args.out):
        print(line)
    return 0


def _export(args: argparse.Namespace) -> int:
    from gpd_ds import hub
    from gpd_ds.export import export_run

    if not (args.out or args.hf_dir or args.push_to_hub):
        raise hub.HubError("say where to export: --out FILE.safetensors, --hf-dir DIR (timm's hub layout) and/or "
                           "--push-to-hub ORG/NAME")
    if args.push_to_hub:
        hub.check_push_possible(args.push_to_hub)  # before any work: no token or no network fails here
    with hub.temporary_dir() as tmp:
        out = export_run(Path(args.run_dir), Path(args.out or Path(tmp) / "student.safetensors"), which=args.weights)
        sidecar = json.loads(out.with_suffix(".json").read_text())
        print(f"exported {sidecar['model']} ({sidecar['weights']} weights, step {sidecar['step']}, top-1 "
              f"{sidecar['top1']}); max |logit diff| vs the GPD student mode: "
              f"{sidecar['max_abs_diff_vs_student_mode']:.3g}")
        if args.out:
            print(f"  {out} (sidecar {out.with_suffix('.json')})")
        hf_dir = Path(args.hf_dir or Path(tmp) / "hub")
        if args.hf_dir or args.push_to_hub:
            hub.write_hf_dir(out, Path(args.run_dir), hf_dir)
            if args.hf_dir:
                print(f"  {hf_dir}: config.json, model.safetensors, README.md (timm.create_model('local-dir:{hf_dir}',"
                      " pretrained=True))")
        if args.push_to_hub:
            print(f"  uploaded to https://huggingface.co/{args.push_to_hub}: {hub.push(hf_dir, args.push_to_hub)}")
    return 0


def _convert_weights(args: argparse.Namespace) -> int:
    from gpd_ds.models.weights import convert_weights

    entry, count = convert_weights(args.src, args.out, args.key)
    print(f"wrote {args.out}: {count} tensors from entry {entry!r} of {args.src}")
    return 0


def available_cores() -> int:
    """CPU cores this process may use (its affinity mask, e.g. a Slurm allocation), not all the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity masks
        return os.cpu_count() or 1


def _eval(args: argparse.Namespace) -> int:
    from gpd_ds.evaluate import evaluate_artifact

    workers = available_cores() if args.workers is None else args.workers
    results = evaluate_artifact(args.path, args.data, args.split, args.batch_size, workers, args.weights,
                                allow_pipe=args.allow_pipe, max_bad_fraction=args.max_bad_fraction)
    for name, r in results.items():
        print(f"{name:20} top-1 {r['top1']:6.2f}  top-5 {r['top5']:6.2f}  ({r['samples']} images)")
    return 0


def _report(args: argparse.Namespace) -> int:
    from gpd_ds.report import render

    out = Path(args.out) if args.out else Path(args.run_dirs[0]) / "report"
    pngs, page = render([Path(d) for d in args.run_dirs], out, args.labels)
    print(f"wrote {len(pngs)} plots and {page}")
    return 0


def _recipes(args: argparse.Namespace) -> int:
    from gpd_ds.recipes import describe

    rows = describe()
    cols = ["recipe", "scenario", "student", "static teacher", "dynamic teacher", "epochs", "paper (ImageNet top-1)"]
    if args.markdown:
        print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(f"`{r[c]}`" if c == "recipe" else r[c] for c in cols) + " |")
        return 0
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    print("\ntrain one: deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json --recipe NAME "
          "[--set key=value ...]; --print-config shows every value")
    return 0


def _wandb_dashboard(args: argparse.Namespace) -> int:
    from gpd_ds import dashboard

    workspace = dashboard.build(args.entity, args.project, args.name)
    for section in workspace.sections:
        print(f"{section.name}:")
        for panel in section.panels:
            print(f"  {panel.title}")
    print(f"runs grouped by config.{dashboard.GROUP_BY}")
    if not dashboard.online():
        print("W&B is offline here (no WANDB_API_KEY or `wandb login`, or WANDB_MODE=offline): the view above was "
              "built and checked, and nothing was saved. Run this again where W&B is online.")
        return 0
    print(f"saved: {dashboard.save(workspace, args.url)}")
    return 0


def _preflight(args: argparse.Namespace) -> int:
    import os

    from gpd_ds.cluster import preflight

    allow_cpu = args.allow_cpu or os.environ.get("GPD_DS_ALLOW_CPU") == "1"
    for line in preflight(args.hostfile, args.gpus, args.data, allow_cpu):
        print(f"preflight: {line}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpd-ds", description="Gap Preserving Distillation on DeepSpeed")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="sizes, GMACs and IR error of a student and its dynamic teacher")
    p.add_argument("--student", required=True, help="timm name (resnet18) or torchvision:NAME")
    p.add_argument("--width-ratio", type=int, default=2, help="r, the widening of the dynamic teacher (default 2)")
    p.add_argument("--branches", action="store_true", help="multi-branch 3x3 convs in the dynamic teacher")
    p.add_argument("--pretrained-student", action="store_true", help="branch scalars start at 'origin only'")
    p.add_argument("--image-size", type=int, default=224, help="input resolution (default 224)")
    p.add_argument("--num-classes", type=int, default=1000, help="classifier width (default 1000)")
    p.set_defaults(func=_inspect)

    p = sub.add_parser("make-shards", help="convert an ImageFolder tree (SRC/<class>/<image>) to WebDataset shards")
    p.add_argument("src", help="ImageFolder split directory, e.g. /data/imagenet/train")
    p.add_argument("out", help="output directory for the shards and _info.json (shared by train and val)")
    p.add_argument("--split", required=True, help="split name: train or val")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000, ~110 MB "
                   "for ImageNet)")
    p.add_argument("--workers", type=int, default=None, help="parallel writer processes (default: all cores)")
    p.add_argument("--shuffle-seed", type=int, default=0, help="seed of the shuffle across shards (default 0)")
    p.add_argument("--prefix", default=None, help="shard name prefix (default: OUT's directory name)")
    p.add_argument("--class-mapping", default=None, help="class order: JSON list, JSON {name: index}, or text "
                   "file with one name per line (default: sorted folder names, or the classes already in OUT)")
    p.add_argument("--resume", action="store_true", help="finish an interrupted conversion with the same "
                   "arguments")
    p.add_argument("--max-pixels", type=int, default=None, metavar="N", help="leave out (and list in the index) images "
                   "larger than this, width x height judged from the header before decoding (default 89,478,485, "
                   "PIL's limit)")
    p.add_argument("--max-side", type=int, default=None, metavar="N", help="store images whose longer side is over "
                   "N shrunk to N (aspect kept, re-encoded as JPEG): cheaper decoding in every epoch; the rest keep "
                   "their bytes (default: off; FFCV stores ImageNet at 400-500, and below ~342 the 256-px eval "
                   "resize upsamples a 4:3 photo)")
    p.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="JPEG quality of the images "
                   "--max-side shrinks (default 90, FFCV's)")
    p.add_argument("--strict", action="store_true", help="refuse a doubtful layout (class folders without "
                   "images, fewer than 2 classes, split folders such as train/ as classes, non-image files) "
                   "instead of warning")
    p.set_defaults(func=_make_shards)

    sub.add_parser("train", help="train (same arguments as launch/train.py; see gpd-ds train --help)",
                   add_help=False)

    p = sub.add_parser("recipes", help="list the recipes: scenario, student, teachers, epochs, the paper's numbers")
    p.add_argument("--markdown", action="store_true", help="a markdown table (the README's)")
    p.set_defaults(func=_recipes)

    p = sub.add_parser("export", help="export a run's student as a plain timm/torchvision model (.safetensors)")
    p.add_argument("run_dir", help="the run directory (holds config.json, checkpoints/, best/)")
    p.add_argument("--out", default=None, help="output .safetensors path (a .json sidecar is written beside it)")
    p.add_argument("--hf-dir", default=None, help="also write timm's Hugging Face Hub layout here (config.json, "
                   "model.safetensors, a model card README.md): timm.create_model('local-dir:DIR') loads it")
    p.add_argument("--push-to-hub", default=None, metavar="ORG/NAME", help="upload the hub layout with "
                   "huggingface_hub (token from HF_TOKEN or `huggingface-cli login`); checked before any work")
    p.add_argument("--weights", default="best", choices=["best", "last", "last_ema"],
                   help="best (default: live or EMA weights with the best student top-1), or the newest checkpoint's")
    p.set_defaults(func=_export)

    p = sub.add_parser("convert-weights", help="a foreign torch checkpoint (e.g. the official RVT release) to "
                       ".safetensors, read without running code")
    p.add_argument("src", help="the .pth/.pth.tar file")
    p.add_argument("out", help="output .safetensors path")
    p.add_argument("--key", default=None, help="the entry holding the weights (default: state_dict, model, module "
                   "or model_state_dict, whichever the file has first; else the file itself)")
    p.set_defaults(func=_convert_weights)

    p = sub.add_parser("eval", help="evaluate an exported student or a run directory on shards")
    p.add_argument("path", help="exported .safetensors (with its .json) or a run directory")
    p.add_argument("--data", required=True, help="shards root with _info.json")
    p.add_argument("--split", default="val")
    p.add_argument("--batch-size", type=int, default=250)
    p.add_argument("--workers", type=int, default=None, help="loader processes (default: the cores this process "
                   "may use)")
    p.add_argument("--weights", default="best", choices=["best", "last", "last_ema"], help="for a run directory")
    p.add_argument("--allow-pipe", action="store_true", help="accept pipe: shard URLs (they run shell commands)")
    p.add_argument("--max-bad-fraction", type=float, default=0.01, help="fail when more than this fraction of "
                   "the split's samples are bad or lost (default 0.01)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("report", help="PNG plots and an HTML page from runs' metrics.jsonl (overlays several runs)")
    p.add_argument("run_dirs", nargs="+", help="one or more run directories")
    p.add_argument("--out", default=None, help="output directory (default: FIRST_RUN_DIR/report)")
    p.add_argument("--labels", nargs="+", default=None, help="a name per run for the legends (e.g. KD GPD)")
    p.set_defaults(func=_report)

    p = sub.add_parser("wandb-dashboard", help="create (or update) the GPD W&B workspace view: growth, gaps, EMA, "
                       "loss terms, system, grouped by scenario (needs gpd-ds[dashboard])")
    p.add_argument("--entity", required=True, help="W&B entity (user or team)")
    p.add_argument("--project", required=True, help="W&B project the runs log to (track.project, default gpd_ds)")
    p.add_argument("--name", default="GPD: dynamic teacher growth", help="the view's name")
    p.add_argument("--url", default=None, help="update the view at this URL (one this command saved) instead")
    p.set_defaults(func=_wandb_dashboard)

    p = sub.add_parser("preflight", help="check this node before a launch: hostfile, GPUs, data (used by launch/)")
    p.add_argument("--hostfile", default=None)
    p.add_argument("--gpus", type=int, default=None, help="GPUs this node must have (default: the hostfile's slots)")
    p.add_argument("--data", default=None, help="shards root that must be visible here")
    p.add_argument("--allow-cpu", action="store_true", help="accept a node without GPUs (a CPU rehearsal)")
    p.set_defaults(func=_preflight)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["train"]:
        from gpd_ds.train_cli import main as train_main

        return train_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        rc = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe shows up at the flush of buffered output
        return rc
    except UserInputError as e:  # anything else is a bug: its traceback is what a bug report needs
        print(f"gpd-ds {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `gpd-ds recipes | head`: the reader left; exit as a shell tool would, no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
