"""Feature distillation: the features of named stages, read in the forward that produces the logits.

A network's **taps** name where its distillation features are read (ReviewKD's five levels, reviewkd_rvt.md 1.2):
the input or the output of a module, found by path (:mod:`gpd_ds.gpd.taps`). ``recording`` hooks those modules
for the length of one forward and collects each tap's tensor per GPD mode, so the student view, the dynamic teacher
(both passes of ``mode="both"``) and the static teacher give their features without a second forward. The hooks
exist only inside that block: evaluation, EMA copies and the recomputation of activation checkpointing (which runs in
backward, after the block) see a network without them.

The **connectors** (ReviewKD's ABF chains, :mod:`gpd_ds.reviewkd`) map a network's features to the static
teacher's widths. They are trained with the student, so they live inside the module DeepSpeed wraps
(``connectors`` of :class:`~gpd_ds.gpd.model.GPDModel`, or of :class:`StudentWithConnector` without GPD): ZeRO
partitions them, checkpoints and the EMA hold them, and export drops them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gpd_ds.errors import UserInputError
from gpd_ds.gpd.mode import STUDENT
from gpd_ds.gpd.taps import INPUT, OUTPUT, Tap, recording
from gpd_ds.models.mobilenet import MobileNetV1ReLU
from gpd_ds.reviewkd import ReviewKDConnector


class FeatureTapError(UserInputError, ValueError):
    """A network has no known feature taps (feature distillation cannot read its stages)."""


def feature_taps(model: nn.Module, name: str, post_relu: bool = False) -> tuple[Tap, ...]:
    """ReviewKD's five levels of ``model`` (``name`` is only for the message), shallow to deep: the four stage
    outputs before their last activation, then the pooled feature (the classifier's input).

    ``post_relu`` (``loss.reviewkd_post_relu``): a ResNet's four stage outputs *after* their last ReLU, which is what
    the reference's code reads (its stage output ``x1`` is overwritten by the in-place ``relu`` that follows: the
    spec, ReviewKD's paper and mdistiller read it before). MobileNet-v1's taps are the same either way."""
    if all(hasattr(model, f"layer{i}") for i in range(1, 5)) and hasattr(model, "fc"):  # timm ResNets
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
    if isinstance(model, MobileNetV1ReLU):  # model[3, 5, 11, 13]: their pointwise conv's BatchNorm
        return (*(Tap(f"model.{k}.4", OUTPUT) for k in (3, 5, 11, 13)), Tap("fc"))
    arch = (getattr(model, "pretrained_cfg", None) or {}).get("architecture", "")
    if arch.startswith("mobilenetv1_") and [len(b) for b in getattr(model, "blocks", ())] == [1, 2, 2, 6, 2]:
        # timm's: the same four blocks (blocks.1.1 is model[3] ...), the input of their ReLU6
        return (*(Tap(f"blocks.{p}.bn2.act") for p in ("1.1", "2.1", "3.5", "4.1")), Tap("classifier"))
    raise FeatureTapError(f"feature distillation (loss.kd=...reviewkd) has no taps for {name!r} "
                          f"({type(model).__name__}); it supports timm ResNets and MobileNet-v1 "
                          "(mobilenetv1_relu, mobilenetv1_100)")


def feature_widths(model: nn.Module, taps: Sequence[Tap], image_size: int) -> list[int]:
    """The channel count of each tap, from a forward of a copy of ``model`` on the meta device (no compute)."""
    probe = copy.deepcopy(model).to("meta").eval()
    with recording(probe, taps) as features, torch.no_grad():
        probe(torch.empty(1, 3, image_size, image_size, device="meta"))
    return [t.shape[1] for t in features[STUDENT]]


def build_connectors(student: nn.Module, student_name: str, teacher: nn.Module, teacher_name: str, image_size: int,
                     mid_channels: int, width_ratio: int | None, post_relu: bool = False
                     ) -> tuple[tuple[Tap, ...], nn.ModuleDict]:
    """The student's taps and ReviewKD connectors, mapping features to ``teacher``'s widths: one for the student
    (``student``) and, with a ``width_ratio``, one for the dynamic teacher (``teacher``, r x wider inputs)."""
    taps = feature_taps(student, student_name, post_relu)
    widths = feature_widths(student, taps, image_size)
    teacher_widths = feature_widths(teacher, feature_taps(teacher, teacher_name, post_relu), image_size)
    if len(widths) != len(teacher_widths):
        raise FeatureTapError(f"{student_name!r} has {len(widths)} feature levels, the static teacher "
                              f"{teacher_name!r} {len(teacher_widths)}")
    connectors = {"student": ReviewKDConnector(widths, teacher_widths, mid_channels)}
    if width_ratio is not None:
        connectors["teacher"] = ReviewKDConnector([w * width_ratio for w in widths], teacher_widths, mid_channels)
    return taps, nn.ModuleDict(connectors)


class StudentWithConnector(nn.Module):
    """A plain student (``model.method=plain``) and its connector, trained together: ``net`` is the student,
    ``connectors["student"]`` its ABF chain. ``forward(x)`` gives the logits; ``features=True`` the logits and the
    connector's outputs."""

    def __init__(self, net: nn.Module, taps: Sequence[Tap], connectors: nn.ModuleDict) -> None:
        super().__init__()
        self.net, self.connectors, self.taps = net, connectors, tuple(taps)

    def forward(self, x: Tensor, features: bool = False) -> Tensor | tuple[Tensor, list[Tensor]]:
        if not features:
            return self.net(x)
        with recording(self.net, self.taps) as found:
            logits = self.net(x)
        return logits, self.connectors["student"](found[STUDENT])
