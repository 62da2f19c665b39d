"""Training: the entry point (``launch/train.py``, ``gpd-ds train``), ``train_step`` and the step loop.

Per step: static teacher forward (no grad, outside the engine), both GPD modes through the engine, ``GPDLoss``,
one ``engine.backward`` of the summed loss, ``engine.step``, EMA update. Schedules are functions of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import deepspeed
import torch
from deepspeed.checkpoint.constants import (
    UNIVERSAL_CHECKPOINT_INFO,
    UNIVERSAL_CHECKPOINT_VERSION_KEY,
    UNIVERSAL_CHECKPOINT_VERSION_VALUE,
)
from safetensors.torch import save_file
from torch import nn

from gpd_ds import checkpoint, distributed
from gpd_ds.config import ConfigError, TrainConfig, apply_overrides
from gpd_ds.data.demo import cache_dir, demo_dataset
from gpd_ds.data.loader import ShardList, TrainLoader, eval_loader, resolve_shards
from gpd_ds.data.memory import MemoryTrainLoader
from gpd_ds.data.transforms import DeviceTransform, eval_transform, train_transform
from gpd_ds.distributed import DistInfo
from gpd_ds.ema import ModelEma, PartitionedEma, consolidate
from gpd_ds.engine import (
    autocast_dtype,
    build_optimizer,
    effective_lr,
    gathered_state_dict,
    initialize,
    load_ds_config,
    lr_factor,
    resident_parameters,
    resolve_ds_config,
    zero_stage,
)
from gpd_ds.errors import UserInputError
from gpd_ds.evaluate import evaluate
from gpd_ds.features import feature_taps
from gpd_ds.gpd.checkpointing import enable_activation_checkpointing
from gpd_ds.losses import Features, GPDLoss, LossOutput, split_kd
from gpd_ds.models.build import build_model
from gpd_ds.models.teacher import StaticTeacher, build_static_teacher
from gpd_ds.preemption import EXIT_PREEMPTED, Preempted, StopRequest, describe
from gpd_ds.progress import Progress
from gpd_ds.recipes import get_recipe
from gpd_ds.tracking import Tracker, eval_metrics, rewind_metrics

log = logging.getLogger("gpd_ds")


class NonFiniteLossError(RuntimeError):
    """The loss stopped being a finite number."""


@dataclass
class RunResult:
    run_dir: Path
    step: int
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    best: dict = field(default_factory=dict)
    export: str | None = None


def train_step(engine, x: torch.Tensor, y: torch.Tensor, static_teacher: StaticTeacher | None, loss_fn: GPDLoss,
               gpd: bool, autocast: Callable[[], contextlib.AbstractContextManager], static_taps: tuple = (),
               kd_scale: float = 1.0) -> LossOutput:
    """One micro-step: forwards, one backward of the summed loss, ``engine.step`` (which updates the weights at the
    end of a gradient-accumulation cycle). With ``static_taps`` (feature distillation) the same forwards also give
    the static teacher's features and the trained module's connector outputs."""
    static_logits, static_features = None, None
    if static_teacher is not None:
        with autocast():
            static_logits = static_teacher(x, static_taps)
        if static_taps:
            static_logits, static_features = static_logits
    if gpd:
        out = engine(x, mode="both", features=bool(static_taps))
        features = Features(out.student_features, out.teacher_features, static_features) if static_taps else None
        loss = loss_fn(out.student, out.teacher, y, static_logits, features=features, kd_scale=kd_scale)
    elif static_taps:
        logits, connected = engine(x, features=True)
        loss = loss_fn.plain(logits, y, static_logits, features=Features(connected, None, static_features),
                             kd_scale=kd_scale)
    else:
        loss = loss_fn.plain(engine(x), y, static_logits, kd_scale=kd_scale)
    engine.backward(loss.total)
    engine.step()
    return loss


def kd_warmup(cfg: TrainConfig, epoch: int) -> float:
    """The static-teacher terms' warm-up factor in (0-based) ``epoch``: ``min((epoch + 1) / kd_warmup_epochs, 1)``,
    as mdistiller counts epochs from 1; 1 without warm-up."""
    w = cfg.loss.kd_warmup_epochs
    return min((epoch + 1) / w, 1.0) if w > 0 else 1.0


def _autocast_fn(device: torch.device, dtype: torch.dtype | None) -> Callable[[], contextlib.AbstractContextManager]:
    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)
    return autocast


def _data(cfg: TrainConfig, info: DistInfo) -> tuple[ShardList, ShardList]:
    root = cfg.data.root
    if root is None:
        if info.is_main:
            demo_dataset(progress=True)
        distributed.barrier()
        root = str(demo_dataset())
    train = resolve_shards(root, cfg.data.train_split, allow_pipe=cfg.data.allow_pipe)
    val = resolve_shards(root, cfg.data.val_split, allow_pipe=cfg.data.allow_pipe)
    if train.classes != val.classes:
        raise ConfigError(f"the {cfg.data.train_split} and {cfg.data.val_split} splits of {root!r} have different "
                          "classes")
    return train, val


def _with_ema(ema: PartitionedEma, fn: Callable) -> Callable:
    def run(x: torch.Tensor) -> torch.Tensor:
        with ema.applied():
            return fn(x)
    return run


def _eval_models(module: nn.Module, gpd: bool, prefix: str = "") -> dict[str, Callable]:
    if not gpd:
        return {f"student{prefix}": module}
    return {f"student{prefix}": lambda x: module(x, mode="student"),
            f"dynamic_teacher{prefix}": lambda x: module(x, mode="teacher")}


def _save_best(run_dir: Path, state: dict[str, torch.Tensor], meta: dict) -> None:
    best = run_dir / "best"
    best.mkdir(exist_ok=True)
    tmp = best / ".model.safetensors.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, best / "model.safetensors")
    (best / ".best.json.tmp").write_text(json.dumps(meta, indent=1))
    os.replace(best / ".best.json.tmp", best / "best.json")


def _versions() -> dict[str, str]:
    import timm
    import webdataset
    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "timm": timm.__version__, "webdataset": getattr(webdataset, "__version__", "?")}


class NonFiniteWatch:
    """Counts consecutive non-finite losses on the device, so there is no host sync per step. ``check()`` (at log
    intervals, before every checkpoint and evaluation) raises with the first offending step and its loss terms."""

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit = limit
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.terms: torch.Tensor | None = None
        self.names: list[str] = []

    def update(self, loss: LossOutput, step: int) -> None:
        values = torch.stack([loss.total.detach().float(), *(v.detach().float() for v in loss.terms.values())])
        if self.terms is None:
            self.names, self.terms = ["total", *loss.terms], torch.zeros_like(values)
        bad = ~torch.isfinite(values[0])
        self.run = torch.where(bad, self.run + 1, torch.zeros_like(self.run))
        trigger = (self.run > self.limit) & (self.first_step < 0)
        self.first_step = torch.where(trigger, torch.full_like(self.first_step, step), self.first_step)
        self.terms = torch.where(trigger, values, self.terms)

    def check(self, where: Path) -> None:
        step = int(self.first_step.item())
        if step >= 0:
            terms = dict(zip(self.names, self.terms.tolist(), strict=True))
            raise NonFiniteLossError(f"non-finite loss at step {step} (more than {self.limit} in a row): {terms}; "
                                     f"the last good checkpoint is in {where}")


@dataclass
class _Run:
    """Everything a training run is made of, built by :func:`_assemble`."""

    engine: object
    ema: ModelEma | PartitionedEma | None  # whole, or partitioned like the parameters under ZeRO-3
    static_teacher: StaticTeacher | None
    loader: TrainLoader | MemoryTrainLoader
    val_shards: ShardList
    device_tf: DeviceTransform
    eval_tf: Callable
    loss_fn: GPDLoss
    static_taps: tuple  # where the static teacher's features are read (feature distillation), else ()
    autocast: Callable[[], contextlib.AbstractContextManager]
    ds: dict
    lr: float
    steps_per_epoch: int
    total_steps: int
    end_step: int
    classes: list[str]

    @property
    def gpd(self) -> bool:
        return hasattr(self.engine.module, "width_ratio")

    @property
    def zero3(self) -> bool:
        return zero_stage(self.ds) == 3


def _assemble(cfg: TrainConfig, ds_config: dict, info: DistInfo) -> _Run:
    train_shards, val_shards = distributed.on_all_ranks(lambda: _data(cfg, info), "finding the data")
    num_classes = len(train_shards.classes)
    ds = resolve_ds_config(ds_config, cfg, info.world_size, info.device)
    micro, accumulation = ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]
    model = distributed.on_all_ranks(lambda: build_model(cfg, num_classes), "building the model")
    static_teacher = None
    if cfg.scenario == "distill":
        m = cfg.model
        static_teacher = distributed.on_all_ranks(lambda: build_static_teacher(
            m.static_teacher, num_classes, cfg.data.image_size, m.static_teacher_checkpoint,
            m.static_teacher_pretrained, m.static_teacher_train_mode, cfg.data.mean, cfg.data.std),
            "loading the static teacher")
        static_teacher = static_teacher.to(info.device)
        if cfg.run.channels_last:
            static_teacher = static_teacher.to(memory_format=torch.channels_last)
    static_taps = ()
    if static_teacher is not None and split_kd(cfg.loss.kd)[1] != "none":
        static_taps = feature_taps(static_teacher.model, cfg.model.static_teacher)
    augment = cfg.data.augment
    transform = train_transform(cfg.data.image_size, augment, cfg.data.mean)
    if cfg.data.in_memory:
        loader = distributed.on_all_ranks(lambda: MemoryTrainLoader(
            train_shards, batch_size=micro, rank=info.rank, world_size=info.world_size, transform=transform,
            num_workers=cfg.data.workers, seed=cfg.run.seed, max_bad_fraction=cfg.data.max_bad_fraction,
            max_gb=cfg.data.in_memory_max_gb, max_pixels=cfg.data.max_image_pixels, show_progress=info.is_main),
            "decoding the train split into memory")
    else:
        loader = TrainLoader(train_shards, batch_size=micro, rank=info.rank, world_size=info.world_size,
                             transform=transform, num_workers=cfg.data.workers, seed=cfg.run.seed,
                             shuffle_buffer=cfg.data.shuffle_buffer, max_bad_fraction=cfg.data.max_bad_fraction,
                             max_pixels=cfg.data.max_image_pixels, pin_memory=info.device.type == "cuda",
                             repeated_aug=cfg.data.repeated_aug)
    steps_per_epoch = len(loader) // accumulation
    if steps_per_epoch == 0:
        raise ConfigError(f"one epoch makes {len(loader)} micro-batches per rank, fewer than the "
                          f"{accumulation} accumulation steps of one optimizer step; lower optim.global_batch_size "
                          "(one optimizer step needs more samples than an epoch gives each rank)")
    total_steps = steps_per_epoch * cfg.optim.epochs
    lr = effective_lr(cfg, ds["train_batch_size"])
    model = model.to(info.device)
    zero3 = zero_stage(ds) == 3
    if cfg.run.activation_checkpointing:
        blocks = enable_activation_checkpointing(model)
        if info.is_main:
            log.info("activation checkpointing: %d blocks recompute their activations in backward", blocks)
    optimizer = build_optimizer(model, cfg, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, steps_per_epoch, lr))
    engine = initialize(model, optimizer, scheduler, ds, info.world_size)
    ema = None
    if cfg.optim.ema_decay:  # after the engine has broadcast rank 0's weights (and, ZeRO-3, partitioned them)
        ema = (PartitionedEma if zero3 else ModelEma)(engine.module, cfg.optim.ema_decay)
    if cfg.run.compile:
        engine.compile()
        static_teacher = torch.compile(static_teacher) if static_teacher is not None else None
    return _Run(
        engine=engine, ema=ema,
        static_teacher=static_teacher, loader=loader, val_shards=val_shards,
        device_tf=DeviceTransform(num_classes, info.device, augment, cfg.data.mean, cfg.data.std,
                                  cfg.run.channels_last),
        eval_tf=eval_transform(cfg.data.image_size, cfg.data.crop_pct, cfg.data.interpolation),
        loss_fn=build_loss(cfg), static_taps=static_taps,
        autocast=_autocast_fn(info.device, autocast_dtype(ds)), ds=ds, lr=lr, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, end_step=min(total_steps, cfg.run.max_steps or total_steps),
        classes=list(train_shards.classes))


def build_loss(cfg: TrainConfig) -> GPDLoss:
    """The run's objective from ``cfg.loss``."""
    c = cfg.loss
    kd, features = split_kd(c.kd)
    return GPDLoss(ce_weight=c.ce_weight, kd_weight=c.kd_weight, dynamic_weight=c.dynamic_weight,
                   smoothing=c.smoothing, kd=kd, dkd_alpha=c.dkd_alpha, dkd_beta=c.dkd_beta,
                   temperature=c.temperature, dynamic_loss=c.dynamic_loss, kd_dynamic_teacher=c.kd_dynamic_teacher,
                   features=features, feature_weight=c.reviewkd_weight)


def _evaluate(r: _Run, cfg: TrainConfig, info: DistInfo, static_metrics: dict | None, with_ema: bool
              ) -> dict[str, dict[str, float]]:
    """Student and dynamic teacher (live, and EMA if ``with_ema``), and the static teacher unless known."""
    module = r.engine.module
    distributed.average_running_stats(module)
    models = _eval_models(module, r.gpd)
    if isinstance(r.ema, ModelEma) and with_ema:
        distributed.average_running_stats(r.ema.module)
        models.update(_eval_models(r.ema.module, r.gpd, "_ema"))
    elif r.ema is not None and with_ema:  # the engine's module with the EMA swapped into its partitions
        distributed.average_running_stats(r.ema.shadow_buffers)
        models.update({name: _with_ema(r.ema, fn) for name, fn in _eval_models(module, r.gpd, "_ema").items()})
    if r.static_teacher is not None and static_metrics is None:
        models["static_teacher"] = r.static_teacher
    r.engine.module.eval()
    val = eval_loader(r.val_shards, batch_size=cfg.data.eval_batch_size, rank=info.rank, world_size=info.world_size,
                      transform=r.eval_tf, num_workers=cfg.data.workers, max_bad_fraction=cfg.data.max_bad_fraction,
                      max_pixels=cfg.data.max_image_pixels)
    result = evaluate(models, val, r.device_tf, r.autocast, show_progress=info.is_main,
                      expected=r.val_shards.num_samples, max_bad_fraction=cfg.data.max_bad_fraction,
                      split=f"split {cfg.data.val_split!r}",
                      lockstep=(3, cfg.data.image_size, cfg.data.image_size) if r.zero3 else None)
    r.engine.module.train()
    if static_metrics is not None:
        result["static_teacher"] = static_metrics
    if "dynamic_teacher" in result and hasattr(module, "replica_divergence"):  # every rank: ZeRO-3 gathers
        result["dynamic_teacher"]["replica_divergence"] = module.replica_divergence(
            deepspeed.zero.GatheredParameters if r.zero3 else None)
    return result


def _train_row(r: _Run, loss: LossOutput, elapsed: float, samples: int, data_wait: float) -> dict[str, float]:
    """The per-interval training metrics (the only place the loop syncs with the device)."""
    row = {f"train/{k}": v.item() for k, v in loss.terms.items()}
    row.update({"train/loss": loss.total.item(), "train/lr": r.engine.get_lr()[0],
                "train/images_per_s": samples / elapsed, "train/data_wait": data_wait / elapsed,
                "train/bad_samples": r.loader.bad_samples})
    norm = r.engine.get_global_grad_norm()
    if norm is not None:
        row["train/grad_norm"] = float(norm)
    scaler = getattr(r.engine.optimizer, "torch_autocast_gradscaler", None)
    if scaler is not None:
        row["train/loss_scale"] = float(scaler.get_scale())
        row["train/skipped_steps"] = r.engine.skipped_steps
    if torch.cuda.is_available():
        row["train/gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return row


def train(cfg: TrainConfig, ds_config: dict, run_dir: Path, resume: str, info: DistInfo, overwrite: bool = False,
          stop: StopRequest | None = None) -> RunResult:
    """Train ``cfg`` to the end (or ``run.max_steps``); checkpoints, evaluations and the export go to ``run_dir``.
    ``resume``: auto, none or a path (see :mod:`gpd_ds.checkpoint` for the rules); ``stop``: the process's
    installed stop request (raises :class:`Preempted` after saving when it fires)."""
    cfg.validate()
    stop = stop or StopRequest()
    run_dir.mkdir(parents=True, exist_ok=True)
    distributed.check_shared_dir(run_dir, info)
    checkpoint.prepare_run_dir(run_dir, resume, overwrite, info)
    distributed.seed_all(cfg.run.seed)
    if cfg.run.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    r = _assemble(cfg, ds_config, info)
    engine, ema, spe, ckpt_root = r.engine, r.ema, r.steps_per_epoch, run_dir / "checkpoints"
    checkpoint.install_engine(engine)
    config = json.loads(json.dumps(cfg.to_dict(), default=str))
    resumed = checkpoint.resume(engine, resume, ckpt_root, info, config, zero_stage(r.ds))
    client = resumed.client if resumed is not None else None
    # a checkpoint of another run directory starts a new run here (its own metrics.jsonl and W&B run)
    foreign = resumed is not None and resumed.path.parent != ckpt_root
    global_batch = r.ds["train_batch_size"]
    record = {"config": config, "scenario": cfg.scenario, "ds_config": r.ds, "world_size": info.world_size,
              "device": str(info.device), "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
              "classes": r.classes, "lr": r.lr, "steps_per_epoch": spe, "total_steps": r.total_steps,
              "resident_parameters_per_rank": distributed.all_gather_object(resident_parameters(engine.module)),
              "ema_elements_per_rank": distributed.all_gather_object(ema.numel() if ema is not None else 0),
              "versions": _versions(), "resumed_from": str(resumed.path) if foreign else None}
    if info.is_main:  # after the resume decision: a refused resume leaves the old run's record as it was
        (run_dir / "config.json").write_text(json.dumps(record, indent=1, default=str))
        log.info("run %s: recipe %s, scenario %s, %s on %d x %s, global batch %d (%d x %d ranks x %d), lr %.4g, "
                 "%d steps/epoch x %d epochs", run_dir, cfg.recipe, cfg.scenario, cfg.model.method,
                 info.world_size, info.device.type, global_batch, r.ds["train_micro_batch_size_per_gpu"],
                 info.world_size, r.ds["gradient_accumulation_steps"], r.lr, spe, cfg.optim.epochs)

    # state that outlives a restart, besides the engine's: kept in the checkpoint's client state
    kept: dict = {"best": {}, "static_teacher": None, "start_dynamic_top1": None, "wandb_run_id": None}
    lineage = distributed.broadcast_object(checkpoint.new_lineage())
    if client is not None:
        lineage = client.get("lineage", resumed.marker.lineage)
        _restore_rank_state(client, r.loader, cfg.run.seed, engine.global_steps, info)
        if isinstance(ema, ModelEma):
            ema.load_state_dict(client["ema"])
        elif ema is not None:
            ema.load_state_dict(consolidate(checkpoint.read_rank_tensors(resumed.path), ema.shapes()))
        kept.update(client["kept"])
        if foreign:  # two directories must not write into one W&B run; the source is in the config instead
            kept["wandb_run_id"] = None
        kept["best"] = _best_on_disk(run_dir, engine.global_steps, kept["best"])
    meta = {"lineage": lineage, "zero_stage": zero_stage(r.ds), "config": config}
    wandb_has = -1
    if info.is_main:
        wandb_has = rewind_metrics(run_dir / "metrics.jsonl", engine.global_steps if client is not None else None)
    tracker = Tracker(run_dir, cfg.track, record, info.is_main, kept["wandb_run_id"], wandb_has)
    kept["wandb_run_id"] = distributed.broadcast_object(tracker.run_id)
    distributed.barrier()  # every rank waits for rank 0's (time-limited) W&B start, then all go on together

    def client_state(step: int) -> dict:
        distributed.average_running_stats(engine.module)
        if isinstance(ema, ModelEma):
            distributed.average_running_stats(ema.module)
        elif ema is not None:
            distributed.average_running_stats(ema.shadow_buffers)
        ranks = distributed.all_gather_object({"data": r.loader.state_dict(), "rng": distributed.rng_state()})
        partitioned = isinstance(ema, PartitionedEma)  # its partitions go to per-rank files (checkpoint.save)
        return {"ranks": ranks, "ema": ema.state_dict() if isinstance(ema, ModelEma) else None,
                # the EMA's shapes let export consolidate those files without building the model
                "ema_shapes": {k: list(v) for k, v in ema.shapes().items()} if partitioned else None, "kept": kept,
                "lineage": lineage, "config_digest": cfg.digest(), "step": step, "epoch": step / spe,
                # lets DeepSpeed's ds_to_universal convert the checkpoint for another number of ranks
                UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}

    saved_at = engine.global_steps if resumed is not None and resumed.path.parent == ckpt_root else -1

    def save(step: int) -> Path:
        nonlocal saved_at
        watch.check(ckpt_root)
        path = checkpoint.save(engine, ckpt_root, step, client_state(step), cfg.run.keep_checkpoints, info, meta,
                               rank_tensors=ema.state_dict() if isinstance(ema, PartitionedEma) else None)
        saved_at = step
        return path

    def stop_if_requested(step: int) -> None:
        """All ranks, at the same step: if any rank was asked to stop, save here (unless just saved) and stop."""
        codes = distributed.gather_codes(stop.local_code())
        if not any(codes):
            return
        path = save(step) if saved_at != step else ckpt_root / checkpoint.tag_for(step)
        reason = describe(codes)
        if info.is_main:
            log.warning("stopped at step %d on request (%s): checkpoint %s holds every step so far; run the same "
                        "command to resume (exit code %d)", step, reason, path, EXIT_PREEMPTED)
        tracker.finish_preempted(EXIT_PREEMPTED)
        raise Preempted(step, path, reason)

    def log_eval(results: dict, step: int) -> None:
        if "static_teacher" in results:
            kept["static_teacher"] = results["static_teacher"]
        if kept["start_dynamic_top1"] is None and "dynamic_teacher" in results:
            kept["start_dynamic_top1"] = results["dynamic_teacher"]["top1"]
        tracker.log(eval_metrics(results, kept["start_dynamic_top1"]), step, step / spe, step * global_batch)
        if info.is_main:
            log.info("step %d (epoch %.2f): %s", step, step / spe,
                     ", ".join(f"{k} {d['top1']:.2f}" for k, d in results.items()))

    step = engine.global_steps
    metrics: dict[str, dict[str, float]] = {}
    if client is None and cfg.run.eval_at_start and step < r.end_step:
        log_eval(_evaluate(r, cfg, info, kept["static_teacher"], with_ema=False), step)
    watch = NonFiniteWatch(cfg.run.max_nonfinite_steps, info.device)
    engine.train()
    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
    with Progress(r.end_step, "train", unit="step", enabled=info.is_main, initial=step) as bar:
        while step < r.end_step:
            epoch = step // spe
            r.loader.set_epoch(epoch)
            epoch_end = min((epoch + 1) * spe, r.end_step)
            wait_start = time.perf_counter()
            for batch in r.loader:
                data_wait += time.perf_counter() - wait_start
                x, y = r.device_tf(batch.images, batch.labels)
                loss = train_step(engine, x, y, r.static_teacher, r.loss_fn, r.gpd, r.autocast, r.static_taps,
                                  kd_warmup(cfg, epoch))
                window_samples += x.shape[0] * info.world_size
                wait_start = time.perf_counter()
                if engine.global_steps == step:  # inside an accumulation cycle
                    continue
                step = engine.global_steps
                if ema is not None:
                    ema.update(engine.module)
                watch.update(loss, step)
                bar.update(1)
                if step % cfg.run.log_every_steps == 0 or step == epoch_end:
                    watch.check(ckpt_root)
                    elapsed = time.perf_counter() - window_start
                    row = _train_row(r, loss, elapsed, window_samples, data_wait)
                    tracker.log(row, step, step / spe, step * global_batch)
                    bar.update(0, loss=row["train/loss"], img_s=round(row["train/images_per_s"]), epoch=epoch)
                    window_start, window_samples, data_wait = time.perf_counter(), 0, 0.0
                # before any evaluation at this step: evaluating draws from the RNG (DataLoader seeds), and a
                # resumed run must continue from exactly the state an uninterrupted run has here
                if step % cfg.run.checkpoint_every_steps == 0 or step >= r.end_step:
                    save(step)
                if step % cfg.run.stop_check_steps == 0 and step < r.end_step:
                    stop_if_requested(step)
                if step >= epoch_end:
                    break
            if step >= r.end_step or (step == epoch_end and (step // spe) % cfg.run.eval_every_epochs == 0):
                metrics = _evaluate(r, cfg, info, kept["static_teacher"], with_ema=True)
                log_eval(metrics, step)
                kept["best"] = _update_best(kept["best"], metrics, step, engine.module, ema, run_dir, info, r.zero3)

    if not metrics:
        metrics = _evaluate(r, cfg, info, kept["static_teacher"], with_ema=True)
    result = RunResult(run_dir, step, metrics, kept["best"])
    if cfg.run.export_at_end and info.is_main:
        from gpd_ds.export import export_run
        result.export = str(export_run(run_dir, run_dir / "export" / "student.safetensors", which="best"))
    if kept["best"]:
        tracker.summary({"best/student_top1": kept["best"]["top1"], "best/weights": kept["best"]["weights"],
                         "best/step": kept["best"]["step"]})
    tracker.finish({"student": Path(result.export)} if result.export else None)
    distributed.barrier()
    return result


def _restore_rank_state(client: dict, loader, seed: int, step: int, info: DistInfo) -> None:
    """This rank's data position and RNG from the client state. After a change of world size (elastic resume)
    every rank takes rank 0's data position (the loader re-splits it approximately) and a fresh RNG seeded from
    (run seed, step, rank) (:func:`gpd_ds.distributed.seed_for_new_rank`), so ranks do not draw alike."""
    ranks = client["ranks"]
    if len(ranks) == info.world_size:
        loader.load_state_dict(ranks[info.rank]["data"])
        distributed.set_rng_state(ranks[info.rank]["rng"])
        return
    loader.load_state_dict(ranks[0]["data"])
    distributed.seed_all(distributed.seed_for_new_rank(seed, step, info.rank))
    if info.is_main:
        log.info("the checkpoint was written by %d ranks: each of the %d ranks now draws from a new RNG seeded from "
                 "(run.seed, step %d, rank)", len(ranks), info.world_size, step)


def _best_on_disk(run_dir: Path, step: int, best: dict) -> dict:
    """The evaluation at a checkpoint's step runs after the checkpoint is written, so a run resumed there has
    not seen it; its result (RUN_DIR/best/best.json, written with the weights) counts if it is from before the
    resumed step and newer than the checkpoint's own record."""
    path = run_dir / "best" / "best.json"
    if not path.is_file():
        return best
    disk = json.loads(path.read_text())
    if disk.get("step", step + 1) <= step and disk["step"] > best.get("step", -1):
        return disk
    return best


def _update_best(best: dict, metrics: dict, step: int, module: nn.Module, ema: ModelEma | PartitionedEma | None,
                 run_dir: Path, info: DistInfo, zero3: bool) -> dict:
    """Best = the highest student top-1 of the live or the EMA weights (the reference's save_metric); those
    weights are kept in RUN_DIR/best/ for export."""
    candidates = [("raw", metrics["student"]["top1"])]
    if ema is not None:
        candidates.append(("ema", metrics["student_ema"]["top1"]))
    which, top1 = max(candidates, key=lambda c: c[1])
    if best and top1 <= best["top1"]:
        return best
    best = {"top1": top1, "weights": which, "step": step}
    if isinstance(ema, ModelEma) and which == "ema":
        state = gathered_state_dict(ema.module, zero3=False, keep=info.is_main)
    else:
        with ema.applied() if which == "ema" else contextlib.nullcontext():
            state = gathered_state_dict(module, zero3, keep=info.is_main)
    if info.is_main:
        _save_best(run_dir, state, best)
    return best


# ---------------------------------------------------------------------------------------------------- entry point


def _setup_logging(run_dir: Path, rank: int) -> None:
    logs = run_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter(f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    console = logging.StreamHandler(sys.stdout)
    console.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    console.setFormatter(fmt)
    file = logging.FileHandler(logs / f"rank{rank}.log")
    file.setFormatter(fmt)
    root.addHandler(console)
    root.addHandler(file)
    # DeepSpeed's own warnings once (rank 0); other ranks print only gpd_ds's warnings and errors
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING if rank == 0 else logging.ERROR)


def _log_to_files(message: str, exc_info=None) -> None:
    """Write ``message`` (and a traceback) to RUN_DIR/logs/rankN.log only: the console already shows the error,
    and on a cluster the rank logs are where a failed job is read afterwards. Before logging is set up there is
    no rank log, and nothing to do."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, None, exc_info)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _run_dir(args: argparse.Namespace, cfg: TrainConfig) -> Path:
    if args.run_dir:
        return Path(args.run_dir)
    stamp = distributed.broadcast_object(time.strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.recipe}-{stamp}"


def _demo_teacher(ds_config: dict, run_dir: Path, info: DistInfo, overrides: list[str], stop: StopRequest) -> str:
    """The demo's static teacher: trained once by the framework itself (no GPD), cached as a plain student."""
    teacher_cfg = get_recipe("demo_teacher")
    apply_overrides(teacher_cfg, [o for o in overrides if o.startswith(("data.", "run.seed"))])
    path = cache_dir() / f"demo-teacher-{teacher_cfg.digest()}.safetensors"
    if not path.is_file():
        if info.is_main:
            log.info("training the demo's static teacher (%s, once; cached at %s)", teacher_cfg.model.student, path)
        result = train(teacher_cfg, ds_config, run_dir / "static_teacher", "auto", info, stop=stop)
        if info.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_bytes(Path(result.export).read_bytes())
            os.replace(tmp, path)
        distributed.barrier()
    return str(path)


def _print_summary(result: RunResult, cfg: TrainConfig) -> None:
    m = result.metrics
    rows = [(name, m[key]) for name, key in (("static teacher", "static_teacher"),
                                             ("dynamic teacher", "dynamic_teacher"),
                                             ("dynamic teacher (EMA)", "dynamic_teacher_ema"),
                                             ("student", "student"), ("student (EMA)", "student_ema")) if key in m]
    print(f"\n{'model':24}{'top-1':>8}{'top-5':>8}   ({m['student']['samples']} val images)")
    for name, d in rows:
        print(f"{name:24}{d['top1']:8.2f}{d['top5']:8.2f}")
    if "dynamic_teacher" in m:
        if "static_teacher" in m:
            print(f"gap static - dynamic teacher: {m['static_teacher']['top1'] - m['dynamic_teacher']['top1']:+.2f}")
        print(f"gap dynamic teacher - student: {m['dynamic_teacher']['top1'] - m['student']['top1']:+.2f}")
    if result.best:
        print(f"best student top-1 {result.best['top1']:.2f} ({result.best['weights']} weights, step "
              f"{result.best['step']})")
    if result.export:
        print(f"exported student: {result.export} (+ .json sidecar)")
    print(f"run directory: {result.run_dir}")
    if cfg.data.root is None:
        print("\nOn your own data: gpd-ds make-shards /data/imagenet/train /data/in1k-wds --split train (and val), "
              "then\n  deepspeed launch/train.py --deepspeed_config ds_configs/zero2.json --recipe "
              "resnet18_from_resnet34 --set data.root=/data/in1k-wds --set "
              "model.static_teacher_checkpoint=resnet34.safetensors")


def _writable_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and prove it takes files, before any work."""
    probe = run_dir / f".write-test-{os.getpid()}"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"--run-dir {str(run_dir)!r} cannot be written ({e.strerror or e}); choose a writable "
                          "directory (on a file system every node mounts, for multi-node jobs)") from e


def main(argv: list[str] | None = None) -> int:
    """``gpd-ds train`` / ``launch/train.py`` in-process (:func:`gpd_ds.train_cli.main`: parse, then :func:`run`)."""
    from gpd_ds.train_cli import main as cli_main

    return cli_main(argv)


def run(args: argparse.Namespace) -> int:
    """Train with the parsed arguments of :func:`gpd_ds.train_cli.build_parser`."""
    stop = StopRequest().install()  # first: a SIGTERM during start-up must not kill the rank either
    try:
        cfg = apply_overrides(get_recipe(args.recipe), args.overrides).validate()
        if args.print_config:
            print(json.dumps(cfg.to_dict(), indent=1, default=str))
            return 0
        if args.overwrite and args.resume != "none":
            raise ConfigError(f"--overwrite deletes the run directory's checkpoints and only goes with --resume none "
                              f"(this command has --resume {args.resume})")
        if cfg.data.root is None and cfg.recipe not in ("demo", "demo_teacher"):
            raise ConfigError(f"recipe {cfg.recipe!r} needs data: --set data.root=/path/to/shards (write them with "
                              "`gpd-ds make-shards`); only the demo recipes run on the built-in demo data")
        ds_config = load_ds_config(args.deepspeed_config)
        info = distributed.init()
        run_dir = _run_dir(args, cfg)
        _writable_run_dir(run_dir)
        _setup_logging(run_dir, info.rank)
        demo_needs_teacher = (cfg.recipe == "demo" and cfg.data.root is None and cfg.model.static_teacher
                              and not cfg.model.static_teacher_checkpoint and not cfg.model.static_teacher_pretrained)
        if demo_needs_teacher:
            cfg.model.static_teacher_checkpoint = _demo_teacher(ds_config, run_dir, info, args.overrides, stop)
        result = train(cfg, ds_config, run_dir, args.resume, info, args.overwrite, stop)
    except Preempted:
        return EXIT_PREEMPTED
    except UserInputError as e:
        print(f"gpd-ds train: error: {e}", file=sys.stderr)
        _log_to_files(f"stopped: {e}")
        return 2
    except Exception:  # a bug or an environment failure: keep the traceback, on stderr and in the rank's log
        _log_to_files("failed with an unexpected error", exc_info=sys.exc_info())
        raise
    finally:
        stop.uninstall()
    if info.is_main:
        _print_summary(result, cfg)
    return 0
