"""The paper's MobileNet-v1 (the one of the DKD / ReviewKD / mdistiller code bases), registered with timm as
``mobilenetv1_relu``.

Architecture: a 3x3 stride-2 stem convolution (3 -> 32) and 13 depthwise-separable blocks (3x3 depthwise conv,
BN, ReLU, 1x1 pointwise conv, BN, ReLU) up to 1024 channels at stride 32, global average pooling and a linear
classifier: 4,231,976 parameters for 1000 classes.

State-dict layout, identical to those code bases' ``MobileNetV1`` so their released weights load strictly:

- ``model.0.0`` stem conv, ``model.0.1`` its BN;
- ``model.k.0`` depthwise conv, ``model.k.1`` its BN, ``model.k.3`` pointwise conv, ``model.k.4`` its BN
  (k = 1..13; indices 2 and 5 are the parameter-free ReLUs);
- ``fc`` the classifier (1024 -> num_classes).

The original ends ``model`` with ``AvgPool2d(7)`` (index 14), which only fits 224 px inputs. Here the pooling is a
separate ``global_pool = AdaptiveAvgPool2d(1)``: it has no parameters, so the keys are the same, it computes the
same at 224 px, and it takes any input size. A released file (a ``.pth`` state dict, possibly under a
``state_dict`` / ``model`` key, possibly with a DDP ``module.`` prefix) loads strictly through
:func:`gpd_ds.models.weights.load_weights`, which strips such wrappers. Files saved by PyTorch >= 0.4.1 carry the
BatchNorm ``num_batches_tracked`` counters that ``load_weights`` expects; an older file without them would be
reported as missing those keys.

Differences from timm's ``mobilenetv1_100`` (same widths, same parameter count): timm uses ReLU6 where this model
uses ReLU, and its state dict has another layout (``conv_stem``/``bn1``/``blocks.*``/``classifier``), so weights
do not transfer between the two by name.

Initialisation: convolutions Kaiming-normal (fan_out, ReLU gain), BatchNorm weight 1 and bias 0, the classifier
normal with std 0.01 and bias 0.
"""

from __future__ import annotations

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import register_model
from torch import nn

# (in channels, out channels, stride) of the 13 depthwise-separable blocks
_BLOCKS = ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1), (256, 512, 2),
           *((512, 512, 1),) * 5, (512, 1024, 2), (1024, 1024, 1))


def _conv_bn(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 conv, BN, ReLU."""
    return nn.Sequential(nn.Conv2d(inp, oup, 3, stride, 1, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _conv_dw(inp: int, oup: int, stride: int) -> nn.Sequential:
    """3x3 depthwise conv, BN, ReLU, 1x1 pointwise conv, BN, ReLU."""
    return nn.Sequential(
        nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp), nn.ReLU(inplace=True),
        nn.Conv2d(inp, oup, 1, 1, 0, bias=False), nn.BatchNorm2d(oup), nn.ReLU(inplace=True))


def _cfg(num_classes: int) -> dict:
    return {"architecture": "mobilenetv1_relu", "url": "", "num_classes": num_classes, "input_size": (3, 224, 224),
            "pool_size": (7, 7), "crop_pct": 0.875, "interpolation": "bilinear", "mean": IMAGENET_DEFAULT_MEAN,
            "std": IMAGENET_DEFAULT_STD, "first_conv": "model.0.0", "classifier": "fc"}


class MobileNetV1ReLU(nn.Module):
    """MobileNet-v1 with ReLU, in the DKD / ReviewKD state-dict layout (see the module docstring)."""

    def __init__(self, num_classes: int = 1000, in_chans: int = 3) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = 1024
        self.model = nn.Sequential(_conv_bn(in_chans, 32, 2), *(_conv_dw(i, o, s) for i, o, s in _BLOCKS))
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.pretrained_cfg = self.default_cfg = _cfg(num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool not in (None, "avg"):
            raise ValueError(f"mobilenetv1_relu pools by average only; global_pool={global_pool!r} is not supported")
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)
        self.pretrained_cfg = self.default_cfg = {**self.pretrained_cfg, "num_classes": num_classes}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The convolutional trunk: (N, 1024, H/32, W/32)."""
        return self.model(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.global_pool(x), 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


@register_model
def mobilenetv1_relu(pretrained: bool = False, **kwargs) -> MobileNetV1ReLU:
    """The paper's MobileNet-v1 (ReLU, DKD / ReviewKD layout), 4.2 M parameters at 1000 classes."""
    if pretrained:
        raise ValueError("mobilenetv1_relu has no downloadable weights; pass a local checkpoint (e.g. the DKD / "
                         "ReviewKD release) instead")
    kwargs.pop("pretrained_cfg", None)
    kwargs.pop("pretrained_cfg_overlay", None)
    kwargs.pop("cache_dir", None)
    return MobileNetV1ReLU(**kwargs)
