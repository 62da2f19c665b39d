"""The run's parts, each built from its own config section: data (``cfg.data``), the trained module and the static
teacher (``cfg.model``), the loss (``cfg.loss``), the optimizer and schedule (``cfg.optim``), the DeepSpeed engine
(the resolved ds_config) and the EMA."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gpd_ds import distributed
from gpd_ds.config import ConfigError, DataConfig, TrainConfig, split_kd
from gpd_ds.data.demo import demo_dataset
from gpd_ds.data.device_decode import DeviceDecoder
from gpd_ds.data.loader import ShardList, TrainLoader, resolve_shards
from gpd_ds.data.memory import MemoryTrainLoader
from gpd_ds.data.transforms import DeviceTransform, TensorTransform, train_transform
from gpd_ds.distributed import DistInfo
from gpd_ds.ema import ModelEma, PartitionedEma
from gpd_ds.engine import (
    autocast_dtype,
    build_optimizer,
    effective_lr,
    initialize,
    lr_factor,
    resolve_ds_config,
    zero_stage,
)
from gpd_ds.features import static_taps
from gpd_ds.gpd.checkpointing import enable_activation_checkpointing
from gpd_ds.losses import GPDLoss
from gpd_ds.models.build import build_model
from gpd_ds.models.teacher import StaticTeacher, build_static_teacher
from gpd_ds.train.compile_policy import compile_decision
from gpd_ds.train.step import Autocast, autocast_fn

log = logging.getLogger("gpd_ds")


@dataclass
class Components:
    """Everything a training run is made of (:func:`build_components`)."""

    engine: object  # the DeepSpeed engine around the trained module
    ema: ModelEma | PartitionedEma | None  # whole, or partitioned like the parameters under ZeRO-3
    static_teacher: StaticTeacher | None
    static_taps: tuple  # where the static teacher's features are read (feature distillation), else ()
    loss_fn: GPDLoss
    loader: TrainLoader | MemoryTrainLoader
    val_shards: ShardList
    device_tf: DeviceTransform
    autocast: Autocast
    ds: dict  # the resolved ds_config
    lr: float
    steps_per_epoch: int
    total_steps: int
    end_step: int  # total_steps, or run.max_steps if smaller
    classes: list[str]

    @property
    def gpd(self) -> bool:
        return hasattr(self.engine.module, "width_ratio")

    @property
    def zero3(self) -> bool:
        return zero_stage(self.ds) == 3

    @property
    def global_batch(self) -> int:
        return self.ds["train_batch_size"]


def find_data(data: DataConfig, info: DistInfo) -> tuple[ShardList, ShardList]:
    """The train and validation shards of ``data.root`` (the demo dataset, made once, without one)."""
    root = data.root
    if root is None:
        if info.is_main:
            demo_dataset(progress=True)
        distributed.barrier()
        root = str(demo_dataset())
    train = resolve_shards(root, data.train_split, allow_pipe=data.allow_pipe)
    val = resolve_shards(root, data.val_split, allow_pipe=data.allow_pipe)
    if train.classes != val.classes:
        raise ConfigError(f"the {data.train_split} and {data.val_split} splits of {root!r} have different classes")
    return train, val


def decode_on(data: DataConfig, device: torch.device) -> tuple[str, str]:
    """Where train images are decoded (``cpu`` or ``device``), and why: ``data.decode``, with ``auto`` resolved to
    the device on CUDA unless the in-memory loader or a PIL auto-augment policy needs the CPU."""
    if data.decode != "auto":
        return data.decode, f"data.decode={data.decode}"
    if device.type != "cuda":
        return "cpu", f"data.decode=auto on a {device.type} device"
    if data.in_memory:
        return "cpu", "data.decode=auto: the in-memory loader decodes the split once, up front"
    if data.augment.auto_augment:
        return "cpu", (f"data.decode=auto: timm's {data.augment.auto_augment} policy works on PIL images in the "
                       "loader workers")
    return "device", "data.decode=auto on CUDA"


def build_train_loader(data: DataConfig, shards: ShardList, batch_size: int, seed: int, info: DistInfo,
                       transform: TensorTransform, decode: str = "cpu") -> TrainLoader | MemoryTrainLoader:
    """The streaming loader, or the in-memory one (``data.in_memory``), for this rank; ``decode``: where its
    images are decoded (:func:`decode_on`)."""
    if data.in_memory:
        return distributed.on_all_ranks(lambda: MemoryTrainLoader(
            shards, batch_size=batch_size, rank=info.rank, world_size=info.world_size, transform=transform,
            num_workers=data.workers, seed=seed, max_bad_fraction=data.max_bad_fraction, max_gb=data.in_memory_max_gb,
            max_pixels=data.max_image_pixels, show_progress=info.is_main), "decoding the train split into memory")
    return TrainLoader(shards, batch_size=batch_size, rank=info.rank, world_size=info.world_size, transform=transform,
                       num_workers=data.workers, seed=seed, shuffle_buffer=data.shuffle_buffer,
                       max_bad_fraction=data.max_bad_fraction, max_pixels=data.max_image_pixels,
                       pin_memory=info.device.type == "cuda", repeated_aug=data.repeated_aug, decode=decode)


def load_static_teacher(cfg: TrainConfig, num_classes: int, info: DistInfo) -> StaticTeacher | None:
    """The frozen static teacher of a distillation run (``model.static_teacher``), on the device; else None."""
    m, d = cfg.model, cfg.data
    if cfg.scenario != "distill":
        return None
    teacher = distributed.on_all_ranks(lambda: build_static_teacher(
        m.static_teacher, num_classes, d.image_size, m.static_teacher_checkpoint, m.static_teacher_pretrained,
        m.static_teacher_train_mode, d.mean, d.std), "loading the static teacher")
    teacher = teacher.to(info.device)
    return teacher.to(memory_format=torch.channels_last) if cfg.run.channels_last else teacher


def _steps_per_epoch(loader, accumulation: int) -> int:
    steps = len(loader) // accumulation
    if steps == 0:
        raise ConfigError(f"one epoch makes {len(loader)} micro-batches per rank, fewer than the {accumulation} "
                          "accumulation steps of one optimizer step; lower optim.global_batch_size (one optimizer "
                          "step needs more samples than an epoch gives each rank)")
    return steps


def build_components(cfg: TrainConfig, ds_config: dict, info: DistInfo) -> Components:
    """Every part of the run, in the order the RNG sees them (the data, the model's initialisation and noise, the
    static teacher, the loader), so that a run is the same on every rank and across versions."""
    train_shards, val_shards = distributed.on_all_ranks(lambda: find_data(cfg.data, info), "finding the data")
    num_classes = len(train_shards.classes)
    ds = resolve_ds_config(ds_config, cfg.optim, info.world_size, info.device)
    model = distributed.on_all_ranks(lambda: build_model(cfg, num_classes), "building the model")
    static_teacher = load_static_teacher(cfg, num_classes, info)
    teacher_taps = ()
    if static_teacher is not None and split_kd(cfg.loss.kd)[1] != "none":
        teacher_taps = static_taps(static_teacher.model, cfg.model.static_teacher, cfg.loss)
    transform = train_transform(cfg.data.image_size, cfg.data.augment, cfg.data.mean)
    decode, why = decode_on(cfg.data, info.device)
    if info.is_main and not cfg.data.in_memory:
        log.info("train images are decoded on the %s (%s)", "loader workers' CPUs" if decode == "cpu" else
                 f"rank's {info.device.type} device", why)
    loader = build_train_loader(cfg.data, train_shards, ds["train_micro_batch_size_per_gpu"], cfg.run.seed, info,
                                transform, decode)
    decoder = (DeviceDecoder(transform, info.device, cfg.data.max_bad_fraction, info.rank) if decode == "device"
               else None)
    steps_per_epoch = _steps_per_epoch(loader, ds["gradient_accumulation_steps"])
    total_steps = steps_per_epoch * cfg.optim.epochs
    lr = effective_lr(cfg.optim, ds["train_batch_size"], finetune=cfg.scenario == "finetune")
    model = model.to(info.device)
    if cfg.run.activation_checkpointing:
        blocks = enable_activation_checkpointing(model)
        if info.is_main:
            log.info("activation checkpointing: %d blocks recompute their activations in backward", blocks)
    optimizer = build_optimizer(model, cfg.optim, lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.optim, steps_per_epoch, lr))
    engine = initialize(model, optimizer, scheduler, ds, info.world_size)
    ema = None
    if cfg.optim.ema_decay:  # after the engine has broadcast rank 0's weights (and, ZeRO-3, partitioned them)
        ema = (PartitionedEma if zero_stage(ds) == 3 else ModelEma)(engine.module, cfg.optim.ema_decay)
    compile_on, why = compile_decision(cfg.run.compile, cfg.model.student, info.device, zero_stage(ds))
    if info.is_main:
        log.info("torch.compile %s: %s", "on" if compile_on else "off", why)
    if compile_on:
        engine.compile()
        static_teacher = torch.compile(static_teacher) if static_teacher is not None else None
    return Components(
        engine=engine, ema=ema, static_teacher=static_teacher, static_taps=teacher_taps,
        loss_fn=GPDLoss.from_config(cfg.loss), loader=loader, val_shards=val_shards,
        device_tf=DeviceTransform(num_classes, info.device, cfg.data.augment, cfg.data.mean, cfg.data.std,
                                  cfg.run.channels_last, decoder),
        autocast=autocast_fn(info.device, autocast_dtype(ds)), ds=ds, lr=lr, steps_per_epoch=steps_per_epoch,
        total_steps=total_steps, end_step=min(total_steps, cfg.run.max_steps or total_steps),
        classes=list(train_shards.classes))
