"""FitNets' hint loss (Romero et al., ICLR 2015), at every tapped level: a connector (their "regressor") maps each
student feature to the static teacher's width, and the loss is the mean squared error to the teacher's feature.

Per level, ``r(F_S) = BN(conv1x1(F_S))`` (CRD's benchmark code adds a ReLU, right only for post-ReLU targets; the
default taps read pre-activation features) and the loss is the mean over levels of ``mean((r(F_S) - F_T)^2)``: FitNets'
``1/2 ||u_h - r(v_g)||^2`` up to a constant per level, which the weight ``loss.fitnet_weight`` absorbs (CRD's CIFAR
benchmark: 100 for one middle hint).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpd_ds.registry import FeatureLoss


class FitNetConnector(nn.Module):
    """One 1x1 conv + BatchNorm per level, student width -> static teacher width."""

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != len(out_channels) or not in_channels:
            raise ValueError(f"FitNetConnector got {len(in_channels)} student and {len(out_channels)} teacher "
                             "levels: give one (student width, teacher width) pair per level")
        self.regressors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c_in, c_out, kernel_size=1, bias=False), nn.BatchNorm2d(c_out))
            for c_in, c_out in zip(in_channels, out_channels, strict=True))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        if len(features) != len(self.regressors):
            raise ValueError(f"got {len(features)} features but the connector has {len(self.regressors)} levels")
        return [r(f) for r, f in zip(self.regressors, features, strict=True)]


def hint_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """The mean over levels of each level's mean squared error, in fp32; the teacher's features are targets."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"hint_loss got {len(student)} student and {len(teacher)} teacher levels: pass the "
                         "connector's outputs and the static teacher's features, one per level")
    levels = []
    for i, (f, t) in enumerate(zip(student, teacher, strict=True)):
        if f.shape != t.shape:
            raise ValueError(f"hint_loss level {i}: student {tuple(f.shape)} vs teacher {tuple(t.shape)}")
        levels.append(F.mse_loss(f.float(), t.detach().float()))
    return torch.stack(levels).mean()


FITNET = FeatureLoss(lambda widths, static_widths, _cfg: FitNetConnector(widths, static_widths), hint_loss,
                     "fitnet_weight")
