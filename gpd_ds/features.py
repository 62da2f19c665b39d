"""Feature distillation: the features of named stages, read in the forward that produces the logits.

A network's **taps** name where its distillation features are read (:mod:`gpd_ds.tap_sets`: five levels by
default, ReviewKD's for ResNets, reviewkd_rvt.md 1.2): the input or the output of a module, found by path
(:mod:`gpd_ds.gpd.taps`). ``recording`` hooks those modules for the length of one forward and collects each tap's
tensor per GPD mode, so the student view, the dynamic teacher (both passes of ``mode="both"``) and the static
teacher give their features without a second forward. The hooks
exist only inside that block: evaluation, EMA copies and the recomputation of activation checkpointing (which runs in
backward, after the block) see a network without them.

The **connectors** (the feature loss's: ReviewKD's ABF chains, :mod:`gpd_ds.reviewkd`; FitNets' regressors,
:mod:`gpd_ds.kd.fitnet`) map a network's features to the static teacher's widths. They are trained with the
student, so they live inside the module DeepSpeed wraps (``connectors`` of :class:`~gpd_ds.gpd.model.GPDModel`,
or of :class:`StudentWithConnector` without GPD): ZeRO partitions them, checkpoints and the EMA hold them, and
export drops them.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from gpd_ds.config import LossConfig, split_kd
from gpd_ds.gpd.mode import STUDENT
from gpd_ds.gpd.taps import Tap, recording
from gpd_ds.registry import FEATURE_LOSSES
from gpd_ds.tap_sets import FeatureTapError, feature_taps

__all__ = ["FeatureTapError", "StudentWithConnector", "build_connectors", "feature_taps", "feature_widths",
           "static_taps", "student_taps"]


def student_taps(student: nn.Module, name: str, loss: LossConfig) -> tuple[Tap, ...]:
    """The student's taps (``loss.student_taps`` or its family's default, :mod:`gpd_ds.tap_sets`); the dynamic
    teacher keeps its module paths, so they read it too."""
    return feature_taps(student, name, loss.reviewkd_post_relu, loss.student_taps, "loss.student_taps")


def static_taps(teacher: nn.Module, name: str, loss: LossConfig) -> tuple[Tap, ...]:
    """The static teacher's taps (``loss.teacher_taps`` or its family's default)."""
    return feature_taps(teacher, name, loss.reviewkd_post_relu, loss.teacher_taps, "loss.teacher_taps")


def feature_widths(model: nn.Module, taps: Sequence[Tap], image_size: int) -> list[int]:
    """The channel count of each tap, from a forward of a copy of ``model`` on the meta device (no compute)."""
    probe = copy.deepcopy(model).to("meta").eval()
    with recording(probe, taps) as features, torch.no_grad():
        probe(torch.empty(1, 3, image_size, image_size, device="meta"))
    return [t.shape[1] for t in features[STUDENT]]


def build_connectors(student: nn.Module, student_name: str, teacher: nn.Module, teacher_name: str, image_size: int,
                     loss: LossConfig, width_ratio: int | None) -> tuple[tuple[Tap, ...], nn.ModuleDict]:
    """The student's taps and the connectors of ``loss.kd``'s feature loss (:data:`~gpd_ds.registry.FEATURE_LOSSES`),
    mapping features to ``teacher``'s widths: one for the student (``student``) and, with a ``width_ratio``, one
    for the dynamic teacher (``teacher``, r x wider inputs)."""
    method = FEATURE_LOSSES.get(split_kd(loss.kd)[1])
    taps = student_taps(student, student_name, loss)
    widths = feature_widths(student, taps, image_size)
    teacher_widths = feature_widths(teacher, static_taps(teacher, teacher_name, loss), image_size)
    if len(widths) != len(teacher_widths):
        raise FeatureTapError(f"{student_name!r} has {len(widths)} feature levels, the static teacher "
                              f"{teacher_name!r} {len(teacher_widths)}: give loss.student_taps and "
                              "loss.teacher_taps as many taps each")
    connectors = {"student": method.connector(widths, teacher_widths, loss)}
    if width_ratio is not None:
        connectors["teacher"] = method.connector([w * width_ratio for w in widths], teacher_widths, loss)
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
