"""Model builders for students and teachers: timm names, or torchvision names with a prefix."""

from __future__ import annotations

import difflib

import timm
import torchvision
from torch import nn

from gpd_ds.models import cifar  # noqa: F401  (registers the cifar_resnet* models with timm)

TORCHVISION_PREFIX = "torchvision:"
TIMM_PREFIX = "timm:"


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.6)
    return f" Did you mean: {', '.join(close)}?" if close else ""


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
        raise ValueError(f"{name!r}: download torchvision weights yourself and pass them as a local checkpoint")
    if name.startswith(TORCHVISION_PREFIX):
        arch = name[len(TORCHVISION_PREFIX):]
        known = torchvision.models.list_models(module=torchvision.models)
        if arch not in known:
            raise ValueError(f"unknown torchvision model {arch!r} in {name!r}.{_suggest(arch, known)}")
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return torchvision.models.get_model(arch, weights=None, **kwargs)
    arch = name.removeprefix(TIMM_PREFIX)
    if not timm.is_model(arch):
        raise ValueError(f"unknown model {name!r}: not a timm model name (use the 'torchvision:' prefix for "
                         f"torchvision models).{_suggest(arch, timm.list_models())}")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model = timm.create_model(arch, pretrained=pretrained, **kwargs)
    if image_size is not None and "img_size" not in kwargs and _fixed_image_size(model) not in (None, image_size):
        model = timm.create_model(arch, pretrained=pretrained, img_size=image_size, **kwargs)
    return model


def _fixed_image_size(model: nn.Module) -> int | None:
    """The square input size a model was built for, if it needs one (timm patch embeddings)."""
    patch_embed = getattr(model, "patch_embed", None)
    size = getattr(patch_embed, "img_size", None)
    if size is None or getattr(patch_embed, "dynamic_img_size", False):
        return None
    return size[0]
