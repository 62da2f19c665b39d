"""The run configuration: typed dataclasses, ``--set key=value`` overrides, validation.

One source of truth for everything except DeepSpeed's own keys (batch sizes, clipping, precision, ZeRO), which
live in the ds_config JSON (see :mod:`gpd_ds.engine`). The two mirrored values, ``optim.global_batch_size`` and
``optim.grad_clip``, are the recipe's values: they fill the ds_config where it is silent and must agree with it
where it is not.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gpd_ds.data.transforms import Augment
from gpd_ds.errors import UserInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserInputError, ValueError):
    """A configuration value cannot be used (names the key, the value and the fix)."""


@dataclass
class ModelConfig:
    student: str = "resnet18"  # timm name, or torchvision:NAME
    student_kwargs: dict = field(default_factory=dict)  # extra builder arguments (e.g. drop_path_rate)
    student_checkpoint: str | None = None  # local weights: makes the run a fine-tuning run
    static_teacher: str | None = None  # timm name (optionally with a pretrained tag) or torchvision:NAME
    static_teacher_checkpoint: str | None = None  # local .safetensors / .pth state dict
    static_teacher_pretrained: bool = False  # download timm's pretrained weights (needs network)
    static_teacher_train_mode: bool = False  # the reference runs the static teacher's BatchNorm in train mode
    method: str = "gpd"  # gpd, or plain (no dynamic teacher: baselines, teacher training)
    width_ratio: int = 2
    branches: bool = False  # multi-branch 3x3 convs in the dynamic teacher (the reference's --use_orepa)
    noise_std: float = 1e-6
    distillation_token: bool = False  # DeiT distilled students: the distillation head learns from the static teacher


@dataclass
class DataConfig:
    root: str | None = None  # shards root with _info.json (or a URL); None: the offline demo dataset
    train_split: str = "train"
    val_split: str = "val"
    image_size: int = 224
    workers: int = 8  # loader processes per rank
    shuffle_buffer: int = 1000
    max_bad_fraction: float = 0.01
    eval_batch_size: int = 250  # per rank
    crop_pct: float = 0.875
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    allow_pipe: bool = False
    in_memory: bool = False  # decode the train split once and augment from RAM (CIFAR-size data; see data/memory.py)
    in_memory_max_gb: float = 8.0  # refuse in_memory above this decoded size per rank
    max_image_pixels: int = 89_478_485  # larger images (width x height, from the header) are skipped and counted
    augment: Augment = field(default_factory=Augment)


@dataclass
class LossConfig:
    kd: str = "dkd"  # dkd, kl or none (the static-teacher term psi)
    dkd_alpha: float = 1.0
    dkd_beta: float = 0.5
    temperature: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    dynamic_weight: float = 3.0  # weight of SCE(student, detached dynamic teacher)
    smoothing: float = 0.1  # label smoothing of that SCE target


@dataclass
class OptimConfig:
    optimizer: str = "sgd"  # sgd or adamw
    lr: float = 0.1  # at lr_ref_batch; scaled linearly with the global batch
    lr_ref_batch: int = 512
    finetune_lr_scale: float = 0.1  # fine-tuning runs use lr x this
    momentum: float = 0.9
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    decay_norm_and_bias: bool = True  # CNN recipe: decay everything; ViT recipe: not 1-D tensors, biases, tokens
    schedule: str = "step"  # step or cosine
    epochs: int = 100
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-6
    milestones: tuple[int, ...] = (30, 60, 90)  # step schedule, in epochs
    gamma: float = 0.1
    min_lr: float = 1e-5  # cosine floor
    cooldown_epochs: int = 0  # cosine: epochs at min_lr after the decay
    ema_decay: float | None = 0.99996  # fp32 EMA of the whole GPD model; None: off
    global_batch_size: int | None = 512  # mirrors ds_config train_batch_size
    grad_clip: float | None = 5.0  # mirrors ds_config gradient_clipping (None: take the ds_config's)


@dataclass
class RunConfig:
    seed: int = 42
    log_every_steps: int = 50
    eval_every_epochs: int = 1
    checkpoint_every_steps: int = 1000
    keep_checkpoints: int = 3
    # how often the ranks agree on a stop request (SIGTERM/SIGINT/SIGUSR1): one small CPU all-reduce, no GPU sync
    stop_check_steps: int = 5
    max_steps: int | None = None  # stop early (smoke tests); the schedule still spans all epochs
    deterministic: bool = False
    max_nonfinite_steps: int = 0  # consecutive non-finite losses tolerated (fp16 overflow) before stopping
    export_at_end: bool = True
    channels_last: bool = True
    eval_at_start: bool = True  # the starting accuracies: the baseline of the dynamic teacher's growth
    activation_checkpointing: bool = False  # recompute each block in backward (gpd/checkpointing.py): less memory
    compile: bool = False  # torch.compile the GPD model (engine.compile) and the static teacher; see BENCHMARKS.md


@dataclass
class TrackConfig:
    wandb: str = "auto"  # auto (online with WANDB_API_KEY, else offline), online, offline, disabled
    project: str = "gpd_ds"
    entity: str | None = None
    name: str | None = None  # default: the run directory's name
    group: str | None = None
    tags: tuple[str, ...] = ()
    notes: str | None = None
    init_timeout: float = 60.0  # seconds wandb.init may take before the run goes on without W&B
    log_artifacts: bool = False  # upload the exported student as a W&B artifact


@dataclass
class TrainConfig:
    recipe: str = "custom"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    track: TrackConfig = field(default_factory=TrackConfig)

    @property
    def scenario(self) -> str:
        """distill (with a static teacher), finetune (from student weights) or scratch."""
        if self.model.static_teacher:
            return "distill"
        return "finetune" if self.model.student_checkpoint else "scratch"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True, default=str).encode()).hexdigest()[:16]

    def validate(self) -> TrainConfig:
        m, o, d, r = self.model, self.optim, self.data, self.run
        checks = [
            (m.method in ("gpd", "plain"), "model.method", m.method, "use gpd or plain"),
            (isinstance(m.width_ratio, int) and m.width_ratio >= 2, "model.width_ratio", m.width_ratio,
             "use an integer >= 2 (2 in the paper)"),
            (o.optimizer in ("sgd", "adamw"), "optim.optimizer", o.optimizer, "use sgd or adamw"),
            (o.schedule in ("step", "cosine"), "optim.schedule", o.schedule, "use step or cosine"),
            (o.lr > 0, "optim.lr", o.lr, "use a positive learning rate"),
            (o.epochs >= 1, "optim.epochs", o.epochs, "use at least 1 epoch"),
            (o.ema_decay is None or 0 < o.ema_decay < 1, "optim.ema_decay", o.ema_decay,
             "use a value in (0, 1), e.g. 0.99996, or none"),
            (self.loss.kd in ("dkd", "kl", "none"), "loss.kd", self.loss.kd, "use dkd, kl or none"),
            (d.image_size >= 8, "data.image_size", d.image_size, "use the training resolution, e.g. 224"),
            (d.workers >= 0, "data.workers", d.workers, "use 0 or more loader processes"),
            (r.log_every_steps >= 1, "run.log_every_steps", r.log_every_steps, "use >= 1"),
            (r.keep_checkpoints >= 1, "run.keep_checkpoints", r.keep_checkpoints, "use >= 1"),
            (r.checkpoint_every_steps >= 1, "run.checkpoint_every_steps", r.checkpoint_every_steps, "use >= 1"),
            (r.stop_check_steps >= 1, "run.stop_check_steps", r.stop_check_steps,
             "use >= 1 (a stop request is honoured within that many optimizer steps)"),
            (self.track.wandb in ("auto", "online", "offline", "disabled"), "track.wandb", self.track.wandb,
             "use auto, online, offline or disabled"),
            (not (m.static_teacher_checkpoint and m.static_teacher_pretrained), "model.static_teacher_pretrained",
             m.static_teacher_pretrained, "set either a local static_teacher_checkpoint or pretrained, not both"),
            (m.static_teacher is not None or not (m.static_teacher_checkpoint or m.static_teacher_pretrained),
             "model.static_teacher", m.static_teacher, "name the static teacher's architecture"),
            (not m.distillation_token or (m.static_teacher is not None and self.loss.kd != "none"),
             "model.distillation_token", m.distillation_token,
             "the distillation head learns from the static teacher: set model.static_teacher and loss.kd"),
        ]
        for ok, key, value, fix in checks:
            if not ok:
                raise ConfigError(f"{key}={value!r} is invalid: {fix}")
        return self


def _section_fields(obj: Any) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _all_keys(obj: Any, prefix: str = "") -> list[str]:
    keys = []
    for name, _f in _section_fields(obj).items():
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += _all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(f"{prefix}{name}")
    return keys


def _parse(text: str, kind: Any, key: str) -> Any:
    """Parse an override value for a field annotated ``kind`` (a type hint)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (types.UnionType, typing.Union):
        if text.lower() in ("none", "null", ""):
            if type(None) in args:
                return None
            raise ConfigError(f"{key} cannot be none")
        return _parse(text, next(a for a in args if a is not type(None)), key)
    try:
        if kind is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if kind in (int, float, str):
            return kind(text)
        if origin is tuple or kind is tuple:
            items = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t.strip()]
            inner = args[0] if args else str
            return tuple(_parse(str(i), inner, key) for i in items)
        if kind is dict or origin is dict:
            value = json.loads(text)
            if not isinstance(value, dict):
                raise ValueError(text)
            return value
    except (ValueError, json.JSONDecodeError, StopIteration) as e:
        raise ConfigError(f"--set {key}={text!r}: cannot read {text!r} as {getattr(kind, '__name__', kind)}") from e
    raise ConfigError(f"--set {key}: fields of type {kind} cannot be overridden")


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (``--set``) in order."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} is not key=value (e.g. --set optim.lr=0.05)")
        key, text = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        target = cfg
        for part in parts[:-1]:
            if part not in _section_fields(target) or not dataclasses.is_dataclass(getattr(target, part)):
                target = None
                break
            target = getattr(target, part)
        fields = _section_fields(target) if target is not None else {}
        if target is None or parts[-1] not in fields or dataclasses.is_dataclass(getattr(target, parts[-1])):
            close = difflib.get_close_matches(key, _all_keys(cfg), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else " See `gpd-ds train --print-config`."
            raise ConfigError(f"--set {key}: unknown config key.{hint}")
        hints = typing.get_type_hints(type(target))
        setattr(target, parts[-1], _parse(text.strip(), hints[parts[-1]], key))
    return cfg


def from_dict(data: dict) -> TrainConfig:
    """Rebuild a config saved with :meth:`TrainConfig.to_dict` (e.g. ``config.json`` in a run dir)."""
    def build(cls: type, values: dict) -> Any:
        hints = typing.get_type_hints(cls)
        kwargs = {}
        for name, value in values.items():
            kind = hints.get(name)
            if dataclasses.is_dataclass(kind):
                kwargs[name] = build(kind, value)
            elif isinstance(value, list):
                kwargs[name] = tuple(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    data = dict(data)
    cfg = build(TrainConfig, {k: v for k, v in data.items() if k in _section_fields(TrainConfig)})
    return cfg
