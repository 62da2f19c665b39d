"""ReviewKD building blocks: the ABF fusion chain and the hierarchical context loss (HCL).

ReviewKD distils a student's multi-level features into the static teacher's: every student level is mapped
to the teacher's width by an attention-based fusion module (ABF) that also sees the (already fused) deeper
level, so shallow levels are supervised with "reviewed" deep context. Under GPD there is one ABF chain per
network mode (student and dynamic teacher), both targeting the same static-teacher features
(docs reviewkd_rvt.md 1.3, 1.4). This module is pure torch: the taps that read the features and the place of the
chains in the trained module are in :mod:`gpd_ds.features`, the loss terms in :class:`gpd_ds.losses.GPDLoss`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpd_ds.registry import FeatureLoss

HCL_POOL_SIZES = (4, 2, 1)  # adaptive-average-pool targets of the HCL pyramid, coarser levels weighted less


def _kaiming_uniform_a1(conv: nn.Conv2d) -> None:
    """Kaiming-uniform with ``a=1`` (bound ``sqrt(3/fan_in)``), the reference's ABF conv init (spec 1.3)."""
    nn.init.kaiming_uniform_(conv.weight, a=1)


def _reset_bn(bn: nn.BatchNorm2d) -> None:
    """BN starts as identity-affine (weight 1, bias 0); stated explicitly so the init does not rely on defaults."""
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class ABF(nn.Module):
    """One attention-based fusion module (spec 1.3).

    ``x`` is projected to ``mid_channels`` (``conv1``/``bn1``). If ``fuse``, it is blended with the deeper
    level's fused map through a 2-channel sigmoid gate computed from both, so each pixel chooses how much
    deep context to take. The (fused) mid map goes on to the next shallower level, and a 3x3 conv lifts it to
    the teacher's width for the loss.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.fuse = fuse
        self.conv1 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_channels)
        # Only fusing levels get a gate; the deepest level has nothing to fuse with, so no parameters either.
        self.att = nn.Conv2d(2 * mid_channels, 2, kernel_size=1) if fuse else None
        self.conv2 = nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        _kaiming_uniform_a1(self.conv1)
        _kaiming_uniform_a1(self.conv2)
        _reset_bn(self.bn1)
        _reset_bn(self.bn2)

    def _check_deeper(self, deeper: Tensor | None) -> None:
        if self.fuse and deeper is None:
            raise ValueError("ABF(fuse=True) needs the deeper level's fused map: pass `deeper`, a (B, mid, h, w) "
                             "tensor from the next deeper ABF")
        if not self.fuse and deeper is not None:
            raise ValueError("ABF(fuse=False) is the deepest level and takes no deeper map: pass deeper=None, "
                             "or build it with fuse=True")

    def _fuse(self, a: Tensor, deeper: Tensor) -> Tensor:
        """Gate-blend ``a`` with the deeper map resized to ``a``'s grid (general, not the reference's 224 sizes)."""
        assert self.att is not None
        u = F.interpolate(deeper, size=a.shape[-2:], mode="nearest")
        g = torch.sigmoid(self.att(torch.cat([a, u], dim=1)))
        return a * g[:, 0:1] + u * g[:, 1:2]

    def forward(self, x: Tensor, deeper: Tensor | None) -> tuple[Tensor, Tensor]:
        """(output compared with the static teacher's feature, fused mid map passed to the next shallower level)"""
        self._check_deeper(deeper)
        a = self.bn1(self.conv1(x))
        if deeper is not None:
            a = self._fuse(a, deeper)
        return self.bn2(self.conv2(a)), a


def _check_channel_list(name: str, values: Sequence[int]) -> list[int]:
    values = list(values)
    if not values:
        raise ValueError(f"{name} is empty: list one channel count per feature level, shallow -> deep")
    for i, c in enumerate(values):
        if isinstance(c, bool) or not isinstance(c, int) or c < 1:
            raise ValueError(f"{name}[{i}] = {c!r} is not a positive int: every level needs a channel count >= 1")
    return values


class ReviewKDConnector(nn.Module):
    """The ABF chain of one network (spec 1.3): one ABF per level, deepest level without fusion.

    Levels are listed shallow -> deep everywhere (arguments, ``abfs``, inputs, outputs) so that the outputs
    line up with the teacher's feature list; only the internal processing runs deep -> shallow, because each
    level fuses the map of the level below it.
    """

    def __init__(self, in_channels: Sequence[int], out_channels: Sequence[int], mid_channels: int) -> None:
        super().__init__()
        ins = _check_channel_list("in_channels", in_channels)
        outs = _check_channel_list("out_channels", out_channels)
        if len(ins) != len(outs):
            raise ValueError(f"in_channels has {len(ins)} levels but out_channels has {len(outs)}: give one "
                             "(student width, teacher width) pair per level, both lists shallow -> deep")
        if isinstance(mid_channels, bool) or not isinstance(mid_channels, int) or mid_channels < 1:
            raise ValueError(f"mid_channels = {mid_channels!r} is not a positive int: use e.g. 512 (ResNet) "
                             "or 256 (MobileNet, RVT)")
        self.in_channels = tuple(ins)
        self.out_channels = tuple(outs)
        self.mid_channels = mid_channels
        deepest = len(ins) - 1
        self.abfs = nn.ModuleList(
            ABF(c_in, mid_channels, c_out, fuse=i != deepest)
            for i, (c_in, c_out) in enumerate(zip(ins, outs, strict=True))
        )

    def _check_features(self, features: Sequence[Tensor]) -> None:
        if len(features) != len(self.abfs):
            raise ValueError(f"got {len(features)} features but the connector has {len(self.abfs)} levels: pass "
                             "exactly one (B, C, H, W) feature per level, shallow -> deep")
        for i, (f, c) in enumerate(zip(features, self.in_channels, strict=True)):
            if f.ndim != 4 or f.shape[1] != c:
                raise ValueError(f"features[{i}] has shape {tuple(f.shape)} but level {i} expects (B, {c}, H, W): "
                                 "check the feature taps or the connector's in_channels (student vs teacher set)")

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        """Map the features (shallow -> deep) to the teacher's widths; returns outputs shallow -> deep."""
        self._check_features(features)
        deep_first: list[Tensor] = []
        deeper: Tensor | None = None
        for abf, x in zip(reversed(self.abfs), reversed(features), strict=True):
            out, deeper = abf(x, deeper)
            deep_first.append(out)
        return deep_first[::-1]


def _level_hcl(f: Tensor, t: Tensor) -> Tensor:
    """One level: MSE plus a pyramid of pooled MSEs, weights halving in the order of the pool sizes used."""
    loss = F.mse_loss(f, t)
    w = total = 1.0
    h = f.shape[2]  # only h is inspected (square maps assumed), as in the reference
    for s in HCL_POOL_SIZES:
        if s >= h:
            continue
        w /= 2
        loss = loss + w * F.mse_loss(F.adaptive_avg_pool2d(f, (s, s)), F.adaptive_avg_pool2d(t, (s, s)))
        total += w
    return loss / total


def hcl(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """Hierarchical context loss (spec 1.4), summed over levels; teacher features are targets (detached).

    Computed in float32 whatever the input dtype, so fp16/bf16 features do not lose the small squared
    differences that the loss is made of.
    """
    if len(student) != len(teacher):
        raise ValueError(f"hcl got {len(student)} student levels but {len(teacher)} teacher levels: pass the "
                         "connector's outputs and the static teacher's features, one per level")
    if not student:
        raise ValueError("hcl got no levels: pass at least one (student, teacher) feature pair")
    total: Tensor | None = None
    for i, (f, t) in enumerate(zip(student, teacher, strict=True)):
        if f.shape != t.shape or f.ndim != 4:
            raise ValueError(f"hcl level {i}: student shape {tuple(f.shape)} vs teacher shape {tuple(t.shape)}; "
                             "both must be the same (B, C, H, W): check the connector's out_channels and taps")
        level = _level_hcl(f.float(), t.detach().float())
        total = level if total is None else total + level
    assert total is not None
    return total


REVIEWKD = FeatureLoss(lambda widths, static_widths, cfg: ReviewKDConnector(widths, static_widths,
                                                                            cfg.reviewkd_mid_channels),
                       hcl, "reviewkd_weight")
