"""The arguments of ``gpd-ds train`` and ``launch/train.py``, parsed and checked before torch, DeepSpeed or timm are
imported: ``--help``, the recipe list, a typo in a recipe name or a ``--set`` key, a bad value and a bad ds_config
answer in a fraction of a second; training (:func:`gpd_ds.train.entry.run`) imports them after the checks."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from gpd_ds.config import ConfigError, TrainConfig, apply_overrides, kd_choices
from gpd_ds.ds_config import load_ds_config
from gpd_ds.errors import UserInputError
from gpd_ds.recipes import describe, get_recipe


def _recipes_epilog() -> str:
    lines = ["recipes (gpd-ds recipes shows teachers, epochs and the paper's numbers):"]
    lines += [f"  {r['recipe']:36} {r['scenario']}: {r['student']} <- {r['static teacher']}" for r in describe()]
    lines += ["", f"loss.kd (KD losses, gpd_ds.registry.KD_LOSSES): {', '.join(kd_choices())}"]
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
    parser.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="FILE.py|MODULE",
                        help="import a Python file (or a module on the Python path) first, so that what it registers "
                        "(a KD loss in gpd_ds.registry.KD_LOSSES, a @recipe) can be named; repeatable")
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


def import_plugin(plugin: str) -> None:
    """Import ``plugin``: a ``.py`` file, or a module by name (the working directory on the path, as for
    ``python -m``). It runs as the user's own code, like any module they import."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        if plugin.endswith(".py"):
            if not os.path.isfile(plugin):
                raise ImportError(f"no file {plugin}")
            name = f"gpd_ds_plugin_{Path(plugin).stem}_{len(sys.modules)}"
            spec = importlib.util.spec_from_file_location(name, plugin)
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module  # registered while it runs, as an import does: timm's register_model looks
            spec.loader.exec_module(module)  # its module up there
        else:
            importlib.import_module(plugin)
    except ImportError as e:
        raise ConfigError(f"--plugin {plugin!r} cannot be imported ({e}); name a Python file (my_losses.py) or a "
                          "module on the Python path") from e


def check_args(args: argparse.Namespace) -> tuple[TrainConfig, dict]:
    """The config (recipe, ``--set`` overrides, every value) and the ds_config, checked without torch; raises a
    :class:`~gpd_ds.errors.UserInputError` naming what to fix."""
    for plugin in args.plugins:
        import_plugin(plugin)
    cfg = apply_overrides(get_recipe(args.recipe), args.overrides).validate()
    if args.print_config:
        return cfg, {}
    if args.overwrite and args.resume != "none":
        raise ConfigError(f"--overwrite deletes the run directory's checkpoints and only goes with --resume none "
                          f"(this command has --resume {args.resume})")
    if cfg.data.root is None and cfg.recipe not in ("demo", "demo_teacher"):
        raise ConfigError(f"recipe {cfg.recipe!r} needs data: --set data.root=/path/to/shards (write them with "
                          "`gpd-ds make-shards`); only the demo recipes run on the built-in demo data")
    return cfg, load_ds_config(args.deepspeed_config)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg, ds_config = check_args(args)
    except UserInputError as e:
        print(f"gpd-ds train: error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1, default=str))
        return 0
    quiet_ranks()
    from gpd_ds.train.entry import run

    return run(args, cfg, ds_config)
