"""The config checks that need torch and timm, run after :meth:`TrainConfig.validate` and before any data or model:
model names (from timm's and torchvision's registries), the student's keyword arguments (a trial build on the meta
device) and the auto-augment policy (timm's parser). The command line answers a typo in a recipe name, a ``--set``
key or a value without them (:mod:`gpd_ds.train_cli`); these follow once torch is imported."""

from __future__ import annotations

import re

import torch

from gpd_ds.config import ConfigError, DataConfig, ModelConfig, TrainConfig, student_kwargs_error
from gpd_ds.data.transforms import train_transform
from gpd_ds.models import create_model, unknown_model


def check_config(cfg: TrainConfig) -> TrainConfig:
    """Every check of ``cfg``: :meth:`TrainConfig.validate`, then :func:`check_models` and
    :func:`check_auto_augment`; raises :class:`ConfigError` naming the key, the value and the fix."""
    cfg.validate()
    check_models(cfg.model, cfg.data.image_size)
    check_auto_augment(cfg.data)
    return cfg


def check_models(m: ModelConfig, image_size: int) -> None:
    """Unknown model names, from the registries; an image size a ViT's patches do not tile; ``student_kwargs`` its
    constructor rejects, from a trial build on the meta device (no memory, no weights; a fraction of a second for a
    ViT), so the mistake shows before the data is scanned rather than after."""
    for key, name in (("model.student", m.student), ("model.static_teacher", m.static_teacher)):
        problem = None if name is None else unknown_model(name)
        if problem is not None:
            raise ConfigError(f"{key}={name!r} is invalid: {problem}")
        patch = re.search(r"patch(\d+)", name or "")
        if patch and image_size % int(patch.group(1)):
            p = int(patch.group(1))
            raise ConfigError(f"data.image_size={image_size} is invalid: {key}={name!r} cuts images into {p}x{p} "
                              f"patches; use a multiple of {p}, e.g. {image_size // p * p or p} or "
                              f"{(image_size // p + 1) * p}")
    if m.student_kwargs:
        try:
            with torch.device("meta"):
                create_model(m.student, num_classes=1000, image_size=image_size, **m.student_kwargs)
        except TypeError as e:
            raise student_kwargs_error(m, e) from e


def check_auto_augment(data: DataConfig) -> None:
    """A policy string timm cannot parse (its parsers assert), found by building the train transform: no data."""
    policy = data.augment.auto_augment
    if not policy:
        return
    name, *sections = policy.split("-")
    # timm skips a section without a number silently (rand-zz would be plain rand): each one must say something
    ignored = [s for s in sections if not re.search(r"\d", s) and not (name == "rand" and s.startswith("t"))]
    if ignored:
        raise ConfigError(f"data.augment.auto_augment={policy!r} is invalid: timm ignores the section "
                          f"{ignored[0]!r} (a section is a key and a number, e.g. m9, n2, mstd0.5, inc1); use e.g. "
                          "rand-m9-mstd0.5-inc1 (DeiT)")
    try:
        train_transform(data.image_size, data.augment, data.mean)
    except (AssertionError, ValueError, KeyError) as e:
        raise ConfigError(f"data.augment.auto_augment={data.augment.auto_augment!r} is invalid: timm cannot "
                          f"read it ({e or type(e).__name__}); use e.g. rand-m9-mstd0.5-inc1 (DeiT), augmix-m5 or "
                          "original") from e
