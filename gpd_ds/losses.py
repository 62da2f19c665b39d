"""GPD losses: CE, label-smoothed soft CE (SCE), KL knowledge distillation, DKD, and GPDLoss.

All losses are computed in fp32 whatever the logits' dtype. Targets may be class indices ``(B,)``
or soft/mixed distributions ``(B, K)`` (mixup/cutmix); DKD then uses the argmax as the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Logits = Tensor | tuple[Tensor, Tensor]  # a DeiT distilled model in distilled training: (class, distillation) heads

KD_KINDS = ("dkd", "kl", "none")


def _hard(target: Tensor) -> Tensor:
    return target.argmax(dim=1) if target.ndim == 2 else target


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE against class indices ``(B,)`` or a soft target ``(B, K)``, mean over the batch."""
    logits = logits.float()
    if target.ndim == 2:
        return torch.sum(-target.float() * F.log_softmax(logits, dim=1), dim=1).mean()
    return F.cross_entropy(logits, target)


def soft_cross_entropy(logits: Tensor, target_logits: Tensor, smoothing: float = 0.1) -> Tensor:
    """SCE: CE of ``logits`` against ``(1 - s) * softmax(target_logits) + s / K`` (temperature 1).

    ``target_logits`` is a target, not a prediction: it is detached here (stop-gradient).
    """
    target = F.softmax(target_logits.detach().float(), dim=1)
    target = (1.0 - smoothing) * target + smoothing / target.shape[1]
    return cross_entropy(logits, target)


def kl_kd(logits: Tensor, teacher_logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t / T) || softmax(s / T))``, summed over classes, mean over the batch."""
    t = temperature
    log_p_student = F.log_softmax(logits.float() / t, dim=1)
    log_p_teacher = F.log_softmax(teacher_logits.detach().float() / t, dim=1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


def dkd(logits: Tensor, teacher_logits: Tensor, target: Tensor, alpha: float = 1.0, beta: float = 0.5,
        temperature: float = 1.0) -> Tensor:
    """Decoupled KD (Zhao et al., 2022): ``alpha * TCKD + beta * NCKD``.

    TCKD is the KL between the binary (target, rest) distributions; NCKD the KL between the
    distributions over the non-target classes (target logit pushed down by 1000). Both are summed
    over classes, divided by the batch size and multiplied by T^2.
    """
    t = temperature
    s, z = logits.float() / t, teacher_logits.detach().float() / t
    gt = F.one_hot(_hard(target), s.shape[1]).bool()
    p_s, p_t = F.softmax(s, dim=1), F.softmax(z, dim=1)

    def binary(p: Tensor) -> Tensor:
        target_mass = (p * gt).sum(dim=1, keepdim=True)
        return torch.cat([target_mass, 1.0 - target_mass], dim=1)

    b_s, b_t = binary(p_s), binary(p_t)
    tckd = F.kl_div(torch.log(b_s.clamp_min(1e-12)), b_t, reduction="sum") * t * t / s.shape[0]
    log_q_s = F.log_softmax(s - 1000.0 * gt, dim=1)
    q_t = F.softmax(z - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum") * t * t / s.shape[0]
    return alpha * tckd + beta * nckd


class LossOutput(NamedTuple):
    total: Tensor
    terms: dict[str, Tensor]


@dataclass(frozen=True)
class GPDLoss:
    """The GPD objective (gpd_method.md 1.2)::

        L = ce_weight * [CE(z_T, y) + CE(z_S, y)]
          + kd_weight * [psi(z_T; z_static) + psi(z_S; z_static)]     (only with a static teacher)
          + dynamic_weight * SCE(z_S, softmax(sg(z_T)))

    ``psi`` is DKD (default), Hinton KL, or nothing. Terms are returned by name:
    ``ce_student``, ``ce_dynamic_teacher``, ``kd_static_to_student``, ``kd_static_to_dynamic_teacher``,
    ``sce_dynamic_to_student`` (unweighted), and the weighted sum as ``total``.
    """

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    dynamic_weight: float = 3.0
    smoothing: float = 0.1
    kd: str = "dkd"
    dkd_alpha: float = 1.0
    dkd_beta: float = 0.5
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.kd not in KD_KINDS:
            raise ValueError(f"GPDLoss kd={self.kd!r} is unknown; use one of {KD_KINDS}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"GPDLoss smoothing={self.smoothing!r} must be in [0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"GPDLoss temperature={self.temperature!r} must be > 0")

    def static_kd(self, logits: Tensor, static_logits: Tensor, target: Tensor) -> Tensor:
        if self.kd == "dkd":
            return dkd(logits, static_logits, target, self.dkd_alpha, self.dkd_beta, self.temperature)
        return kl_kd(logits, static_logits, self.temperature)

    def plain(self, student: Logits, target: Tensor, static_teacher: Tensor | None = None) -> LossOutput:
        """The objective without a dynamic teacher (baselines, teacher training): CE, plus psi if a static
        teacher is given: ``ce_weight * CE(z_S, y) + kd_weight * psi(z_S; z_static)``."""
        s_cls, s_dist = _heads(student)
        terms = {"ce_student": cross_entropy(s_cls, target)}
        total = self.ce_weight * terms["ce_student"]
        if static_teacher is not None and self.kd != "none":
            terms["kd_static_to_student"] = self.static_kd(s_dist, static_teacher, target)
            total = total + self.kd_weight * terms["kd_static_to_student"]
        return LossOutput(total, terms)

    def __call__(self, student: Logits, dynamic_teacher: Logits, target: Tensor,
                 static_teacher: Tensor | None = None) -> LossOutput:
        (s_cls, s_dist), (t_cls, t_dist) = _heads(student), _heads(dynamic_teacher)
        terms = {
            "ce_student": cross_entropy(s_cls, target),
            "ce_dynamic_teacher": cross_entropy(t_cls, target),
            "sce_dynamic_to_student": soft_cross_entropy(s_cls, t_cls.detach(), self.smoothing),
        }
        total = self.ce_weight * (terms["ce_student"] + terms["ce_dynamic_teacher"])
        total = total + self.dynamic_weight * terms["sce_dynamic_to_student"]
        if static_teacher is not None and self.kd != "none":
            terms["kd_static_to_student"] = self.static_kd(s_dist, static_teacher, target)
            terms["kd_static_to_dynamic_teacher"] = self.static_kd(t_dist, static_teacher, target)
            total = total + self.kd_weight * (terms["kd_static_to_student"] + terms["kd_static_to_dynamic_teacher"])
        return LossOutput(total, terms)



def _heads(logits: Logits) -> tuple[Tensor, Tensor]:
    """(class-head, distillation-head) logits. A DeiT distilled model in distilled training returns both: the
    class head takes the label and dynamic-teacher terms, the distillation head the static teacher's psi. Any
    other model's one output plays both roles."""
    return logits if isinstance(logits, tuple) else (logits, logits)
