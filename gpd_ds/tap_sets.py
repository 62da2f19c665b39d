"""Which features a network gives feature distillation: its **tap set**, five levels shallow -> deep (four stage
features, then the pooled feature the classifier reads), each a :class:`~gpd_ds.gpd.taps.Tap` (a module path, as
torchdistill names them, and whether its input or output is read).

A run names its own with ``loss.student_taps`` / ``loss.teacher_taps`` (``"stages.2"``, ``"head.fc:input"``); left
empty, each network gets the default of its family:

- timm ResNets: each stage's output before its last ReLU (``loss.reviewkd_post_relu``: after it, as the reference
  reads it), MobileNet-v1: the reference's four blocks (ReviewKD's levels, reviewkd_rvt.md 1.2);
- any timm model that lists its stages (``feature_info``): the last module of each of its four deepest strides
  (ConvNeXt, Swin, EfficientNet, RegNet, MobileNet-v2/3 ...); with one stride (ViT / DeiT) the blocks that end each
  quarter of the depth, their tokens folded into the patch grid; RVT: the same over its stages' blocks.

The dynamic teacher keeps the student's module paths (IR widens modules in place), so the student's taps read it too.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

from torch import nn

from gpd_ds.errors import UserInputError
from gpd_ds.gpd.taps import INPUT, OUTPUT, Tap
from gpd_ds.models.mobilenet import MobileNetV1ReLU

LEVELS = 4  # stage features per tap set; the pooled feature makes the fifth


class FeatureTapError(UserInputError, ValueError):
    """A network has no known feature taps, or a named tap is not one of its modules."""


def feature_taps(model: nn.Module, name: str, post_relu: bool = False, paths: Sequence[str] = (),
                 key: str = "loss.student_taps") -> tuple[Tap, ...]:
    """``model``'s taps: ``paths`` (``key``'s value: ``"module.path"`` reads the output, ``"module.path:input"``
    the input) or its family's default; ``name`` is the model's name for messages."""
    if paths:
        return tuple(_named_tap(model, name, p, key) for p in paths)
    return _default_taps(model, name, post_relu)


def _layout(model: nn.Module, path: str, where: str) -> Tap:
    return Tap(path, where, prefix=getattr(model, "num_prefix_tokens", 0) or 0,
               nhwc=getattr(model, "output_fmt", "NCHW") == "NHWC")


def _named_tap(model: nn.Module, name: str, spec: str, key: str) -> Tap:
    path, _, where = spec.partition(":")
    where = where or OUTPUT
    modules = dict(model.named_modules())
    if where not in (INPUT, OUTPUT):
        raise FeatureTapError(f"{key}: {spec!r} is invalid: write 'module.path' (its output) or "
                              f"'module.path:input' (its input), not ':{where}'")
    if not path or path not in modules:
        near = difflib.get_close_matches(path, [m for m in modules if m], n=3)
        raise FeatureTapError(f"{key}: {name!r} has no module {path!r}"
                              + (f"; did you mean {', '.join(near)}?" if near else
                                 "; list its modules with model.named_modules()"))
    return _layout(model, path, where)


def _default_taps(model: nn.Module, name: str, post_relu: bool) -> tuple[Tap, ...]:
    for family in (_resnet, _mobilenet_v1, _rvt, _timm_stages):
        taps = family(model, name, post_relu)
        if taps:
            return taps
    raise FeatureTapError(f"feature distillation has no default taps for {name!r} ({type(model).__name__}): it "
                          "lists no stages (timm's feature_info); name them with loss.student_taps / "
                          "loss.teacher_taps (module paths, 'path:input' for a module's input)")


def _resnet(model: nn.Module, name: str, post_relu: bool) -> tuple[Tap, ...]:
    """timm ResNets: the four stage outputs before their last activation (after it with ``post_relu``: the
    reference's code reads them after its in-place ReLU, reviewkd_rvt.md 1.2), then the classifier's input."""
    if not (all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "fc")):
        return ()
    stages = []
    for i in range(1, 5):
        last = len(getattr(model, f"layer{i}")) - 1
        block = getattr(model, f"layer{i}")[last]
        act = "act3" if hasattr(block, "act3") else "act2"
        if not hasattr(block, act):
            raise FeatureTapError(f"{name!r}: layer{i}.{last} has no {act}; a torchvision ResNet shares one "
                                  "ReLU per block, so its pre-activation stage output cannot be read: use the "
                                  "timm model of the same name (e.g. resnet18 instead of torchvision:resnet18)")
        stages.append(Tap(f"layer{i}.{last}.{act}", OUTPUT if post_relu else INPUT))
    return (*stages, Tap("fc"))


def _mobilenet_v1(model: nn.Module, name: str, post_relu: bool) -> tuple[Tap, ...]:
    """gpd_ds's MobileNet-v1 (the reference's): model[3, 5, 11, 13]'s pointwise BatchNorm; timm's: the same four
    blocks (blocks.1.1 is model[3] ...), the input of their ReLU6."""
    if isinstance(model, MobileNetV1ReLU):
        return (*(Tap(f"model.{k}.4", OUTPUT) for k in (3, 5, 11, 13)), Tap("fc"))
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    if arch.startswith("mobilenetv1_") and [len(b) for b in getattr(model, "blocks", ())] == [1, 2, 2, 6, 2]:
        return (*(Tap(f"blocks.{p}.bn2.act") for p in ("1.1", "2.1", "3.5", "4.1")), Tap("classifier"))
    return ()


def _quarters(paths: Sequence[str]) -> list[str]:
    """The paths that end each quarter of ``paths`` (with fewer than four, some repeat)."""
    return [paths[max(0, -(-k * len(paths) // LEVELS) - 1)] for k in range(1, LEVELS + 1)]


def _classifier_input(model: nn.Module) -> Tap | None:
    head = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    head = head[0] if isinstance(head, (tuple, list)) else head  # DeiT distilled: (head, head_dist)
    modules = dict(model.named_modules())
    return _layout(model, head, INPUT) if head in modules and not isinstance(modules[head], nn.Identity) else None


def _rvt(model: nn.Module, name: str, post_relu: bool) -> tuple[Tap, ...]:
    """gpd_ds's RVT (no ``feature_info``): the blocks ending each quarter of the depth, over its stages."""
    if not hasattr(model, "transformers") or (head := _classifier_input(model)) is None:
        return ()
    blocks = [f"transformers.{s}.blocks.{i}" for s, stage in enumerate(model.transformers)
              for i in range(len(stage.blocks))]
    return (*(_layout(model, p, OUTPUT) for p in _quarters(blocks)), head)


def _timm_stages(model: nn.Module, name: str, post_relu: bool) -> tuple[Tap, ...]:
    """Any timm model with ``feature_info``: the last module of each of its four deepest strides (ConvNeXt's
    stages, Swin's layers, EfficientNet's blocks at strides 4-32), or, with fewer strides, the modules ending each
    quarter of the list (ViT / DeiT: the blocks ending each quarter of the depth)."""
    info = list(getattr(model, "feature_info", None) or [])
    head = _classifier_input(model)
    if not info or head is None or not all(isinstance(f, dict) and "module" in f for f in info):
        return ()
    last_of_stride = {f.get("reduction"): f["module"] for f in info}  # later entries of a stride win
    paths = list(last_of_stride.values())[-LEVELS:] if len(last_of_stride) >= LEVELS else \
        _quarters([f["module"] for f in info])
    return (*(_layout(model, p, OUTPUT) for p in paths), head)
