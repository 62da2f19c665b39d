"""The static teacher: frozen, outside the DeepSpeed engine, no grad, its own input normalisation."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from gpd_ds.gpd.mode import STUDENT
from gpd_ds.gpd.taps import Tap, recording
from gpd_ds.models import create_model
from gpd_ds.models.weights import WeightsError, load_weights


class StaticTeacher(nn.Module):
    """A frozen classifier. Eval mode by default; ``train_mode=True`` reproduces the reference, whose static
    teacher normalises with batch statistics (gpd_method.md P1). Inputs arrive normalised for the student; if the
    teacher was trained with other mean/std, they are re-normalised here."""

    def __init__(self, model: nn.Module, train_mode: bool, data_mean: tuple[float, ...],
                 data_std: tuple[float, ...]) -> None:
        super().__init__()
        self.model = model.requires_grad_(False)
        self.train_mode = train_mode
        cfg = getattr(model, "pretrained_cfg", None) or {}
        mean, std = tuple(cfg.get("mean", data_mean)), tuple(cfg.get("std", data_std))
        self.renormalise = (mean, std) != (tuple(data_mean), tuple(data_std))
        scale = torch.tensor(data_std) / torch.tensor(std)
        shift = (torch.tensor(data_mean) - torch.tensor(mean)) / torch.tensor(std)
        self.register_buffer("scale", scale.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, -1, 1, 1), persistent=False)
        self.train(False)

    def train(self, mode: bool = True) -> StaticTeacher:
        super().train(mode)
        self.model.train(self.train_mode)  # never follows the trainer's mode switches
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, taps: Sequence[Tap] = ()) -> torch.Tensor | tuple[torch.Tensor, list]:
        """The logits; with ``taps`` (feature distillation) the logits and the features at those taps."""
        if self.renormalise:
            x = x * self.scale + self.shift
        if not taps:
            return self.model(x)
        with recording(self.model, taps) as found:
            logits = self.model(x)
        return logits, found[STUDENT]


def build_static_teacher(name: str, num_classes: int, image_size: int, checkpoint: str | None, pretrained: bool,
                         train_mode: bool, mean: tuple[float, ...], std: tuple[float, ...]) -> StaticTeacher:
    """Build the named architecture and load its weights (a local file, or timm's pretrained weights)."""
    if checkpoint is None and not pretrained:
        raise WeightsError(f"static teacher {name!r} has no weights: set model.static_teacher_checkpoint to a local "
                           ".safetensors/.pth file, or model.static_teacher_pretrained=true on a machine online")
    model = create_model(name, num_classes=num_classes, image_size=image_size, pretrained=pretrained)
    if checkpoint is not None:
        load_weights(model, checkpoint, f"static teacher ({name})")
    return StaticTeacher(model, train_mode, mean, std)
