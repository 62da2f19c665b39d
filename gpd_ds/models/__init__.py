"""Model builders for students and teachers: timm names, or torchvision names with a prefix."""

from __future__ import annotations

import difflib

import timm
import torchvision
from torch import nn

from gpd_ds.config import TORCHVISION_PREFIX  # defined in config, which needs it without importing torch
from gpd_ds.errors import UserInputError
from gpd_ds.models import cifar, mobilenet, rvt  # noqa: F401  (register cifar_resnet*, mobilenetv1_relu, rvt_* with timm)

TIMM_PREFIX = "timm:"


class UnknownModelError(UserInputError, ValueError):
    """A model name no registry knows, or weights that cannot be had for it (the message names close names)."""


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


def unknown_model(name: str) -> str | None:
    """Why ``name`` (see :func:`create_model`) names no model, with close names; None if it names one. Only the
    registries are read: nothing is built (config validation calls this)."""
    if name.startswith(TORCHVISION_PREFIX):
        arch = name[len(TORCHVISION_PREFIX):]
        known = torchvision.models.list_models(module=torchvision.models)
        return None if arch in known else f"unknown torchvision model {arch!r} in {name!r}.{_suggest(arch, known)}"
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        return (f"unknown model {name!r}: not a timm model name (use the 'torchvision:' prefix for torchvision "
                f"models).{_suggest(arch, timm.list_models())}")
    base, _, tag = arch.partition(".")
    # timm.is_model accepts any tag after a known architecture; building it then fails with "Invalid pretrained tag"
    tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{base}.*")]
    if tag and tag not in tags:
        hint = _suggest(tag, tags) or f" Its tags: {', '.join(tags) or 'none'}."
        return f"unknown model {name!r}: {base!r} has no pretrained tag {tag!r}.{hint}"
    return None


def create_model(name: str, num_classes: int | None = None, image_size: int | None = None, pretrained: bool = False,
                 **kwargs) -> nn.Module:
    """Build a randomly initialised classifier.

    ``name`` is a timm model name (``resnet18``, ``timm:deit_tiny_patch16_224``) or a torchvision
    one with a prefix (``torchvision:resnet50``). ``image_size`` sets the input size of models built
    for a fixed one (timm ViTs); CNNs take any size and ignore it. ``kwargs`` go to the builder.
    Weights are downloaded only with ``pretrained=True`` (timm names, online machines); otherwise load them
    from a local file (:func:`gpd_ds.models.weights.load_weights`).
    """
    if pretrained and name.startswith(TORCHVISION_PREFIX):
        raise UnknownModelError(f"{name!r}: download torchvision weights yourself and pass them as a local "
                                "checkpoint")
    problem = unknown_model(name)
    if problem is not None:
        raise UnknownModelError(problem)
    if name.startswith(TORCHVISION_PREFIX):
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return torchvision.models.get_model(name[len(TORCHVISION_PREFIX):], weights=None, **kwargs)
    arch = name.removeprefix(TIMM_PREFIX)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    if image_size is not None and "img_size" not in kwargs and _fixed_image_size(model) not in (None, image_size):
        model = timm.create_model(arch, pretrained=pretrained, img_size=image_size, **kwargs)
    return model


def _fixed_image_size(model: nn.Module) -> int | None:
    """The square input size a model was built for, if it needs one: timm patch embeddings, or a model whose
    config says its input size is fixed (LeViT's attention-bias tables)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is not None:
        return None if getattr(patch_embed, "dynamic_img_size", False) else size[0]
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg["input_size"][-1] if cfg.get("fixed_input_size") and "input_size" in cfg else None
