"""Run under the `deepspeed` launcher by test_elastic_resume.py: train a small model a few steps and save (``save``),
or resume that checkpoint through gpd_ds's resume (``resume``), with any ZeRO stage, optimizer and number of ranks;
either way rank 0 then writes every parameter's full fp32 master weight and optimizer tensors as DeepSpeed itself
assembles them (``safe_get_full_*``), for the test to compare across the change of ranks."""

from __future__ import annotations

import argparse
from pathlib import Path

import deepspeed
import torch
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

from gpd_ds import checkpoint, distributed
from gpd_ds.models import create_model

KEYS = {"sgd": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq"]}


def build(stage: int, optimizer: str):
    torch.manual_seed(0)
    model = create_model("test_resnet", num_classes=10)
    groups = [{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 1e-4},
              {"params": [p for p in model.parameters() if p.ndim <= 1], "weight_decay": 0.0}]
    opt = (torch.optim.SGD(groups, lr=0.05, momentum=0.9) if optimizer == "sgd"
           else torch.optim.AdamW(groups, lr=1e-3))
    ds = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
          "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=ds)
    checkpoint.install_engine(engine)  # as gpd_ds's engine: a failed write on any rank is seen by all
    return engine


def full_state(engine, optimizer: str) -> dict[str, torch.Tensor]:
    if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO-1/2 link their per-parameter state views at the first step, before SGD has made its momentum
        engine.optimizer._hp_optimizer_states_linked = False
        engine.optimizer._lazy_init_hp_params_optimizer_state()
    out = {}
    for name, p in engine.module.named_parameters():
        out[f"{name}/fp32"] = safe_get_full_fp32_param(p).detach().cpu().clone()
        for key in KEYS[optimizer]:
            out[f"{name}/{key}"] = safe_get_full_optimizer_state(p, key).detach().cpu().clone()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--local_rank", type=int, default=0)
    ap.add_argument("mode", choices=["save", "resume"])
    ap.add_argument("root", type=Path)
    ap.add_argument("--stage", type=int, required=True)
    ap.add_argument("--optimizer", choices=sorted(KEYS), default="sgd")
    args = ap.parse_args()
    info = distributed.init()
    engine = build(args.stage, args.optimizer)
    if args.mode == "save":
        gen = torch.Generator().manual_seed(100 + info.rank)
        for _ in range(3):
            x, y = torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen)
            engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
            engine.step()
        checkpoint.save(engine, args.root, 3, {}, 2, info, {"zero_stage": args.stage})
    else:
        assert checkpoint.resume(engine, "auto", args.root, info, {}, args.stage) is not None
    state = full_state(engine, args.optimizer)
    if info.is_main:
        torch.save(state, args.root / f"{args.mode}_{info.world_size}.pt")


if __name__ == "__main__":
    main()
