"""Inverse Reparameterization (IR): build the dynamic teacher from a student.

One walker plus small per-layer converters. The walker copies the student, finds its first layers
(those fed by the image) and its classifier (whose output is the logits) with one traced forward,
replaces every supported leaf module by its wide twin (children before parents, so a container
converter such as attention sees already-widened children), wraps the raw parameters of known
containers (position embeddings, class tokens, layer-scale gammas) in a student-view
parametrization, and finally checks the result numerically: the dynamic teacher and the student
view must compute the source student's function.

Adding a family is usually a line in one of the tables below; a module the tables do not know
raises :class:`UnsupportedModelError` naming its path and type.
"""

from __future__ import annotations

import contextlib
import copy
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import timm.layers
import timm.models.convnext
import timm.models.deit
import timm.models.metaformer
import timm.models.senet
import timm.models.swin_transformer
import timm.models.vision_transformer
import torch
from timm.models._efficientnet_blocks import SqueezeExcite
from torch import Tensor, nn
from torch.nn.utils import parametrize

from gpd_ds.errors import UserInputError
from gpd_ds.gpd.attention import (
    WideAttention,
    WideBiasedAttention,
    WideClassAttention,
    WideCosineWindowAttention,
    WideHeadFirstAttention,
    WideLiteMLA,
    WideLocalWindowAttention,
    WideRelPosBias,
    WideSplitAttention,
    WideSubsampledAttention,
    WideTalkingHeadAttention,
    WideWindowAttention,
)
from gpd_ds.gpd.branches import WideBranchConv2d, is_eligible
from gpd_ds.gpd.functional import (
    ChannelOps,
    ModuleStack,
    StudentTrace,
    UnsupportedModelError,
    first_disagreement,
    trace_student,
)
from gpd_ds.gpd.layers import (
    StudentView,
    TensorSpec,
    WideActivation,
    WideAffine,
    WideBatchNorm2d,
    WideConv2d,
    WideConv2dSame,
    WideGroupNorm,
    WideLayerNorm,
    WideLinear,
    WideMlp,
    WideModule,
    WidePatchMerging,
    WideScale,
    WideStarReLU,
    WideStdConv2d,
    narrow,
    widen,
)
from gpd_ds.gpd.mode import STUDENT, TEACHER
from gpd_ds.gpd.model import GPDModel
from gpd_ds.models import rvt


class IRCheckError(RuntimeError):
    """The dynamic teacher built by IR does not compute the student's function."""


@dataclass
class _Walk:
    width_ratio: int
    first_layers: set[str]
    classifiers: set[str]
    branches: bool
    pretrained_student: bool
    gates: set[str] = field(default_factory=set)
    # fused projections of attention ([q | k | v] or [k | v] blocks) -> number of blocks, each widened on its own
    blocks: dict[str, int] = field(default_factory=dict)


# Leaf modules that commute with the 1/r scaling of the invariant (positively homogeneous or linear).
PASSTHROUGH = (
    nn.Identity, nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Flatten, timm.layers.DropPath, nn.Upsample, nn.ZeroPad2d,
    timm.layers.pool2d_same.MaxPool2dSame, timm.layers.AvgPool2dSame, timm.models.efficientformer.Flat,
    timm.models.levit.Downsample,
    timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgPool, timm.layers.adaptive_avgmax_pool.FastAdaptiveMaxPool,
    timm.layers.adaptive_avgmax_pool.AdaptiveAvgMaxPool2d, timm.layers.adaptive_avgmax_pool.FastAdaptiveAvgMaxPool,
)

# Activations that are not homogeneous: rule G' (act(r x) / r in teacher mode).
ACTIVATIONS = (
    nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU,
    nn.Softplus, timm.layers.activations.GELU, timm.layers.activations.GELUTanh,
    timm.layers.activations.QuickGELU, timm.layers.activations.Swish, timm.layers.activations.Sigmoid,
    timm.layers.activations.Tanh, timm.layers.activations.HardSwish, timm.layers.activations.HardSigmoid,
    timm.layers.activations.Mish, timm.layers.activations.HardMish,
)

# Containers whose gate activation (the named child) multiplies an activation: the gate stays at scale 1.
GATES: dict[type, str] = {
    SqueezeExcite: "gate", timm.layers.SqueezeExcite: "gate", timm.layers.EffectiveSEModule: "gate",
    timm.models.senet.SEModule: "sigmoid", timm.models.hgnet.EseModule: "sigmoid"}
GATED = tuple(GATES)

_ADDITIVE = TensorSpec((2,), scaled=True)  # rule K: [1, N, C] tokens/embeddings enter at scale 1/r
_CHANNEL_SCALE = TensorSpec((0,), scaled=False, noisy=False)  # rule J

# Raw parameters of containers, by exact class: name -> rule.
RAW_PARAMETERS: dict[type, dict[str, TensorSpec]] = {
    timm.models.vision_transformer.VisionTransformer: {
        "cls_token": _ADDITIVE, "reg_token": _ADDITIVE, "pos_embed": _ADDITIVE},
    timm.models.deit.VisionTransformerDistilled: {
        "cls_token": _ADDITIVE, "reg_token": _ADDITIVE, "pos_embed": _ADDITIVE, "dist_token": _ADDITIVE},
    timm.models.convnext.ConvNeXtBlock: {"gamma": _CHANNEL_SCALE},
}


# Raw parameters recognised by name on any container, where the owner's class has no entry above: token and
# position embeddings (rule K, along the channel dimension of their layout) and per-channel layer scales (rule J).
_TOKEN_NAME = re.compile(r"(cls_token|reg_token|dist_token|pos_embed|patch_pos|pixel_pos)\d*")
_SCALE_NAME = re.compile(r"(gamma|layer_scale)(_?\w+)?")


def raw_parameter_rules(module: nn.Module) -> dict[str, TensorSpec]:
    """IR rules of ``module``'s own parameters: by class (RAW_PARAMETERS, most specific first), else by name and
    shape: ``[1, N, C]`` tokens and ``[1, C, H, W]`` maps at 1/r along C, ``[C]`` / ``[C, 1, 1]`` scales tiled."""
    if isinstance(module, WideModule):
        return {}  # a converted layer's parameters are wide already (WideScale's gamma would match by name)
    for kind in type(module).__mro__:
        if kind in RAW_PARAMETERS:
            return RAW_PARAMETERS[kind]
    rules = {}
    for name, p in module.named_parameters(recurse=False):
        if p is None:
            continue
        if _TOKEN_NAME.fullmatch(name) and p.ndim in (3, 4) and p.shape[0] == 1:
            rules[name] = _ADDITIVE if p.ndim == 3 else TensorSpec((1,), scaled=True)
        elif _SCALE_NAME.fullmatch(name) and (p.ndim == 1 or (p.ndim == 3 and p.shape[1:] == (1, 1))):
            rules[name] = _CHANNEL_SCALE
    return rules


def _convert_conv(m: nn.Conv2d, path: str, walk: _Walk) -> nn.Module:
    if m.padding_mode != "zeros":
        raise UnsupportedModelError(f"{path}: Conv2d with padding_mode={m.padding_mode!r}; only 'zeros' is "
                                    "supported")
    in_expanded, out_expanded = path not in walk.first_layers, path not in walk.classifiers
    if m.groups > 1 and not (in_expanded and out_expanded):
        raise UnsupportedModelError(f"{path}: a grouped conv reading the image or producing the logits")
    if walk.branches and is_eligible(m):
        return WideBranchConv2d(m, walk.width_ratio, in_expanded, out_expanded, walk.pretrained_student)
    return WideConv2d(m, walk.width_ratio, in_expanded, out_expanded)


def _convert_special_conv(wide: type[WideConv2d]) -> Callable[[nn.Conv2d, str, _Walk], nn.Module]:
    """Convs that compute more than ``F.conv2d`` (same padding, weight standardisation): never multi-branch."""
    def convert(m: nn.Conv2d, path: str, walk: _Walk) -> nn.Module:
        return wide(m, walk.width_ratio, path not in walk.first_layers, path not in walk.classifiers)
    return convert


def _convert_linear(m: nn.Linear, path: str, walk: _Walk) -> nn.Module:
    groups = walk.blocks.get(path, 1)
    return WideLinear(m, walk.width_ratio, path not in walk.first_layers, path not in walk.classifiers, groups)


def _convert_batchnorm(m: nn.BatchNorm2d, path: str, walk: _Walk) -> nn.Module:
    return WideBatchNorm2d(m, walk.width_ratio, act=getattr(m, "act", None), drop=getattr(m, "drop", None))


def _convert_groupnorm(m: nn.GroupNorm, path: str, walk: _Walk) -> nn.Module:
    return WideGroupNorm(m, walk.width_ratio)


def _convert_layernorm(channels_first: bool) -> Callable[[nn.LayerNorm, str, _Walk], nn.Module]:
    def convert(m: nn.LayerNorm, path: str, walk: _Walk) -> nn.Module:
        if len(m.normalized_shape) != 1:
            raise UnsupportedModelError(f"{path}: LayerNorm over {m.normalized_shape}; only 1-D is supported")
        return WideLayerNorm(m, walk.width_ratio, channels_first)
    return convert


def _convert_attention(m: timm.layers.Attention, path: str, walk: _Walk) -> nn.Module:
    extras = {"q_norm": m.q_norm, "k_norm": m.k_norm, "norm": m.norm}
    unsupported = [n for n, e in extras.items() if not isinstance(e, nn.Identity)]
    if unsupported or getattr(m, "gate", None) is not None:
        raise UnsupportedModelError(f"{path}: timm Attention with {unsupported or ['gate']}; only plain "
                                    "attention (no qk-norm, scale-norm or gate) is supported")
    return WideAttention(m.qkv, m.proj, m.num_heads, m.head_dim, walk.width_ratio, m.attn_drop, m.proj_drop,
                         getattr(m, "att_mask", None))


def _convert_window_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideWindowAttention(m.qkv, m.proj, m.num_heads, m.qkv.out_features // 3 // m.num_heads, walk.width_ratio,
                               m.attn_drop, m.proj_drop, m.relative_position_bias_table.detach(),
                               m.relative_position_index, m.window_area)


def _convert_biased_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    if getattr(m, "use_conv", False):
        raise UnsupportedModelError(f"{path}: LeViT attention in conv mode (levit_conv_*); use the linear-mode "
                                    "model of the same size (levit_*)")
    return WideBiasedAttention(m, walk.width_ratio)


def _convert_head_first_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    if not m.head_first:
        raise UnsupportedModelError(f"{path}: MaxViT attention with head_first=False ([q | k | v] blocks from a "
                                    "conv); only head_first=True, timm's default, is supported")
    if m.rel_pos is not None and not isinstance(m.rel_pos, WideRelPosBias):
        raise UnsupportedModelError(f"{path}: MaxViT attention with {type(m.rel_pos).__name__}; only RelPosBias "
                                    "is supported")
    channels_first = isinstance(m, timm.models.maxxvit.Attention2d)
    return WideHeadFirstAttention(m, walk.width_ratio, channels_first)


def _convert_subsampled_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideSubsampledAttention(m, walk.width_ratio)


def _convert_local_window_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideLocalWindowAttention(m, walk.width_ratio)


def _convert_talking_heads(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideTalkingHeadAttention(m, walk.width_ratio)


def _convert_split_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideSplitAttention(m, walk.width_ratio)


def _convert_patch_merging(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    norm_last = isinstance(m, timm.models.swin_transformer_v2.PatchMerging)
    return WidePatchMerging(m.norm, m.reduction, walk.width_ratio, norm_last)


def _convert_cosine_window_attention(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideCosineWindowAttention(m, walk.width_ratio)


def _convert_layer_scale(channels_first: bool) -> Callable[[nn.Module, str, _Walk], nn.Module]:
    def convert(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
        return WideScale(m.gamma, walk.width_ratio, channels_first, getattr(m, "inplace", False))
    return convert


def _convert_metaformer_scale(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    """MetaFormer's ``Scale``: a per-channel scale like LayerScale, viewed as (C, 1, 1) in NCHW blocks."""
    return WideScale(m.scale, walk.width_ratio, channels_first=len(m.shape) == 3, name="scale")


def _convert_mlp(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    """Fold the activation's rescaling into fc1/fc2 (:class:`WideMlp`) when there is one to fold."""
    dense = all(isinstance(f, WideLinear) or (isinstance(f, WideConv2d) and not f.grouped) for f in (m.fc1, m.fc2))
    if not (isinstance(m.act, WideActivation) and m.act.rescales and isinstance(m.norm, nn.Identity) and dense):
        return m
    drop1 = getattr(m, "drop1", getattr(m, "drop", nn.Identity()))
    drop2 = getattr(m, "drop2", nn.Identity())
    return WideMlp(m.fc1, m.act, drop1, m.fc2, drop2, walk.width_ratio)


def _convert_activation(m: nn.Module, path: str, walk: _Walk) -> nn.Module:
    return WideActivation(m, walk.width_ratio, gate=path in walk.gates)


CONVERTERS: dict[type, Callable[[nn.Module, str, _Walk], nn.Module]] = {
    nn.Conv2d: _convert_conv,
    timm.layers.Conv2dSame: _convert_special_conv(WideConv2dSame),
    timm.layers.StdConv2d: _convert_special_conv(WideStdConv2d),
    timm.layers.StdConv2dSame: _convert_special_conv(WideStdConv2d),
    timm.layers.ScaledStdConv2d: _convert_special_conv(WideStdConv2d),
    timm.layers.ScaledStdConv2dSame: _convert_special_conv(WideStdConv2d),
    nn.Linear: _convert_linear,
    timm.layers.Linear: _convert_linear,
    nn.BatchNorm2d: _convert_batchnorm,
    nn.BatchNorm1d: _convert_batchnorm,
    nn.GroupNorm: _convert_groupnorm,
    timm.layers.GroupNorm: _convert_groupnorm,
    timm.layers.GroupNorm1: _convert_groupnorm,
    timm.layers.GroupNormAct: _convert_groupnorm,
    timm.layers.GroupNorm1Act: _convert_groupnorm,
    timm.layers.LayerNormAct: _convert_layernorm(channels_first=False),
    timm.layers.LayerNormAct2d: _convert_layernorm(channels_first=True),
    timm.layers.BatchNormAct2d: _convert_batchnorm,
    nn.LayerNorm: _convert_layernorm(channels_first=False),
    timm.layers.LayerNorm: _convert_layernorm(channels_first=False),
    timm.layers.LayerNorm2d: _convert_layernorm(channels_first=True),
    timm.layers.Attention: _convert_attention,
    rvt.MaskedAttention: _convert_attention,
    timm.models.swin_transformer.WindowAttention: _convert_window_attention,
    timm.models.swin_transformer.PatchMerging: _convert_patch_merging,
    timm.models.swin_transformer_v2.WindowAttention: _convert_cosine_window_attention,
    timm.models.swin_transformer_v2.PatchMerging: _convert_patch_merging,
    timm.models.levit.Attention: _convert_biased_attention,
    timm.models.levit.AttentionDownsample: _convert_biased_attention,
    timm.models.tiny_vit.Attention: _convert_biased_attention,
    timm.models.efficientformer.Attention: _convert_biased_attention,
    timm.layers.pos_embed_rel.RelPosBias: lambda m, path, walk: WideRelPosBias(m, walk.width_ratio),
    timm.models.maxxvit.Attention2d: _convert_head_first_attention,
    timm.models.maxxvit.AttentionCl: _convert_head_first_attention,
    timm.models.pvt_v2.Attention: _convert_subsampled_attention,
    timm.models.twins.GlobalSubSampleAttn: _convert_subsampled_attention,
    timm.models.twins.LocallyGroupedAttn: _convert_local_window_attention,
    timm.models.cait.TalkingHeadAttn: _convert_talking_heads,
    timm.models.cait.ClassAttn: lambda m, path, walk: WideClassAttention(m, walk.width_ratio),
    timm.layers.SplitAttn: _convert_split_attention,
    timm.models.efficientvit_mit.LiteMLA: lambda m, path, walk: WideLiteMLA(m, walk.width_ratio),
    timm.layers.Mlp: _convert_mlp,
    timm.layers.ConvMlp: _convert_mlp,
    timm.layers.LayerScale: _convert_layer_scale(channels_first=False),
    timm.layers.LayerScale2d: _convert_layer_scale(channels_first=True),
    timm.models.metaformer.Scale: _convert_metaformer_scale,
    timm.models.metaformer.StarReLU: lambda m, path, walk: WideStarReLU(m, walk.width_ratio),
    timm.models.hgnet.LearnableAffineBlock: lambda m, path, walk: WideAffine(m, walk.width_ratio),
    **dict.fromkeys(ACTIVATIONS, _convert_activation),
}


# Methods through which a subclass of a known layer can change what it computes.
_COMPUTE_METHODS = ("forward", "_conv_forward")


def _known_class(module: nn.Module, known: Iterable[type]) -> type | None:
    """The most specific class of ``module`` in ``known`` (its own class first, then its bases in method resolution
    order), unless a class on the way redefines what it computes (StdConv2d, Conv2dSame are not Conv2d's rule)."""
    for kind in type(module).__mro__:
        if kind in known:
            return kind
        if any(name in vars(kind) for name in _COMPUTE_METHODS):
            return None
    return None


def converter_for(module: nn.Module) -> Callable[[nn.Module, str, _Walk], nn.Module] | None:
    """The converter of the most specific known class of ``module``: subclasses of known layers are converted like
    their base."""
    kind = _known_class(module, CONVERTERS)
    return None if kind is None else CONVERTERS[kind]


def _passthrough(module: nn.Module) -> bool:
    if isinstance(module, nn.ConstantPad2d):
        return module.value == 0  # zero padding commutes with the layout and the 1/r; another value does not
    return _known_class(module, PASSTHROUGH) is not None


def _covered(module: nn.Module) -> bool:
    """Whether IR has a rule for everything ``module`` computes (its own forward included)."""
    return converter_for(module) is not None or _passthrough(module) or isinstance(module, GATED)


# Attention converters whose fused projections hold [q | k | v] (or [k | v]) blocks: child name -> blocks.
_FUSED_PROJECTIONS = {
    _convert_attention: {"qkv": 3}, _convert_window_attention: {"qkv": 3},
    _convert_subsampled_attention: {"kv": 2}, _convert_local_window_attention: {"qkv": 3},
    _convert_talking_heads: {"qkv": 3}, _convert_cosine_window_attention: {"qkv": 3},
}

_ABSORBED = {_convert_window_attention: ("softmax",), _convert_split_attention: ("rsoftmax",),
             _convert_cosine_window_attention: ("softmax",)}

# Children a converter keeps as they are (they compute from constants, not activations): not widened.
_KEPT = {_convert_cosine_window_attention: ("cpb_mlp",)}


def supported_modules() -> list[str]:
    """Names of the module types IR knows (for error messages and docs)."""
    types = list(CONVERTERS) + list(PASSTHROUGH) + list(RAW_PARAMETERS)
    return sorted({f"{t.__module__.split('.')[0]}.{t.__qualname__}" for t in types})


def _unsupported(path: str, module: nn.Module, why: str) -> UnsupportedModelError:
    return UnsupportedModelError(
        f"cannot expand the student: module '{path or '<root>'}' ({type(module).__module__}."
        f"{type(module).__qualname__}) {why}. Supported module types: {', '.join(supported_modules())}. "
        "Which timm families expand exactly: docs/supported_models.md."
    )


def _check_supported(student: nn.Module) -> None:
    """Fail before any work, naming the first module IR has no rule for."""
    # children a converter replaces by its own computation (Swin's softmax runs inside the fused attention)
    absorbed = {f"{p}.{c}" for p, m in student.named_modules() for c in _ABSORBED.get(converter_for(m), ())}
    for path, m in student.named_modules():
        kind = type(m)
        if path in absorbed or converter_for(m) is not None or _passthrough(m):
            continue
        if kind in (nn.ModuleList, nn.ModuleDict):
            continue  # module lists and dicts are never called: only their members compute
        own = [n for n, p in m.named_parameters(recurse=False) if p is not None]
        known = raw_parameter_rules(m)
        stray = [n for n in own if n not in known]
        if stray:
            raise _unsupported(path, m, f"holds parameters {stray} that no IR rule covers")
        if isinstance(m, nn.Sequential) and len(m) == 0:
            continue  # an empty Sequential is the identity (a shortcut without projection)
        if not any(True for _ in m.children()) and not own:
            raise _unsupported(path, m, "is a leaf operation with no IR rule")
        if isinstance(m, timm.layers.SelectAdaptivePool2d) and "cat" in m.pool_type:
            raise _unsupported(path, m, f"concatenates poolings (pool_type={m.pool_type!r}), which breaks the "
                                        "replica-major channel layout")


def _convert_tree(module: nn.Module, path: str, walk: _Walk) -> nn.Module:
    converter = converter_for(module)
    kept = _KEPT.get(converter, ())
    for name, child in list(module.named_children()):
        if name in kept:
            continue
        new = _convert_tree(child, f"{path}.{name}" if path else name, walk)
        if new is not child:
            setattr(module, name, new)
    return converter(module, path, walk) if converter else module


def _wrap_raw_parameters(net: nn.Module, width_ratio: int) -> list[tuple[str, str, TensorSpec]]:
    """Widen raw parameters of known containers in place and give them a student view."""
    wrapped = []
    for path, m in list(net.named_modules()):
        for name, spec in raw_parameter_rules(m).items():
            p = getattr(m, name, None)
            if p is None:
                continue
            setattr(m, name, nn.Parameter(widen(p.detach().float(), spec, width_ratio)))
            parametrize.register_parametrization(m, name, StudentView(spec, width_ratio), unsafe=True)
            wrapped.append((path, name, spec))
    return wrapped


def infer_input_size(student: nn.Module, input_size: tuple[int, int, int] | None) -> tuple[int, int, int]:
    """(C, H, W) of a probe input: explicit, else a ViT's fixed image size, else 64x64."""
    if input_size is not None:
        return tuple(input_size)
    in_chans = next((m.in_channels if isinstance(m, nn.Conv2d) else m.in_features
                     for m in student.modules() if isinstance(m, nn.Conv2d | nn.Linear)), 3)
    patch_embed = getattr(student, "patch_embed", None)
    img_size = getattr(patch_embed, "img_size", None)
    if img_size is not None and not getattr(patch_embed, "dynamic_img_size", False):
        return (in_chans, *img_size)
    return (in_chans, 64, 64)


def _classifier_paths(student: nn.Module, names: dict[nn.Module, str], outputs: dict[str, Tensor],
                      logits: Tensor) -> set[str]:
    get_classifier = getattr(student, "get_classifier", None)
    heads = get_classifier() if callable(get_classifier) else ()
    heads = heads if isinstance(heads, tuple) else (heads,)
    paths = {names[h] for h in heads if isinstance(h, nn.Linear | nn.Conv2d)}
    # a head that is a container (RepViT's norm + linear, with a distillation twin whose logits are averaged in):
    # its layers that produce the logits' shape
    paths |= {names[m] for h in heads if isinstance(h, nn.Module) and not isinstance(h, nn.Linear | nn.Conv2d)
              for m in h.modules() if isinstance(m, nn.Linear | nn.Conv2d) and names.get(m) in outputs
              and outputs[names[m]].shape == logits.shape}
    paths |= {p for p, out in outputs.items() if out is logits}
    if not paths:
        raise UnsupportedModelError(
            f"cannot find the classifier of {type(student).__name__}: no get_classifier() and no layer whose "
            "output is the model's output; GPD needs a student with a classification head (num_classes > 0)")
    return paths


def _trace(student: nn.Module, probe: Tensor) -> tuple[set[str], set[str], Tensor, StudentTrace]:
    """Run the student once; return (first layers, classifiers, logits, what its blocks do between modules)."""
    names = {m: p for p, m in student.named_modules()}
    fed_by_image: set[str] = set()
    outputs: dict[str, Tensor] = {}

    def hook(m: nn.Module, args: tuple, out: object) -> None:
        if isinstance(m, nn.Conv2d | nn.Linear):
            if args and args[0] is probe:
                fed_by_image.add(names[m])
            outputs[names[m]] = out

    handles = [m.register_forward_hook(hook) for m in student.modules()]
    try:
        logits, ops = trace_student(student, probe, _covered)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise UnsupportedModelError(f"{type(student).__name__} must return a (batch, classes) logits tensor, "
                                    f"got {type(logits).__name__}")
    if ops.refusal is not None:
        path, module, what = ops.refusal
        raise _unsupported(path, module, f"applies {what}, a non-homogeneous function IR cannot rescale there "
                                         "(wrap it in a module IR knows, e.g. an activation module)")
    return fed_by_image, _classifier_paths(student, names, outputs, logits), logits, ops


def _validate(student: nn.Module, width_ratio: int, noise_std: float) -> None:
    if not isinstance(student, nn.Module):
        raise TypeError(f"expand(student=...) needs an nn.Module, got {type(student).__name__}")
    if isinstance(width_ratio, bool) or not isinstance(width_ratio, int) or width_ratio < 2:
        raise ValueError(f"width_ratio={width_ratio!r} is invalid: it must be an integer >= 2 (the paper uses 2; "
                         "powers of two keep the rescalings exact in fp16/bf16)")
    if not noise_std >= 0:
        raise ValueError(f"noise_std={noise_std!r} is invalid: it must be >= 0 (default 1e-6)")


def expand(student: nn.Module, width_ratio: int = 2, noise_std: float = 1e-6, branches: bool = False, *,
           pretrained_student: bool = False, input_size: tuple[int, int, int] | None = None,
           verify: bool = True) -> GPDModel:
    """Build the dynamic teacher of ``student`` by Inverse Reparameterization.

    Args:
        student: a timm or torchvision classifier (left untouched; a copy is widened).
        width_ratio: r, the widening of every internal channel dimension (ViTs: r x heads, same head dim).
        noise_std: std of the symmetry-breaking noise added to the replicas (not to the student slice).
        branches: turn eligible 3x3 convs into multi-branch blocks (the branch dimension of IR).
        pretrained_student: start the branch scalars at "origin only" (fine-tuning) instead of the
            default mix; without branches it changes nothing.
        input_size: (C, H, W) of the probe input used to trace and verify; inferred when omitted.
        verify: check, before adding noise, that teacher and student modes compute the source student's
            function (raises :class:`IRCheckError` naming the max difference).

    Returns:
        A :class:`GPDModel`: ``model(x, mode="teacher" | "student" | "both")``.
    """
    _validate(student, width_ratio, noise_std)
    _check_supported(student)
    source = copy.deepcopy(student).float()
    size = infer_input_size(source, input_size)
    was_training = source.training
    source.eval()
    probe = torch.randn(2, *size)
    try:
        first_layers, classifiers, logits, ops = _trace(source, probe)
    except (RuntimeError, ValueError, IndexError, TypeError) as err:
        if isinstance(err, UserInputError):
            raise
        given = "given" if input_size is not None else "inferred"
        raise UnsupportedModelError(
            f"the student ({type(student).__name__}) does not run on a probe of the {given} input size "
            f"{tuple(size)} ({type(err).__name__}: {err}); pass expand(..., input_size=(C, H, W)) with the size it "
            "was built for") from err

    net = copy.deepcopy(source)
    walk = _Walk(width_ratio, first_layers, classifiers, branches, pretrained_student)
    walk.gates = {f"{p}.{GATES[k]}" for p, m in net.named_modules() for k in type(m).__mro__ if k in GATES}
    walk.blocks = {f"{p}.{name}": n for p, m in net.named_modules()
                   for name, n in _FUSED_PROJECTIONS.get(converter_for(m), {}).items()}
    net = _convert_tree(net, "", walk)
    raw = _wrap_raw_parameters(net, width_ratio)
    model = GPDModel(net, width_ratio=width_ratio, in_chans=size[0], num_classes=logits.shape[1],
                     source=source, raw_parameters=raw, branches=branches, pretrained_student=pretrained_student)
    model.eval()
    channel = ChannelOps(ops.sites, width_ratio)
    if channel:
        with channel.calibrating(net), _naming_failures(net):
            model(probe, mode=TEACHER)
        channel.install(net)
        model.channel_sites = tuple(channel.describe())
    if verify:
        try:
            with _naming_failures(net):
                check_ir(model, probe, logits if model.student_is_source else None)
        except IRCheckError as err:
            raise _located(err, model, probe, walk, ops) from None
    if noise_std > 0:
        for m in model.modules():
            if isinstance(m, WideModule):
                m.add_noise(noise_std)
        for path, name, spec in raw:
            _add_raw_noise(net.get_submodule(path), name, spec, width_ratio, noise_std)
    source.train(was_training)
    model.train(was_training)
    return model


@contextlib.contextmanager
def _naming_failures(net: nn.Module) -> Iterator[None]:
    """Re-raise a raw error from inside the dynamic teacher's forward as :class:`UnsupportedModelError` naming the
    innermost module that was running."""
    with ModuleStack(dict(net.named_modules()), unwind=False) as stack:
        try:
            yield
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            if isinstance(err, UnsupportedModelError | IRCheckError) or not stack.stack:
                raise
            path, module = stack.stack[-1]
            raise _unsupported(path, module, f"fails in the dynamic teacher's forward ({type(err).__name__}: "
                                             f"{err}); its forward does something with the widened channels that "
                                             "IR has no rule for") from err


def _located(err: IRCheckError, model: GPDModel, probe: Tensor, walk: _Walk, ops: StudentTrace) -> Exception:
    """The IR check failure with the first module whose teacher output is not the tiled student output."""
    found = first_disagreement(model.net, probe, model.width_ratio, skip=walk.blocks, rtol=1e-5)
    if found is None:
        return err
    path, module, diff = found
    if ops.products.get(path):
        return _unsupported(path, module, "multiplies two activations in its own forward (e.g. x * gate or "
                                          "q @ k): in the dynamic teacher each carries 1/r, the product 1/r^2")
    where = f"module '{path or '<root>'}' ({type(module).__module__}.{type(module).__qualname__})"
    return IRCheckError(f"{err.args[0]}. The first module whose teacher output is not the tiled student output is "
                        f"{where} (max difference {diff:.3g}): its forward, or a child's, does something IR has "
                        "no rule for")


@torch.no_grad()
def _add_raw_noise(module: nn.Module, name: str, spec: TensorSpec, r: int, std: float) -> None:
    if not spec.noisy:
        return
    wide = module.parametrizations[name].original
    noise = torch.randn_like(wide) * std
    narrow(noise, spec, r).zero_()
    wide.add_(noise)


@torch.no_grad()
def check_ir(model: GPDModel, probe: Tensor, source_logits: Tensor | None, rtol: float = 1e-4) -> dict[str, float]:
    """Max |teacher - student| (and |student - source| when given) on ``probe``; raise above tolerance."""
    teacher, student = model(probe, mode=TEACHER), model(probe, mode=STUDENT)
    scale = max(1.0, (source_logits if source_logits is not None else student).abs().max().item())
    errors = {"teacher_vs_student": (teacher - student).abs().max().item()}
    if source_logits is not None:
        errors["student_vs_source"] = (student - source_logits).abs().max().item()
    bad = {k: v for k, v in errors.items() if v > rtol * scale}
    if bad:
        raise IRCheckError(
            f"IR check failed for {type(model.source).__name__}: {bad} exceeds {rtol} x {scale:.3g}. The model "
            "contains an operation the IR rules do not cover (e.g. a functional non-homogeneous activation or a "
            "channel concatenation inside a container's forward); add a converter for it")
    return errors
