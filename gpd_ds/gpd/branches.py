"""Multi-branch 3x3 convolutions (the branch dimension of IR; OREPA-style, gpd_method.md 3.4).

A :class:`WideBranchConv2d` replaces an eligible conv (3x3, stride 1, padding 1, dilation 1) by six
linear branches whose kernels are merged into one 3x3 kernel at every forward ("online"
reparameterisation: one convolution runs, only the kernel is computed per branch):

====  ===========  ==========================================  =================================
 b    name         tensors                                      kernel contribution K_b[o, i]
====  ===========  ==========================================  =================================
 0    origin       origin [Co, Ci/g, 3, 3]                      origin
 1    avg          avg [Co, Ci/g, 1, 1]                         avg / 9 at every tap
 2    prior        prior [Co, Ci/g, 1, 1], prior_basis [Co,3,3] prior * prior_basis[o]
 3    1x1 -> 3x3   pre [Ci, Ci/g, 1, 1] (+ identity), post 3x3  sum_t post[o, t] * (pre + I)[t, i]
 4    3x3          extra [Co, Ci/g, 3, 3]                       extra
 5    dw -> pw     dw [8 Ci, 1, 3, 3], pw [Co, 8 Ci/g, 1, 1]    sum_{t<8} pw[o, 8i+t] * dw[8i+t]
====  ===========  ==========================================  =================================

``K = sum_b branch_scales[b, o] * K_b``. The scalars start at "origin only" for a pretrained student
(so the block equals the pretrained conv exactly) and at the default mix otherwise.

Channel IR then widens every branch tensor by the dense or depthwise rule, so the wide merged kernel
is again ``K / r`` (dense) or ``tile(K)`` (grouped), and the student view recovers ``K`` exactly.

Unlike the reference, a block gets a bias only where its source conv had one: the reference adds a
bias in front of every BatchNorm, where it only ever receives round-off gradients, and must then fold
it into the BatchNorm at export. With no such bias, CBR has nothing to fold and loads strictly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gpd_ds.gpd.layers import TensorSpec, WideConv2d, WideModule
from gpd_ds.gpd.mode import TEACHER, current_mode

DW_MULTIPLIER = 8
NUM_BRANCHES = 6
DEFAULT_MIX = (0.25, 0.25, 0.0, 0.5, 0.05, 0.5)
ORIGIN_ONLY = (1.0, 0.0, 0.0, 0.0, 0.0, 0.0)
BRANCH_TENSORS = ("origin", "avg", "prior", "prior_basis", "pre", "identity", "post", "extra", "dw", "pw",
                  "branch_scales")
_BUFFERS = ("prior_basis", "identity")


def is_eligible(conv: nn.Module) -> bool:
    """Whether a conv can become a multi-branch block (3x3, stride 1, padding 1, no dilation)."""
    return (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.padding_mode == "zeros")


def _kaiming(*shape: int) -> Tensor:
    """A new branch kernel, Kaiming-uniform with ``a=0`` (bound ``sqrt(6 / fan_in)``) as the reference initialises
    them: PyTorch's conv default (``a=sqrt(5)``) would start every new branch sqrt(6) = 2.45x smaller in std."""
    t = torch.empty(*shape)
    nn.init.kaiming_uniform_(t, a=0.0)
    return t


def _prior_basis(out_channels: int) -> Tensor:
    """A DCT-like 3x3 basis per output channel: rows for the first half, columns for the second."""
    basis = torch.zeros(out_channels, 3, 3)
    half = out_channels // 2
    pos = torch.arange(3, dtype=torch.float32) + 0.5
    for o in range(out_channels):
        if o < half:
            basis[o] = torch.cos(math.pi * pos * (o + 1) / 3).view(3, 1).expand(3, 3)
        else:
            basis[o] = torch.cos(math.pi * pos * (o + 1 - half) / 3).view(1, 3).expand(3, 3)
    return basis


def branch_tensors(conv: nn.Conv2d, pretrained_student: bool) -> dict[str, Tensor]:
    """The student's branch tensors for ``conv`` (before channel IR)."""
    co, ci, g = conv.out_channels, conv.in_channels, conv.groups
    cin_g = ci // g
    identity = torch.zeros(ci, cin_g, 1, 1)
    identity[torch.arange(ci), torch.arange(ci) % cin_g] = 1.0
    scales = ORIGIN_ONLY if pretrained_student else DEFAULT_MIX
    return {
        "origin": conv.weight.detach().float().clone(),
        "avg": _kaiming(co, cin_g, 1, 1),
        "prior": _kaiming(co, cin_g, 1, 1),
        "prior_basis": _prior_basis(co),
        "pre": torch.zeros(ci, cin_g, 1, 1),
        "identity": identity,
        "post": _kaiming(co, cin_g, 3, 3),
        "extra": _kaiming(co, cin_g, 3, 3),
        "dw": _kaiming(DW_MULTIPLIER * ci, 1, 3, 3),
        "pw": _kaiming(co, DW_MULTIPLIER * cin_g, 1, 1),
        "branch_scales": torch.tensor(scales).view(NUM_BRANCHES, 1).repeat(1, co),
    }


def branch_specs(in_expanded: bool, out_expanded: bool, grouped: bool) -> dict[str, TensorSpec]:
    """IR rule of every branch tensor: each is a conv weight over (out space, in space)."""
    def linear(out_widened: bool, in_widened: bool) -> TensorSpec:
        if grouped:  # rule D: replicate along the output axis, no division
            return TensorSpec((0,), scaled=False)
        dims = tuple(d for d, w in ((0, out_widened), (1, in_widened)) if w)
        return TensorSpec(dims, scaled=out_widened)

    out_dims = (0,) if out_expanded else ()
    in_dims = (0,) if in_expanded else ()
    conv_spec = linear(out_expanded, in_expanded)
    pre_spec = linear(in_expanded, in_expanded)  # maps the input space to itself
    return {
        "origin": conv_spec, "avg": conv_spec, "prior": conv_spec, "post": conv_spec, "extra": conv_spec,
        "pw": conv_spec,
        "pre": pre_spec,
        "identity": TensorSpec(pre_spec.dims, pre_spec.scaled, noisy=False),
        "prior_basis": TensorSpec(out_dims, scaled=False, noisy=False),
        "dw": TensorSpec(in_dims, scaled=False),
        "branch_scales": TensorSpec((1,) if out_expanded else (), scaled=False, noisy=False),
        "bias": TensorSpec(out_dims, scaled=out_expanded and not grouped),
    }


def merge_kernel(t: dict[str, Tensor], groups: int) -> Tensor:
    """The single 3x3 kernel of a multi-branch block: ``sum_b branch_scales[b] * K_b``."""
    origin = t["origin"]
    co, cin_g = origin.shape[:2]
    co_g = co // groups
    k_avg = t["avg"].expand(-1, -1, 3, 3) / 9
    k_prior = t["prior"] * t["prior_basis"].unsqueeze(1)
    pre = (t["pre"] + t["identity"]).reshape(groups, cin_g, cin_g)
    post = t["post"].reshape(groups, co_g, cin_g, 9)
    k_pre_post = torch.einsum("gotk,gti->goik", post, pre).reshape(co, cin_g, 3, 3)
    pw = t["pw"].reshape(groups, co_g, cin_g, DW_MULTIPLIER)
    dw = t["dw"].reshape(groups, cin_g, DW_MULTIPLIER, 9)
    k_dw_pw = torch.einsum("goit,gitk->goik", pw, dw).reshape(co, cin_g, 3, 3)
    kernels = torch.stack([origin, k_avg, k_prior, k_pre_post, t["extra"], k_dw_pw])
    return torch.einsum("bo,boikl->oikl", t["branch_scales"], kernels)


class WideBranchConv2d(WideConv2d):
    """A multi-branch 3x3 conv of the dynamic teacher; its merged kernel follows rule A or D."""

    def __init__(self, conv: nn.Conv2d, width_ratio: int, in_expanded: bool, out_expanded: bool,
                 pretrained_student: bool) -> None:
        WideModule.__init__(self, width_ratio)
        self.copy_geometry(conv)
        specs = branch_specs(in_expanded, out_expanded, self.grouped)
        for name, tensor in branch_tensors(conv, pretrained_student).items():
            self.register_wide(name, tensor, specs[name], buffer=name in _BUFFERS)
        self.register_wide("bias", conv.bias, specs["bias"])

    def branch_kernel(self, mode: str) -> Tensor:
        if mode == TEACHER:
            groups = self.groups * self.width_ratio if self.grouped else 1
            return merge_kernel(dict(zip(BRANCH_TENSORS, self.teacher_tensors(*BRANCH_TENSORS), strict=True)), groups)
        return merge_kernel({n: self.student_tensor(n) for n in BRANCH_TENSORS}, self.groups)

    def forward(self, x: Tensor) -> Tensor:
        mode = current_mode()
        (bias,) = self.mode_tensors("bias")
        return self.conv(x, self.branch_kernel(mode), bias, mode)

    def student_state(self) -> dict[str, Tensor]:
        """CBR of the block: the merged student kernel as a plain conv's ``weight`` (and ``bias``)."""
        with torch.no_grad():
            state = {"weight": merge_kernel({n: self.student_tensor(n) for n in BRANCH_TENSORS}, self.groups)}
        if self.bias is not None:
            state["bias"] = self.student_tensor("bias").detach().clone()
        return state

    def extra_repr(self) -> str:
        return super().extra_repr() + f", branches={NUM_BRANCHES}"
