"""Checkpoint size and save/load time per recipe, and what the safety rules cost.

For each recipe's real model (1000 classes; the GPD model with its branches where the recipe has them, the fp32
EMA, the optimizer state after one step) on one rank under the shipped ``ds_configs/zero2.json``:

* size: the files of one checkpoint (model states with the EMA and client state, the ZeRO optimizer shard);
* save: ``gpd_ds.checkpoint.save`` (free-space check, guarded writes, marker, pruning) against DeepSpeed's own
  ``save_checkpoint`` of the same state in the same process;
* load: ``gpd_ds.checkpoint.resume`` (the pickle scan of every file, weights-only loading) against DeepSpeed's own
  ``load_checkpoint`` (``weights_only=False``) of the same checkpoint.

Medians of ``--repeats`` rounds in alternating order. Ratios near 1 mean the safety costs little next to the I/O.
The absolute times are this machine's disk; budget a preemption signal's lead time from the size and your file
system's write bandwidth.

    python bench/checkpoint_io.py [--recipes resnet18_from_resnet34 ...] [--dir /path/on/the/target/fs]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gpd_ds import checkpoint, distributed
from gpd_ds.config import TrainConfig
from gpd_ds.ema import ModelEma
from gpd_ds.engine import build_optimizer, ds_defaults, initialize
from gpd_ds.models.build import build_model
from gpd_ds.recipes import get_recipe

CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
RECIPES = ["resnet18_from_resnet34", "mobilenet_from_resnet50", "deit_tiny_from_deit_small"]


def _engine(cfg: TrainConfig):
    model = build_model(cfg, 1000, noise=False)
    ds = json.loads((CONFIGS / "zero2.json").read_text())
    ds.update({"train_batch_size": 2, "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 5.0,
               "torch_autocast": {"enabled": False}})
    engine = initialize(model, build_optimizer(model, cfg.optim, 0.01), None, ds_defaults(ds), world_size=1)
    size = cfg.data.image_size if "deit" in cfg.model.student or "vit" in cfg.model.student else 64
    out = engine(torch.randn(2, 3, size, size), mode="both")
    engine.backward(out.student.sum() + out.teacher.sum())
    engine.step()  # the optimizer state (momentum / Adam moments) exists from here on
    ema = ModelEma(engine.module, 0.9999)
    return engine, ema


def _files(path: Path) -> dict[str, int]:
    return {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.suffix == ".pt"}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(recipe: str, workdir: Path, info, repeats: int) -> dict:
    cfg = get_recipe(recipe)
    engine, ema = _engine(cfg)
    client = {"ema": ema.state_dict(), "ranks": [{"rng": distributed.rng_state()}], "kept": {}, "step": 1}
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    meta = {"lineage": "bench", "zero_stage": 2, "config": config}
    deepspeed_engine = engine.checkpoint_engine
    checkpoint.install_engine(engine)
    guarded = engine.checkpoint_engine
    plain_root, ours_root = workdir / f"{recipe}-deepspeed", workdir / f"{recipe}-gpd_ds"

    def plain_save() -> None:
        engine.checkpoint_engine = deepspeed_engine
        engine.save_checkpoint(str(plain_root), tag="step000000001", client_state=client, save_latest=False)

    def ours_save() -> None:
        engine.checkpoint_engine = guarded
        checkpoint.save(engine, ours_root, 1, client, keep=3, info=info, meta=meta)

    def plain_load() -> None:
        engine.checkpoint_engine = deepspeed_engine
        engine.load_checkpoint(str(plain_root), tag="step000000001", load_module_strict=True)

    def ours_load() -> None:
        engine.checkpoint_engine = guarded
        checkpoint.resume(engine, "auto", ours_root, info, config, 2)

    times: dict[str, list[float]] = {"plain_save": [], "ours_save": [], "plain_load": [], "ours_load": []}
    for i in range(repeats):  # alternating order: neither side always runs on a warmer page cache
        for side in (("plain", "ours") if i % 2 == 0 else ("ours", "plain")):
            shutil.rmtree(plain_root if side == "plain" else ours_root, ignore_errors=True)
            times[f"{side}_save"].append(_timed(plain_save if side == "plain" else ours_save))
        for side in (("ours", "plain") if i % 2 == 0 else ("plain", "ours")):
            times[f"{side}_load"].append(_timed(plain_load if side == "plain" else ours_load))
    files = _files(ours_root / "step000000001")
    shutil.rmtree(plain_root)
    shutil.rmtree(ours_root)
    med = {k: statistics.median(v) for k, v in times.items()}
    parameters = sum(p.numel() for p in engine.module.parameters())
    return {"recipe": recipe, "parameters_m": parameters / 1e6, "files": files, "bytes": sum(files.values()),
            "save_s": med["ours_save"], "save_ratio": med["ours_save"] / med["plain_save"],
            "load_s": med["ours_load"], "load_ratio": med["ours_load"] / med["plain_load"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=RECIPES)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary directory)")
    parser.add_argument("--repeats", type=int, default=3, help="save/load rounds; medians are printed (default 3)")
    args = parser.parse_args()
    info = distributed.init()
    workdir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="gpd_ds-ckpt-bench-"))
    print(f"{'recipe':28}{'params M':>9}{'checkpoint':>12}{'save s':>8}{'vs DS':>7}{'MB/s':>7}{'load s':>8}"
          f"{'vs DS':>7}   files")
    for recipe in args.recipes:
        r = measure(recipe, workdir, info, args.repeats)
        files = ", ".join(f"{k} {checkpoint.human_bytes(v)}" for k, v in r["files"].items())
        print(f"{recipe:28}{r['parameters_m']:9.1f}{checkpoint.human_bytes(r['bytes']):>12}{r['save_s']:8.2f}"
              f"{r['save_ratio']:7.2f}{r['bytes'] / r['save_s'] / 1e6:7.0f}{r['load_s']:8.2f}{r['load_ratio']:7.2f}"
              f"   {files}")


if __name__ == "__main__":
    main()
