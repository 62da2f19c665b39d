"""Small ResNets for 32 x 32 inputs (CIFAR), registered with timm so every tool takes them by name.

ImageNet ResNets shrink their input 4x in the stem (stride-2 convolution + max-pool), leaving 8 x 8 maps at 32 px.
These keep timm's ResNet (deep 3x3 stem, average-pool shortcuts, BasicBlocks) but drop the stem's max-pool, so
the four stages see 16 x 16, 8 x 8, 4 x 4 and 2 x 2 maps. Keeping the stride in the stem's first convolution
(rather than the classic CIFAR stride-1 stem) halves the cost, which keeps the CIFAR-10 protocol within CPU
hours, and it is a structure the dynamic teacher's Inverse Reparameterization handles like any timm ResNet.
"""

from __future__ import annotations

from timm.models import register_model
from timm.models.resnet import BasicBlock, ResNet
from torch import nn


def _cifar_resnet(name: str, layers: tuple[int, ...], channels: tuple[int, ...], stem_width: int, pretrained: bool,
                  **kwargs) -> ResNet:
    if pretrained:
        raise ValueError(f"{name} has no downloadable weights; train it and pass a local checkpoint")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    model = ResNet(block=BasicBlock, layers=layers, channels=channels, stem_width=stem_width, stem_type="deep",
                   avg_down=True, **kwargs)
    model.maxpool = nn.Identity()
    return model


@register_model
def cifar_resnet10(pretrained: bool = False, **kwargs) -> ResNet:
    """0.3 M parameters: 1 block per stage, 16/32/64/128 channels."""
    return _cifar_resnet("cifar_resnet10", (1, 1, 1, 1), (16, 32, 64, 128), 16, pretrained, **kwargs)


@register_model
def cifar_resnet18(pretrained: bool = False, **kwargs) -> ResNet:
    """2.8 M parameters: 2 blocks per stage, 32/64/128/256 channels."""
    return _cifar_resnet("cifar_resnet18", (2, 2, 2, 2), (32, 64, 128, 256), 32, pretrained, **kwargs)
