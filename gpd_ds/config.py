"""The run configuration: typed dataclasses, ``--set key=value`` overrides, validation.

One source of truth for everything except DeepSpeed's own keys (batch sizes, clipping, precision, ZeRO), which
live in the ds_config JSON (see :mod:`gpd_ds.engine`). The two mirrored values, ``optim.global_batch_size`` and
``optim.grad_clip``, are the recipe's values: they fill the ds_config where it is silent and must agree with it
where it is not. :meth:`TrainConfig.validate` checks every field (type, range, the rules between fields) before
any import of torch; :func:`gpd_ds.config_checks.check_config` then checks what needs torch and timm (model names).
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from gpd_ds.errors import UserInputError
from gpd_ds.registry import FEATURE_LOSSES, KD_LOSSES

# This module imports neither torch nor timm (the checks that need them import them when they run): the recipes and
# `gpd-ds train --help` read it in a fraction of a second.

TORCHVISION_PREFIX = "torchvision:"
DYNAMIC_LOSSES = ("sce", "ce", "mse", "l1")

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(UserInputError, ValueError):
    """A configuration value cannot be used (names the key, the value and the fix)."""


def split_kd(kd: str) -> tuple[str, str] | None:
    """``loss.kd`` as (logit term, feature term): ``dkd`` -> (dkd, none), ``dkd+reviewkd`` -> (dkd, reviewkd),
    ``fitnet`` -> (none, fitnet), ``none`` -> (none, none); None if it names no registered KD loss
    (:data:`gpd_ds.registry.KD_LOSSES`) or feature loss (:data:`gpd_ds.registry.FEATURE_LOSSES`)."""
    logit, plus, feature = kd.partition("+")
    if not plus and logit in FEATURE_LOSSES:
        return "none", logit
    if plus and feature not in FEATURE_LOSSES:
        return None
    if logit in KD_LOSSES or (logit == "none" and not plus):
        return logit, feature or "none"
    return None


def kd_choices() -> tuple[str, ...]:
    """Every value loss.kd takes: each registered KD loss, each feature loss, each pair joined by +, none."""
    names, features = KD_LOSSES.names(), FEATURE_LOSSES.names()
    return (*names, *features, *(f"{n}+{f}" for f in features for n in names), "none")


def _kd_fix() -> str:
    return (f"use one of {', '.join(kd_choices())} (a loss of your own: register it in "
            "gpd_ds.registry.KD_LOSSES or FEATURE_LOSSES)")


@dataclass
class Augment:
    """Train-time augmentation (:mod:`gpd_ds.data.transforms` builds it). Defaults are the CNN recipe
    (RandomResizedCrop + flip only)."""

    pad_crop: int = 0  # > 0: CIFAR-style RandomCrop with this zero padding instead of RandomResizedCrop
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.0
    auto_augment: str | None = None  # e.g. "rand-m9-mstd0.5-inc1" (DeiT)
    interpolation: str = "bilinear"
    random_erasing: float = 0.0  # probability, applied on the device (DeiT: 0.25)
    mixup: float = 0.0  # alpha (DeiT: 0.8)
    cutmix: float = 0.0  # alpha (DeiT: 1.0)
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.0  # folded into the mixed targets (DeiT: 0.1)


@dataclass
class ModelConfig:
    student: str = "resnet18"  # timm name, or torchvision:NAME
    student_kwargs: dict = field(default_factory=dict)  # extra builder arguments (e.g. drop_path_rate)
    # timm ResNets start each block's last BatchNorm gamma at 0 (zero_init_last, timm's default: none here); the
    # reference's ResNet at 1: false in the paper recipes. Only the initialisation: no effect on a resumed run
    zero_init_last: bool | None = None
    student_checkpoint: str | None = None  # local weights: makes the run a fine-tuning run
    static_teacher: str | None = None  # timm name (optionally with a pretrained tag) or torchvision:NAME
    static_teacher_checkpoint: str | None = None  # local .safetensors / .pth state dict
    static_teacher_pretrained: bool = False  # download timm's pretrained weights (needs network)
    static_teacher_train_mode: bool = False  # the reference runs the static teacher's BatchNorm in train mode
    method: str = "gpd"  # gpd; plain (no dynamic teacher: baselines, teacher training); peer (a same-size peer
    # in the dynamic teacher's place: the online-KD control of models/peer.py)
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
    repeated_aug: int = 1  # DeiT's repeated augmentation: each sample R times per epoch, on R consecutive ranks, each
    # copy augmented differently, the epoch's length kept (DeiT/RVT: 3); 1: off. Streaming loader only
    # where train images are decoded (data/device_decode.py): cpu (the loader workers), device (the rank's device:
    # nvJPEG on a GPU; workers only read bytes and draw crops), auto (device on CUDA where the augmentation allows)
    decode: str = "auto"
    augment: Augment = field(default_factory=Augment)


@dataclass
class LossConfig:
    # the static-teacher terms: a logit term psi (a registered KD loss: dkd, kl, dist), a feature loss (reviewkd,
    # fitnet), both joined by + (dkd+reviewkd), or none
    kd: str = "dkd"
    kd_dynamic_teacher: bool = True  # the static-teacher terms for the dynamic teacher too (off: the reference's
    # --deactive_kd_static_teacher)
    kd_warmup_epochs: float = 0.0  # static-teacher terms x min(epoch / this, 1), epochs counted from 1 (mdistiller's
    # CIFAR recipes: 20); 0: none, as the reference
    dkd_alpha: float = 1.0
    dkd_beta: float = 0.5
    dist_beta: float = 1.0  # DIST's inter-class (per-sample) relation weight (Huang et al. 2022: 1)
    dist_gamma: float = 1.0  # DIST's intra-class (per-class, over the batch) relation weight (1)
    logit_standardize: bool = False  # z-score each sample's logits before the logit KD loss (Sun et al. 2024)
    temperature: float = 1.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    dynamic_weight: float = 3.0  # weight of the dynamic teacher -> student term
    dynamic_loss: str = "sce"  # that term: sce (the reference's --kd_loss_type sce), ce (no smoothing), mse, l1
    smoothing: float = 0.1  # label smoothing of the SCE target
    reviewkd_weight: float = 1.0  # weight of each ReviewKD term (the reference: 1.0 for every pair)
    reviewkd_mid_channels: int = 512  # width of the ABF fusion maps (the reference: 512 for ResNet18, 256 MobileNet)
    # ResNet stage features after their last ReLU, as the reference's code reads them (an in-place ReLU overwrites
    # its pre-ReLU output); false: before it, as the spec, ReviewKD's paper and mdistiller. The paper recipes: true
    reviewkd_post_relu: bool = False
    fitnet_weight: float = 1.0  # weight of each FitNets hint term (mean over levels; CRD's one-hint benchmark: 100)
    # where feature distillation reads (gpd_ds/tap_sets.py): module paths, 'path' its output, 'path:input' its input,
    # shallow -> deep, as many for the student as for the static teacher; empty: the family's default five levels
    student_taps: tuple[str, ...] = ()
    teacher_taps: tuple[str, ...] = ()


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
    # when the ranks agree on a stop request (SIGTERM/SIGINT/SIGUSR1; one small CPU all-reduce, no GPU sync): every
    # floor(stop_latency_s / measured step time) steps, at least 1 and at most stop_check_steps (train/stop_check.py)
    stop_check_steps: int = 5
    stop_latency_s: float = 5.0
    max_steps: int | None = None  # stop early (smoke tests); the schedule still spans all epochs
    deterministic: bool = False
    max_nonfinite_steps: int = 0  # consecutive non-finite losses tolerated (fp16 overflow) before stopping
    export_at_end: bool = True
    channels_last: bool = True
    eval_at_start: bool = True  # the starting accuracies: the baseline of the dynamic teacher's growth
    activation_checkpointing: bool = False  # recompute each block in backward (gpd/checkpointing.py): less memory
    # torch.compile the trained model (engine.compile) and the static teacher: true, false, or auto (on where it was
    # verified equal and faster: train/compile_policy.py, BENCHMARKS.md; off elsewhere, with a log line saying why)
    compile: bool | str = "auto"


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
        """Check every field (type, then range) and the fields that depend on each other; raises
        :class:`ConfigError` naming the key, the value and the fix. Instant, with no torch or timm import: the
        command line runs it first. The checks that need them (model names, the student's keyword arguments, the
        auto-augment policy) are :func:`gpd_ds.config_checks.check_config`'s."""
        fields = list(_leaf_fields(self))
        for key, value, hint in fields:
            if not _fits(value, hint):
                raise ConfigError(f"{key}={value!r} is invalid: use {_describe(hint)}")
        values = {key: value for key, value, _ in fields}
        rows = [(check(values[key]), key, values[key], fix) for key, check, fix in _RULES]
        for ok, key, value, fix in [*rows, *_cross_field_rows(self)]:
            if not ok:
                raise ConfigError(f"{key}={value!r} is invalid: {fix() if callable(fix) else fix}")
        return self


# --- validation ------------------------------------------------------------------------------------------------
# TrainConfig.validate checks each field's type from the dataclass hints (_fits), then its range (_RULES, one row
# per non-bool field), then the rules that tie fields together (_cross_field_rows). gpd_ds.config_checks adds the checks
# that need torch and timm.


def _leaf_fields(section: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted key, value, type hint) of every field that is not itself a section."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        value, hint, key = getattr(section, f.name), hints[f.name], f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, hint):
                raise ConfigError(f"{key}={value!r} is invalid: use the {hint.__name__} dataclass (a section)")
            yield from _leaf_fields(value, f"{key}.")
        else:
            yield key, value, hint


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the type of a field annotated ``hint``. A float field takes an int but no nan/inf; an
    int field takes no float (2.0); a bool is no number here (Python counts True as 1); a list stands for a tuple
    (JSON has no tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint in (bool, str):
        return isinstance(value, hint)
    if isinstance(value, bool):
        return False
    if hint is int:
        return isinstance(value, int)
    if hint is float:
        return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    if hint is dict or origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if origin is tuple:
        if not isinstance(value, tuple | list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    raise TypeError(f"config fields of type {hint} have no type check; add one to _fits")


_NAMES = {bool: ("true or false", "true/false values"), int: ("an integer", "integers"),
          float: ("a finite number", "finite numbers"), str: ("a string", "strings"),
          dict: ("a JSON object", "JSON objects")}


def _describe(hint: Any) -> str:
    """What a field annotated ``hint`` takes, for a message: "an integer", "none or a finite number"..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        kinds = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(["none", *kinds] if type(None) in args else kinds)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_NAMES[args[0]][1]}"
        return f"a list of {len(args)} {_NAMES[args[0]][1]}"
    return _NAMES[origin or hint][0]


def _at_least(low: float) -> Callable[[Any], bool]:
    return lambda v: v >= low


def _above(low: float) -> Callable[[Any], bool]:
    return lambda v: v > low


def _within(low: float, high: float, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """The interval from low to high, each end closed unless marked open."""
    return lambda v: (v > low if low_open else v >= low) and (v < high if high_open else v <= high)


def _one_of(*choices: str) -> Callable[[Any], bool]:
    return lambda v: v in choices


def _optional(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: v is None or check(v)


def _each(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: all(check(x) for x in v)


def _nonempty(v: str) -> bool:
    return bool(v.strip())


def _increasing_pair(high: float = math.inf) -> Callable[[Any], bool]:
    """(low, high) bounds of a random draw: positive, low <= high, high at most ``high``."""
    return lambda v: 0 < v[0] <= v[1] <= high


def _increasing(v: tuple[int, ...]) -> bool:
    return all(m >= 0 for m in v) and all(a < b for a, b in itertools.pairwise(v))


_PROBABILITY = _within(0, 1)
_FRACTION = _within(0, 1, high_open=True)
_WEIGHT = _at_least(0)
_TAP_FIX = "write each tap as a module path ('stages.2', its output) or 'path:input' (its input), e.g. head.fc:input"


def _tap_spec(spec: str) -> bool:
    path, _, where = spec.partition(":")
    return bool(path.strip()) and where in ("", "input", "output")
_AT_LEAST_ONE = _at_least(1)
_RESERVED_STUDENT_KWARGS = ("num_classes", "image_size", "pretrained")

# (key, check of its value, fix). Types are checked before: a check sees a value of its field's type.
_RULES: tuple[tuple[str, Callable[[Any], bool], str], ...] = (
    ("recipe", lambda v: _nonempty(v) and "/" not in v, "use a name without '/' (it names runs/<recipe>-<time>)"),
    ("model.student", _nonempty, "name a timm model (e.g. resnet18) or torchvision:NAME"),
    ("model.student_kwargs", lambda v: not set(v) & set(_RESERVED_STUDENT_KWARGS),
     "drop num_classes (it comes from the data), image_size (data.image_size) and pretrained (use "
     "model.student_checkpoint)"),
    ("model.student_checkpoint", _optional(_nonempty), "use a local weights file, or none"),
    ("model.static_teacher", _optional(_nonempty), "name a timm model (e.g. resnet34.tv_in1k) or torchvision:NAME, "
     "or none"),
    ("model.static_teacher_checkpoint", _optional(_nonempty), "use a local .safetensors/.pth file, or none"),
    ("model.method", _one_of("gpd", "plain", "peer"), "use gpd, plain or peer (the same-size online-peer control)"),
    ("model.width_ratio", _at_least(2), "use an integer >= 2 (2 in the paper)"),
    ("model.noise_std", _at_least(0), "use a standard deviation >= 0 (default 1e-6)"),
    ("model.zero_init_last", _optional(lambda v: isinstance(v, bool)), "use true, false (the reference's ResNet "
     "init), or none (the model's default)"),
    ("data.root", _optional(_nonempty), "use the shards root (with _info.json), or none for the demo data"),
    ("data.train_split", _nonempty, "name the train split, e.g. train"),
    ("data.val_split", _nonempty, "name the validation split, e.g. val"),
    ("data.image_size", _at_least(8), "use the training resolution, e.g. 224"),
    ("data.workers", _at_least(0), "use 0 or more loader processes"),
    ("data.shuffle_buffer", _AT_LEAST_ONE, "use >= 1 samples per loader worker (default 1000; 1: no shuffling "
     "within the shards)"),
    ("data.max_bad_fraction", _FRACTION, "use a fraction in [0, 1) of unreadable images to tolerate, e.g. 0.01"),
    ("data.eval_batch_size", _AT_LEAST_ONE, "use >= 1 images per rank, e.g. 250"),
    ("data.crop_pct", _within(0, 1, low_open=True), "use a fraction in (0, 1]: evaluation resizes to "
     "image_size / crop_pct and center-crops image_size (0.875: 256 -> 224)"),
    ("data.interpolation", _one_of("bilinear", "bicubic"), "use bilinear or bicubic"),
    ("data.mean", _each(_within(0, 1)), "use 3 per-channel means of pixels scaled to [0, 1], e.g. 0.485,0.456,0.406"),
    ("data.std", _each(_above(0)), "use 3 positive per-channel standard deviations, e.g. 0.229,0.224,0.225"),
    ("data.in_memory_max_gb", _above(0), "use a positive size in GB, e.g. 8"),
    ("data.max_image_pixels", _AT_LEAST_ONE, "use a positive pixel count (width x height)"),
    ("data.repeated_aug", _AT_LEAST_ONE, "use 1 (off) or the copies of each sample per epoch, e.g. 3 (DeiT, RVT)"),
    ("data.decode", _one_of("auto", "cpu", "device"), "use auto (device on a GPU where it can), cpu or device"),
    ("data.augment.pad_crop", _at_least(0), "use 0 (RandomResizedCrop) or a padding in pixels, e.g. 4 (CIFAR)"),
    ("data.augment.scale", _increasing_pair(high=1), "use 2 increasing area fractions in (0, 1], e.g. 0.08,1.0"),
    ("data.augment.ratio", _increasing_pair(), "use 2 increasing positive aspect ratios, e.g. 0.75,1.333"),
    ("data.augment.hflip", _PROBABILITY, "use a probability in [0, 1]"),
    ("data.augment.color_jitter", _at_least(0), "use a strength >= 0 (0: off)"),
    ("data.augment.auto_augment", _optional(_nonempty), "use a timm policy (e.g. rand-m9-mstd0.5-inc1), or none"),
    ("data.augment.interpolation", _one_of("bilinear", "bicubic"), "use bilinear or bicubic"),
    ("data.augment.random_erasing", _PROBABILITY, "use a probability in [0, 1] (DeiT: 0.25)"),
    ("data.augment.mixup", _at_least(0), "use an alpha >= 0 (0: off; DeiT: 0.8)"),
    ("data.augment.cutmix", _at_least(0), "use an alpha >= 0 (0: off; DeiT: 1.0)"),
    ("data.augment.mixup_switch_prob", _PROBABILITY, "use a probability in [0, 1]"),
    ("data.augment.label_smoothing", _FRACTION, "use a value in [0, 1) (DeiT: 0.1)"),
    ("loss.kd", lambda v: split_kd(v) is not None, lambda: _kd_fix()),
    ("loss.kd_warmup_epochs", _at_least(0), "use 0 (no warm-up) or more epochs, e.g. 20"),
    ("loss.dynamic_loss", _one_of(*DYNAMIC_LOSSES), f"use one of {', '.join(DYNAMIC_LOSSES)}"),
    ("loss.reviewkd_weight", _WEIGHT, "use a weight >= 0 (1.0 in the reference)"),
    ("loss.fitnet_weight", _WEIGHT, "use a weight >= 0 (1.0)"),
    ("loss.student_taps", _each(_tap_spec), _TAP_FIX),
    ("loss.teacher_taps", _each(_tap_spec), _TAP_FIX),
    ("loss.reviewkd_mid_channels", _AT_LEAST_ONE, "use a positive channel count (512; 256 for MobileNet)"),
    ("loss.dkd_alpha", _WEIGHT, "use a weight >= 0 (default 1.0)"),
    ("loss.dkd_beta", _WEIGHT, "use a weight >= 0 (0.5; 2.0 for MobileNet in the paper)"),
    ("loss.temperature", _above(0), "use a positive temperature, e.g. 1.0"),
    ("loss.dist_beta", _WEIGHT, "use a weight >= 0 (default 1.0)"),
    ("loss.dist_gamma", _WEIGHT, "use a weight >= 0 (default 1.0)"),
    ("loss.ce_weight", _WEIGHT, "use a weight >= 0"),
    ("loss.kd_weight", _WEIGHT, "use a weight >= 0"),
    ("loss.dynamic_weight", _WEIGHT, "use a weight >= 0 (3.0 in the paper)"),
    ("loss.smoothing", _FRACTION, "use a label smoothing in [0, 1), e.g. 0.1"),
    ("optim.optimizer", _one_of("sgd", "adamw"), "use sgd or adamw"),
    ("optim.lr", _above(0), "use a positive learning rate"),
    ("optim.lr_ref_batch", _AT_LEAST_ONE, "use the global batch the lr is given at, e.g. 512"),
    ("optim.finetune_lr_scale", _above(0), "use a positive factor, e.g. 0.1"),
    ("optim.momentum", _FRACTION, "use a momentum in [0, 1), e.g. 0.9"),
    ("optim.betas", _each(_FRACTION), "use 2 AdamW betas in [0, 1), e.g. 0.9,0.999"),
    ("optim.eps", _above(0), "use a small positive number, e.g. 1e-8"),
    ("optim.weight_decay", _at_least(0), "use a weight decay >= 0, e.g. 1e-4"),
    ("optim.schedule", _one_of("step", "cosine"), "use step or cosine"),
    ("optim.epochs", _AT_LEAST_ONE, "use at least 1 epoch"),
    ("optim.warmup_epochs", _at_least(0), "use 0 or more epochs, fewer than optim.epochs"),
    ("optim.warmup_lr", _at_least(0), "use a learning rate >= 0, e.g. 1e-6"),
    ("optim.milestones", _increasing, "use increasing epochs >= 0, e.g. 30,60,90"),
    ("optim.gamma", _within(0, 1, low_open=True), "use a decay factor in (0, 1], e.g. 0.1"),
    ("optim.min_lr", _at_least(0), "use a learning rate >= 0, e.g. 1e-5"),
    ("optim.cooldown_epochs", _at_least(0), "use 0 or more epochs, fewer than optim.epochs"),
    ("optim.ema_decay", _optional(_within(0, 1, low_open=True, high_open=True)),
     "use a value in (0, 1), e.g. 0.99996, or none"),
    ("optim.global_batch_size", _optional(_AT_LEAST_ONE), "use a positive number of images per optimizer step over "
     "all ranks (it mirrors ds_config train_batch_size), or none to take the ds_config's"),
    ("optim.grad_clip", _optional(_at_least(0)), "use a max gradient norm >= 0 (0: no clipping; it mirrors ds_config "
     "gradient_clipping), or none to take the ds_config's"),
    ("run.seed", _at_least(0), "use an integer >= 0"),
    ("run.log_every_steps", _AT_LEAST_ONE, "use >= 1"),
    ("run.eval_every_epochs", _AT_LEAST_ONE, "use >= 1 (evaluate every that many epochs)"),
    ("run.checkpoint_every_steps", _AT_LEAST_ONE, "use >= 1"),
    ("run.keep_checkpoints", _AT_LEAST_ONE, "use >= 1"),
    ("run.stop_check_steps", _AT_LEAST_ONE, "use >= 1 (the most optimizer steps between two stop checks)"),
    ("run.stop_latency_s", lambda v: 0 < v <= 20, "use seconds in (0, 20]: how long a stop may wait for the next check "
     "(DeepSpeed's launcher kills the ranks 30 s after forwarding Ctrl-C/SIGTERM)"),
    ("run.max_steps", _optional(_AT_LEAST_ONE), "use >= 1 optimizer steps, or none to train all epochs"),
    ("run.max_nonfinite_steps", _at_least(0), "use 0 (stop at the first non-finite loss) or more"),
    ("track.wandb", _one_of("auto", "online", "offline", "disabled"), "use auto, online, offline or disabled"),
    ("run.compile", lambda v: v in (True, False, "auto"), "use true, false or auto (on where verified: "
     "BENCHMARKS.md)"),
    ("track.project", _nonempty, "name the W&B project, e.g. gpd_ds"),
    ("track.entity", _optional(_nonempty), "name the W&B entity, or none"),
    ("track.name", _optional(_nonempty), "name the W&B run, or none (the run directory's name)"),
    ("track.group", _optional(_nonempty), "name the W&B group, or none"),
    ("track.tags", _each(lambda t: 0 < len(t) <= 64), "use tags of 1 to 64 characters (W&B's limit)"),
    ("track.notes", _optional(_nonempty), "write the notes, or none"),
    ("track.init_timeout", _above(0), "use a positive number of seconds, e.g. 60"),
)


def _cross_field_rows(cfg: TrainConfig) -> list[tuple[bool, str, Any, str]]:
    """(ok, key, value, fix) of the rules that tie fields together."""
    m, o = cfg.model, cfg.optim
    features = (split_kd(cfg.loss.kd) or ("", "none"))[1] != "none"
    return [
        (not (m.static_teacher_checkpoint and m.static_teacher_pretrained), "model.static_teacher_pretrained",
         m.static_teacher_pretrained, "set either a local static_teacher_checkpoint or pretrained, not both"),
        (m.static_teacher is not None or not (m.static_teacher_checkpoint or m.static_teacher_pretrained),
         "model.static_teacher", m.static_teacher, "name the static teacher's architecture"),
        (not (m.static_teacher_pretrained and (m.static_teacher or "").startswith(TORCHVISION_PREFIX)),
         "model.static_teacher_pretrained", m.static_teacher_pretrained,
         "torchvision weights are not downloaded: save them and set model.static_teacher_checkpoint"),
        (not m.distillation_token or (m.static_teacher is not None and cfg.loss.kd != "none"),
         "model.distillation_token", m.distillation_token,
         "the distillation head learns from the static teacher: set model.static_teacher and loss.kd"),
        (not features or m.method != "peer", "loss.kd", cfg.loss.kd,
         "model.method=peer has no feature distillation: use loss.kd=dkd, kl or none"),
        (not features or m.static_teacher is not None, "loss.kd", cfg.loss.kd,
         "feature distillation distils the static teacher's features: set model.static_teacher, or use "
         "loss.kd=none"),
        (features or not (cfg.loss.student_taps or cfg.loss.teacher_taps), "loss.student_taps",
         cfg.loss.student_taps, "taps are read by a feature loss only: add one to loss.kd (e.g. dkd+fitnet) or "
         "leave the taps empty"),
        (o.warmup_epochs < o.epochs, "optim.warmup_epochs", o.warmup_epochs,
         f"use fewer warm-up epochs than optim.epochs={o.epochs}"),
        (o.cooldown_epochs < o.epochs, "optim.cooldown_epochs", o.cooldown_epochs,
         f"use fewer cool-down epochs than optim.epochs={o.epochs}"),
        (o.schedule != "cosine" or o.warmup_epochs + o.cooldown_epochs < o.epochs, "optim.cooldown_epochs",
         o.cooldown_epochs, f"warm-up ({o.warmup_epochs}) and cool-down epochs leave no epoch of cosine decay "
         f"within optim.epochs={o.epochs}; lower them or raise optim.epochs"),
        (o.optimizer != "sgd" or not o.nesterov or o.momentum > 0, "optim.nesterov", o.nesterov,
         "Nesterov SGD needs optim.momentum > 0"),
        (o.schedule != "cosine" or o.min_lr <= o.lr, "optim.min_lr", o.min_lr, f"use a floor at most "
         f"optim.lr={o.lr} (the cosine schedule decays from optim.lr down to it)"),
        (o.warmup_epochs == 0 or o.warmup_lr <= o.lr, "optim.warmup_lr", o.warmup_lr, f"use a start at most "
         f"optim.lr={o.lr} (the warm-up rises from it to optim.lr)"),
        (cfg.data.repeated_aug == 1 or not cfg.data.in_memory, "data.repeated_aug", cfg.data.repeated_aug,
         "repeated augmentation is a mode of the streaming loader: set data.in_memory=false, or data.repeated_aug=1"),
        (cfg.data.decode != "device" or not cfg.data.in_memory, "data.decode", cfg.data.decode,
         "the in-memory loader decodes the split once, up front: use data.decode=auto or cpu with data.in_memory"),
        (cfg.data.decode != "device" or not cfg.data.augment.auto_augment, "data.decode", cfg.data.decode,
         f"timm's {cfg.data.augment.auto_augment} policy runs on PIL images in the loader workers, which then decode "
         "too: use data.decode=auto or cpu, or data.augment.auto_augment=none"),
    ]


def student_kwargs_error(m: ModelConfig, error: TypeError) -> ConfigError:
    """The error for ``model.student_kwargs`` the student's constructor refused with ``error``."""
    return ConfigError(f"model.student_kwargs={m.student_kwargs!r} is invalid: {m.student}'s constructor refuses "
                       f"them ({error}); fix or drop what it names")


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
        if text.lower() in ("none", "null"):  # not "": an empty or blank value is a mistake, not a reset
            if type(None) in args:
                return None
            raise ConfigError(f"{key} cannot be none")
        kinds = [a for a in args if a is not type(None)]
        for kind in kinds[:-1]:  # in the order written (bool | str: "true" is True, "auto" the string)
            try:
                return _parse(text, kind, key)
            except ConfigError:
                continue
        return _parse(text, kinds[-1], key)
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
