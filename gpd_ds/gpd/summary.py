"""Size, cost and IR error of a dynamic teacher and its student (for ``gpd-ds inspect``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from gpd_ds.gpd.mode import STUDENT, TEACHER
from gpd_ds.gpd.model import GPDModel


@dataclass(frozen=True)
class ModelSummary:
    student_params: int
    teacher_params: int
    student_gmacs: float
    teacher_gmacs: float
    student_merge_gmacs: float
    teacher_merge_gmacs: float
    teacher_vs_student: float
    student_vs_source: float
    max_logit: float


def _macs(fn, x: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn(x)
    return counter.get_total_flops() // 2


def _gmacs(fn, x: torch.Tensor) -> tuple[float, float]:
    """(GMACs per image, GMACs per forward independent of the batch), from torch's FLOP counter
    (conv, linear, attention matmuls). The per-forward part is the multi-branch kernel merge."""
    one, two = _macs(fn, x[:1]), _macs(fn, x[:2])
    return (two - one) / 1e9, (2 * one - two) / 1e9


@torch.no_grad()
def summarize(model: GPDModel, input_size: tuple[int, int, int], batch: int = 2) -> ModelSummary:
    """Measure parameters, GMACs per image and the IR error (eval mode) on one random batch."""
    source: nn.Module = model.source
    modes = model.training, source.training
    model.eval()
    source.eval()
    try:
        x = torch.randn(batch, *input_size)
        teacher, student, plain = model(x, mode=TEACHER), model(x, mode=STUDENT), source(x)
        student_gmacs, student_merge = _gmacs(lambda t: model(t, mode=STUDENT), x)
        teacher_gmacs, teacher_merge = _gmacs(lambda t: model(t, mode=TEACHER), x)
        return ModelSummary(
            student_params=model.num_parameters(STUDENT),
            teacher_params=model.num_parameters(TEACHER),
            student_gmacs=student_gmacs,
            teacher_gmacs=teacher_gmacs,
            student_merge_gmacs=student_merge,
            teacher_merge_gmacs=teacher_merge,
            teacher_vs_student=(teacher - student).abs().max().item(),
            student_vs_source=(student - plain).abs().max().item(),
            max_logit=plain.abs().max().item(),
        )
    finally:
        model.train(modes[0])
        source.train(modes[1])
