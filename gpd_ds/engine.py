"""The DeepSpeed engine around the GPD model: ds_config resolution, optimizer, schedule.

DeepSpeed keys stay in the ds_config JSON. Resolution (``resolve_ds_config``):

* batch: ``train_batch_size`` comes from the JSON or, if absent, from ``optim.global_batch_size``; both set and
  different is an error. Without ``train_micro_batch_size_per_gpu`` the micro batch is ``global / world`` (no
  accumulation); with it, ``gradient_accumulation_steps`` follows.
* ``gradient_clipping``: from the JSON or ``optim.grad_clip``; different values are an error; neither is an error
  too (DeepSpeed >= 0.19.3 silently clips at 1.0; GPD clips at 5.0).
* precision: the ``torch_autocast`` block (fp32 master weights, bf16 on A100/H100, fp16 on V100 with a grad
  scaler). On a CPU a bfloat16 request stays bf16 autocast where the CPU has native bf16 (AVX-512 BF16 or AMX:
  :func:`cpu_has_native_bf16`), else the run is float32; float16 runs float32 on a CPU (a log line says which).
* refused with a clear message: an ``optimizer``/``scheduler`` block (the recipe's ``optim.*`` builds them),
  DeepSpeed's own ``wandb`` monitor (gpd_ds logs to W&B itself).
* defaults (:func:`ds_defaults`): DeepSpeed's throughput timer off unless the ds_config sets ``timers``: it
  synchronizes the device at every forward and step (its default ``synchronized: true``), which stalls the host
  until the GPU drains and costs a host-bound step its whole overlap; gpd_ds measures throughput itself.

ZeRO-3 partitions the GPD model's parameters; both modes run through the same modules each step, and every wide
layer takes its student slice inside its own forward, where DeepSpeed has gathered its parameters. Nothing else
holds the whole model on a rank: the EMA is partitioned too (:class:`gpd_ds.ema.PartitionedEma`), evaluation runs
the engine's module (layer-wise gathers, ranks in lockstep), and best weights are read one module at a time
(:func:`gathered_state_dict`).
"""

from __future__ import annotations

import json
import logging
import math
import re
import types
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from gpd_ds.config import ConfigError, OptimConfig
from gpd_ds.ds_config import zero_stage

log = logging.getLogger(__name__)

_NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token", "reg_token")


def _mirror(ds: dict, key: str, recipe_value: object, recipe_key: str) -> object:
    """The effective value of a key both the ds_config and the recipe can set."""
    if key in ds and recipe_value is not None and ds[key] != recipe_value:
        raise ConfigError(f"ds_config {key}={ds[key]!r} conflicts with {recipe_key}={recipe_value!r}; set the same "
                          f"value in both, or drop one (e.g. --set {recipe_key}=none to take the ds_config's)")
    return ds.get(key, recipe_value)


def resolve_ds_config(ds: dict, optim: OptimConfig, world_size: int, device: torch.device) -> dict:
    """A complete ds_config for ``deepspeed.initialize`` (see the module docstring for the rules)."""
    ds = json.loads(json.dumps(ds))  # a deep copy
    for block, fix in (("optimizer", "the optimizer comes from the recipe (optim.*)"),
                       ("scheduler", "the lr schedule comes from the recipe (optim.schedule, optim.warmup_epochs)")):
        if block in ds:
            raise ConfigError(f"ds_config has an {block!r} block; remove it: {fix}")
    if ds.get("wandb", {}).get("enabled"):
        raise ConfigError("ds_config enables DeepSpeed's wandb monitor; set it to false: gpd_ds logs to W&B itself")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"zero_optimization.stage={stage!r} is not a ZeRO stage; use 0, 1, 2 or 3")

    global_batch = _mirror(ds, "train_batch_size", optim.global_batch_size, "optim.global_batch_size")
    if not global_batch:
        raise ConfigError("no batch size: set train_batch_size in the ds_config or optim.global_batch_size")
    micro = ds.get("train_micro_batch_size_per_gpu")
    if micro is None:
        if global_batch % world_size:
            raise ConfigError(f"global batch {global_batch} is not divisible by {world_size} ranks; change "
                              "optim.global_batch_size or set train_micro_batch_size_per_gpu")
        micro = global_batch // world_size
    if global_batch % (micro * world_size):
        raise ConfigError(f"global batch {global_batch} is not a multiple of micro batch {micro} x {world_size} ranks")
    accumulation = global_batch // (micro * world_size)
    if ds.get("gradient_accumulation_steps", accumulation) != accumulation:
        raise ConfigError(f"gradient_accumulation_steps={ds['gradient_accumulation_steps']} disagrees with "
                          f"{global_batch} = {micro} x {world_size} ranks x accumulation")
    ds.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=micro,
              gradient_accumulation_steps=accumulation)

    clip = _mirror(ds, "gradient_clipping", optim.grad_clip, "optim.grad_clip")
    if clip is None:
        raise ConfigError("gradient_clipping is not set: set it in the ds_config (0 disables it) or optim.grad_clip; "
                          "DeepSpeed would silently clip at 1.0")
    ds["gradient_clipping"] = clip
    ds_defaults(ds)

    if device.type == "cpu":
        _cpu_precision(ds)
    elif (ds.get("torch_autocast", {}).get("enabled") and ds["torch_autocast"].get("dtype") in ("bfloat16", "bf16")
          and not torch.cuda.is_bf16_supported()):
        log.info("this GPU has no bfloat16: torch_autocast switched to float16 (use ds_configs/*_v100.json)")
        ds["torch_autocast"]["dtype"] = "float16"
    return ds


_CPU_BF16_FLAGS = re.compile(r"\b(avx512_bf16|amx_bf16)\b")


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU computes in bfloat16 natively (AVX-512 BF16 or AMX). Without it oneDNN emulates bf16,
    which is slower than float32, so autocast would cost time instead of saving it."""
    try:
        return bool(_CPU_BF16_FLAGS.search(Path(cpuinfo).read_text()))
    except OSError:  # no /proc (macOS, some containers): assume none, the safe choice
        return False


def _cpu_precision(ds: dict) -> None:
    """Resolve the ds_config's precision for a CPU run, in place: a bfloat16 request (``torch_autocast`` bfloat16
    or ``bf16.enabled``) stays bf16 autocast where the CPU has native bf16; float16 and CPUs without bf16 run
    float32. The log says which and why."""
    autocast = ds.get("torch_autocast", {})
    wants_bf16 = bool(ds.get("bf16", {}).get("enabled")) or (
        bool(autocast.get("enabled")) and autocast.get("dtype", "bfloat16") in ("bfloat16", "bf16"))
    wants_fp16 = bool(ds.get("fp16", {}).get("enabled")) or (
        bool(autocast.get("enabled")) and not wants_bf16)
    for k in ("fp16", "bf16"):  # DeepSpeed's bf16/fp16 optimizers are GPU-only; autocast carries the precision
        ds.pop(k, None)
    if wants_bf16 and cpu_has_native_bf16():
        log.info("no GPU: bf16 autocast on the CPU (it has native bfloat16), fp32 master weights")
        ds["torch_autocast"] = {**autocast, "enabled": True, "dtype": "bfloat16"}
        return
    if wants_bf16:
        log.info("no GPU: running in float32 (this CPU has no native bfloat16: emulated bf16 would be slower)")
    elif wants_fp16:
        log.info("no GPU: running in float32 on the CPU (the ds_config's float16 is for V100 GPUs)")
    ds["torch_autocast"] = {"enabled": False}


def ds_defaults(ds: dict) -> dict:
    """Fill in (in place) the ds_config keys gpd_ds needs but DeepSpeed defaults otherwise; returns ``ds``."""
    ds.setdefault("zero_allow_untested_optimizer", True)  # SGD under ZeRO
    ds.setdefault("steps_per_print", 10**9)  # gpd_ds logs progress itself
    ds.setdefault("wandb", {"enabled": False})
    ds.setdefault("timers", {"throughput": {"enabled": False}})  # it syncs the device twice a step
    return ds


def initialize(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, ds: dict, world_size: int):
    """``deepspeed.initialize`` for a resolved ds_config; returns the engine.

    Two ZeRO-0 costs are removed. A single rank has nothing to all-reduce, but DeepSpeed would still flatten every
    gradient into buckets and back each step (measured: ~5% of a CPU GPD step); that no-op is switched off. And
    gradient clipping runs sync-free (:func:`_clip_gradients`)."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds,
                                           dist_init_required=False)
    if zero_stage(ds) == 0:
        if world_size == 1:
            engine.enable_backward_allreduce = False
        engine.clip_fp32_gradients = types.MethodType(_clip_gradients, engine)
    return engine


def _clip_gradients(engine) -> None:
    """ZeRO-0 gradient clipping, in place of DeepSpeed's ``clip_fp32_gradients``.

    DeepSpeed's version builds two one-element tensors from Python floats on the device every step; each is a
    pageable host-to-device copy, which waits for the GPU to finish the backward, so the host cannot queue the next
    step ahead. ``torch.nn.utils.clip_grad_norm_`` computes the same clip (``min(1, max_norm / (norm + 1e-6))``)
    with per-tensor-list (foreach) kernels where the device has them, and no sync. The gradients are already
    all-reduced here (identical on every rank), so DeepSpeed's all-reduce of the norm is skipped too. The norm is
    kept for the ``train/grad_norm`` log.
    """
    engine._global_grad_norm = torch.nn.utils.clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping())


@torch.no_grad()
def gathered_state_dict(module: nn.Module, zero3: bool, keep: bool = True) -> dict[str, torch.Tensor]:
    """``module``'s state dict on the CPU. Under ZeRO-3 it is gathered one module at a time (a collective: call it
    on every rank), so no rank ever holds more than one layer's full parameters on its device; ``keep=False``
    (ranks that will not write it) takes part in the gathers and returns nothing."""
    if not zero3:
        return {k: v.detach().cpu() for k, v in module.state_dict().items()} if keep else {}
    import deepspeed

    keys = module.state_dict().keys()
    out = {}
    for prefix, m in module.named_modules():
        prefix = f"{prefix}." if prefix else ""
        params = [(n, p) for n, p in m.named_parameters(recurse=False)]
        with deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None):
            if keep:
                out.update({prefix + n: p.detach().cpu().clone() for n, p in params})
        if keep:
            out.update({prefix + n: b.detach().cpu().clone() for n, b in m.named_buffers(recurse=False)
                        if prefix + n in keys})
    return {k: out[k] for k in keys} if keep else {}


def resident_parameters(module: nn.Module) -> int:
    """Parameter elements this rank holds between steps (its partition under ZeRO-3, everything otherwise)."""
    return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())


def autocast_dtype(ds: dict) -> torch.dtype | None:
    """The autocast dtype of a resolved ds_config (None: full precision)."""
    block = ds.get("torch_autocast", {})
    if not block.get("enabled"):
        return None
    return {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
            "fp16": torch.float16, "half": torch.float16}[str(block.get("dtype", "bfloat16"))]


def effective_lr(o: OptimConfig, global_batch: int, finetune: bool) -> float:
    """The recipe's lr scaled linearly to the global batch (and x finetune_lr_scale when fine-tuning)."""
    lr = o.lr * global_batch / o.lr_ref_batch
    return lr * o.finetune_lr_scale if finetune else lr


def param_groups(model: nn.Module, weight_decay: float, decay_norm_and_bias: bool) -> list[dict]:
    """Weight-decay groups. CNN recipe: decay everything (BN, biases and branch tensors included, as the
    reference). ViT recipe: no decay for 1-D tensors, biases and tokens/position embeddings (timm's rule)."""
    if decay_norm_and_bias:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or any(t in name for t in _NO_DECAY_NAMES)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, o: OptimConfig, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, o.weight_decay, o.decay_norm_and_bias)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=o.betas, eps=o.eps)


def lr_factor(o: OptimConfig, steps_per_epoch: int, base_lr: float) -> Callable[[int], float]:
    """The schedule as a function of the optimizer step: linear warm-up from ``warmup_lr``, then step decay
    (x gamma at each milestone epoch) or cosine to ``min_lr`` followed by ``cooldown_epochs`` at ``min_lr``."""
    warmup = round(o.warmup_epochs * steps_per_epoch)
    milestones = [m * steps_per_epoch for m in o.milestones]
    decay_steps = max(1, (o.epochs - o.cooldown_epochs) * steps_per_epoch - warmup)
    start, floor = o.warmup_lr / base_lr, o.min_lr / base_lr

    def factor(step: int) -> float:
        if step < warmup:
            return start + (1.0 - start) * step / warmup
        if o.schedule == "step":
            return o.gamma ** sum(step >= m for m in milestones)
        t = min(1.0, (step - warmup) / decay_steps)
        return floor + 0.5 * (1.0 - floor) * (1.0 + math.cos(math.pi * t))

    return factor
