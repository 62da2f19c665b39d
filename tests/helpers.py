"""Shared test helpers: small real models, warmed BatchNorm statistics, tolerances."""

from __future__ import annotations

import torch
from torch import nn

from gpd_ds.models import create_model

NUM_CLASSES = 10
VIT_IMAGE = 32
CNN_IMAGE = 64

# Every family the GPD core must support: (model name, builder kwargs).
FAMILIES = [
    "resnet18", "resnet34", "resnet50", "torchvision:resnet18", "torchvision:resnet50",
    "mobilenetv1_100", "mobilenetv1_relu", "mobilenetv2_100", "mobilenetv3_small_100", "efficientnet_b0",
    "convnext_atto",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "deit_tiny_distilled_patch16_224", "cifar_resnet10",
    "rvt_tiny", "rvt_tiny_plus",
]


def is_vit(name: str) -> bool:
    return "vit" in name or "deit" in name


def build_kwargs(name: str) -> dict:
    return {"image_size": image_size(name)}


def image_size(name: str) -> int:
    return VIT_IMAGE if is_vit(name) else CNN_IMAGE


def make_student(name: str, seed: int = 0) -> nn.Module:
    """A random student whose BatchNorm running stats are not the defaults (a few train batches)."""
    torch.manual_seed(seed)
    model = create_model(name, num_classes=NUM_CLASSES, **build_kwargs(name))
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, image_size(name), image_size(name)) * 2 + 0.5)
    return model.eval()


def images(name: str, batch: int = 4, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    size = image_size(name)
    return torch.randn(batch, 3, size, size, generator=g)


def assert_close_logits(got: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-4) -> None:
    bound = rtol * max(1.0, expected.abs().max().item())
    diff = (got - expected).abs().max().item()
    assert diff <= bound, f"max |diff| {diff:.3g} > {bound:.3g}"
