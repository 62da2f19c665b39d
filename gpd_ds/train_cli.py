"""The arguments of ``gpd-ds train`` and ``launch/train.py``, parsed before torch, DeepSpeed or timm are imported:
``--help``, the recipe list and argument errors are instant; training imports them after the parse."""

from __future__ import annotations

import argparse
import logging
import os
import warnings

from gpd_ds.recipes import describe


def _recipes_epilog() -> str:
    lines = ["recipes (gpd-ds recipes shows teachers, epochs and the paper's numbers):"]
    lines += [f"  {r['recipe']:36} {r['scenario']}: {r['student']} <- {r['static teacher']}" for r in describe()]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpd-ds train", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_recipes_epilog(),
        description="Train with Gap Preserving Distillation on DeepSpeed. With no data arguments it runs the "
        "embedded demo.")
    parser.add_argument("--recipe", default="demo", help="named config (default: demo); listed below")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set data.root=/data/in1k-wds --set optim.epochs=90")
    parser.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe>-<time>)")
    parser.add_argument("--resume", default="auto", help="auto (newest good checkpoint in the run dir), a "
                        "checkpoint or run directory, or none (refused where checkpoints exist, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="with --resume none: delete the run directory's "
                        "old checkpoints, best weights and metrics.jsonl, then start from step 0")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--local_rank", type=int, default=-1, help=argparse.SUPPRESS)
    # DeepSpeed's own two config arguments (what deepspeed.add_config_arguments adds), declared here so that the
    # parse needs no DeepSpeed import
    group = parser.add_argument_group("DeepSpeed")
    group.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed's conventions; gpd_ds "
                       "always runs the DeepSpeed engine")
    group.add_argument("--deepspeed_config", default=None, help="the ds_config JSON (ds_configs/zero2.json: ZeRO "
                       "stage, precision, buckets); batch size and clipping come from the recipe unless set there")
    return parser


def quiet_ranks() -> None:
    """Before DeepSpeed is imported, keep every rank's output to what a user can act on: without CUDA, name
    DeepSpeed's CPU accelerator (it picks it anyway, after a warning on every rank; gpd_ds runs on CUDA or the CPU);
    drop torch's deprecation notice that DeepSpeed's ZeRO all-gather triggers on every rank; on ranks other than 0,
    torch's note that it builds DeepSpeed's CPU communication op without CUDA."""
    import torch

    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    if os.environ.get("RANK", "0") != "0":
        logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_ranks()
    from gpd_ds.train import run

    return run(args)
