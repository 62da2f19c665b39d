"""GPD losses: CE, label-smoothed soft CE (SCE), KL knowledge distillation, DKD, and GPDLoss (which adds a feature
loss of :data:`gpd_ds.registry.FEATURE_LOSSES`: ReviewKD's HCL, FitNets' hints).

All losses are computed in fp32 whatever the logits' dtype. Targets may be class indices ``(B,)``
or soft/mixed distributions ``(B, K)`` (mixup/cutmix); DKD then uses the argmax as the class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from gpd_ds.config import DYNAMIC_LOSSES, LossConfig, split_kd
from gpd_ds.kd.standardize import standardize
from gpd_ds.registry import FEATURE_LOSSES, KD_LOSSES

Logits = Tensor | tuple[Tensor, Tensor]  # a DeiT distilled model in distilled training: (class, distillation) heads



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
    tckd = F.kl_div(_log_binary(s, gt), _log_binary(z, gt), reduction="sum", log_target=True)
    log_q_s = F.log_softmax(s - 1000.0 * gt, dim=1)
    q_t = F.softmax(z - 1000.0 * gt, dim=1)
    nckd = F.kl_div(log_q_s, q_t, reduction="sum")
    return (alpha * tckd + beta * nckd) * t * t / s.shape[0]


def dkd_loss(logits: Tensor, static_logits: Tensor, target: Tensor, params: GPDLoss) -> Tensor:
    """loss.kd=dkd (registered in :data:`gpd_ds.registry.KD_LOSSES`): :func:`dkd` with loss.dkd_alpha,
    loss.dkd_beta and loss.temperature."""
    return dkd(logits, static_logits, target, params.dkd_alpha, params.dkd_beta, params.temperature)


def kl_loss(logits: Tensor, static_logits: Tensor, target: Tensor, params: GPDLoss) -> Tensor:
    """loss.kd=kl (registered in :data:`gpd_ds.registry.KD_LOSSES`): :func:`kl_kd` at loss.temperature."""
    return kl_kd(logits, static_logits, params.temperature)


def _log_binary(x: Tensor, gt: Tensor) -> Tensor:
    """``log [p_target, 1 - p_target]`` of ``softmax(x)``, both from log-sum-exps. ``1 - p_target`` in fp32 cancels
    once the target dominates (a margin of ~17 at K = 1000) and is 0 from ~25 on: the loss, and the gradient at the
    target logit, would then be wrong or exactly 0 where they are not."""
    log_z = torch.logsumexp(x, dim=1, keepdim=True)
    log_target = (x * gt).sum(dim=1, keepdim=True) - log_z
    log_rest = torch.logsumexp(x.masked_fill(gt, float("-inf")), dim=1, keepdim=True) - log_z
    return torch.cat([log_target, log_rest], dim=1)


class LossOutput(NamedTuple):
    total: Tensor
    terms: dict[str, Tensor]


class Features(NamedTuple):
    """Feature-distillation inputs of one step: the connector outputs of the student and of the dynamic teacher
    (None without GPD), and the static teacher's features they are compared with (targets)."""

    student: list[Tensor]
    dynamic_teacher: list[Tensor] | None
    static_teacher: list[Tensor]


def dynamic_to_student(kind: str, logits: Tensor, teacher_logits: Tensor, smoothing: float) -> Tensor:
    """The student's term from the detached dynamic teacher: ``sce`` (CE against the label-smoothed softmax, the
    reference's ``--kd_loss_type sce``), ``ce`` (no smoothing), or ``mse`` / ``l1`` between the logits (mean)."""
    target = teacher_logits.detach().float()
    if kind == "sce":
        return soft_cross_entropy(logits, target, smoothing)
    if kind == "ce":
        return soft_cross_entropy(logits, target, 0.0)
    if kind == "mse":
        return F.mse_loss(logits.float(), target)
    if kind == "l1":
        return F.l1_loss(logits.float(), target)
    raise ValueError(f"dynamic_loss={kind!r} is unknown; use one of {DYNAMIC_LOSSES}")


@dataclass(frozen=True)
class GPDLoss:
    """The GPD objective (gpd_method.md 1.2; ReviewKD: reviewkd_rvt.md 1.1)::

        L = ce_weight * [CE(z_T, y) + CE(z_S, y)]
          + w * kd_weight * [psi(z_T; z_static) + psi(z_S; z_static)]              (with a static teacher)
          + w * feature_weight * [phi(A_T(F_T), F_static) + phi(A_S(F_S), F_static)]   (feature distillation)
          + dynamic_weight * SCE(z_S, softmax(sg(z_T)))

    ``psi`` is a registered KD loss (:data:`gpd_ds.registry.KD_LOSSES`: DKD by default, Hinton KL) or nothing;
    ``phi`` a registered feature loss (:data:`gpd_ds.registry.FEATURE_LOSSES`: ReviewKD's HCL, FitNets' hints) of
    each mode's connector outputs, or nothing; ``w`` is the warm-up factor
    (``kd_scale``, 1 without warm-up). ``kd_dynamic_teacher=False`` drops the dynamic teacher's static-teacher
    terms (the reference's ``--deactive_kd_static_teacher``). Terms are returned by name, unweighted:
    ``ce_student``, ``ce_dynamic_teacher``, ``kd_static_to_student``, ``kd_static_to_dynamic_teacher``,
    ``reviewkd_static_to_student``, ``reviewkd_static_to_dynamic_teacher`` (named after ``features``),
    ``sce_dynamic_to_student`` (named after ``dynamic_loss``); the weighted sum is ``total``.
    """

    ce_weight: float = 1.0
    kd_weight: float = 1.0
    dynamic_weight: float = 3.0
    smoothing: float = 0.1
    kd: str = "dkd"
    dkd_alpha: float = 1.0
    dkd_beta: float = 0.5
    temperature: float = 1.0
    dynamic_loss: str = "sce"
    kd_dynamic_teacher: bool = True
    features: str = "none"
    feature_weight: float = 1.0
    dist_beta: float = 1.0
    dist_gamma: float = 1.0
    logit_standardize: bool = False

    def __post_init__(self) -> None:
        if self.kd != "none" and self.kd not in KD_LOSSES:
            raise ValueError(f"GPDLoss kd={self.kd!r} is unknown; {KD_LOSSES.choices(('none',))}")
        if self.features != "none" and self.features not in FEATURE_LOSSES:
            raise ValueError(f"GPDLoss features={self.features!r} is unknown; {FEATURE_LOSSES.choices(('none',))}")
        if self.dynamic_loss not in DYNAMIC_LOSSES:
            raise ValueError(f"GPDLoss dynamic_loss={self.dynamic_loss!r} is unknown; use one of {DYNAMIC_LOSSES}")
        if not 0.0 <= self.smoothing < 1.0:
            raise ValueError(f"GPDLoss smoothing={self.smoothing!r} must be in [0, 1)")
        if not self.temperature > 0:
            raise ValueError(f"GPDLoss temperature={self.temperature!r} must be > 0")

    @classmethod
    def from_config(cls, c: LossConfig) -> GPDLoss:
        """The run's objective from its ``loss`` section."""
        kd, features = split_kd(c.kd) or (c.kd, "none")  # an unknown name is refused by __post_init__
        return cls(ce_weight=c.ce_weight, kd_weight=c.kd_weight, dynamic_weight=c.dynamic_weight,
                   smoothing=c.smoothing, kd=kd, dkd_alpha=c.dkd_alpha, dkd_beta=c.dkd_beta,
                   temperature=c.temperature, dynamic_loss=c.dynamic_loss, kd_dynamic_teacher=c.kd_dynamic_teacher,
                   features=features, feature_weight=_feature_weight(c, features), dist_beta=c.dist_beta,
                   dist_gamma=c.dist_gamma, logit_standardize=c.logit_standardize)

    def static_kd(self, logits: Tensor, static_logits: Tensor, target: Tensor) -> Tensor:
        """psi(logits; static_logits): the registered KD loss ``kd``, on standardised logits with
        ``logit_standardize`` (:mod:`gpd_ds.kd.standardize`)."""
        if self.logit_standardize:
            logits, static_logits = standardize(logits), standardize(static_logits.detach())
        return KD_LOSSES.get(self.kd)(logits, static_logits, target, self)

    def _static_terms(self, who: str, logits: Tensor, connected: list[Tensor] | None, static_logits: Tensor | None,
                      static_features: list[Tensor] | None, target: Tensor, terms: dict[str, Tensor],
                      kd_scale: float) -> Tensor:
        """``who``'s static-teacher terms (added to ``terms``), weighted and summed."""
        total = logits.new_zeros((), dtype=torch.float32)
        if static_logits is not None and self.kd != "none":
            terms[f"kd_static_to_{who}"] = self.static_kd(logits, static_logits, target)
            total = total + kd_scale * self.kd_weight * terms[f"kd_static_to_{who}"]
        if self.features != "none":
            if connected is None or static_features is None:
                raise ValueError(f"GPDLoss features={self.features!r} needs the connector outputs of the {who} and "
                                 "the static teacher's features")
            name = f"{self.features}_static_to_{who}"
            terms[name] = FEATURE_LOSSES.get(self.features).loss(_on_grids(connected, static_features),
                                                                 static_features)
            total = total + kd_scale * self.feature_weight * terms[name]
        return total

    def plain(self, student: Logits, target: Tensor, static_teacher: Tensor | None = None, *,
              features: Features | None = None, kd_scale: float = 1.0) -> LossOutput:
        """The objective without a dynamic teacher (baselines, teacher training): CE, plus the static-teacher terms
        if a static teacher is given: ``ce_weight * CE(z_S, y) + w * kd_weight * psi(z_S; z_static)`` (+ the
        feature term)."""
        s_cls, s_dist = _heads(student)
        terms = {"ce_student": cross_entropy(s_cls, target)}
        total = self.ce_weight * terms["ce_student"]
        if static_teacher is not None:
            total = total + self._static_terms(
                "student", s_dist, features.student if features else None, static_teacher,
                features.static_teacher if features else None, target, terms, kd_scale)
        return LossOutput(total, terms)

    def __call__(self, student: Logits, dynamic_teacher: Logits, target: Tensor,
                 static_teacher: Tensor | None = None, *, features: Features | None = None,
                 kd_scale: float = 1.0) -> LossOutput:
        (s_cls, s_dist), (t_cls, t_dist) = _heads(student), _heads(dynamic_teacher)
        dynamic_name = f"{self.dynamic_loss}_dynamic_to_student"
        terms = {
            "ce_student": cross_entropy(s_cls, target),
            "ce_dynamic_teacher": cross_entropy(t_cls, target),
            dynamic_name: dynamic_to_student(self.dynamic_loss, s_cls, t_cls, self.smoothing),
        }
        total = self.ce_weight * (terms["ce_student"] + terms["ce_dynamic_teacher"])
        total = total + self.dynamic_weight * terms[dynamic_name]
        if static_teacher is not None:
            static_features = features.static_teacher if features else None
            total = total + self._static_terms("student", s_dist, features.student if features else None,
                                               static_teacher, static_features, target, terms, kd_scale)
            if self.kd_dynamic_teacher:
                total = total + self._static_terms(
                    "dynamic_teacher", t_dist, features.dynamic_teacher if features else None, static_teacher,
                    static_features, target, terms, kd_scale)
        return LossOutput(total, terms)


def _feature_weight(c: LossConfig, features: str) -> float:
    """The weight of the feature term: the ``loss.*`` setting its feature loss names (``reviewkd_weight`` ...)."""
    return 1.0 if features not in FEATURE_LOSSES else float(getattr(c, FEATURE_LOSSES.get(features).weight_key))


def _on_grids(connected: list[Tensor], static_features: list[Tensor]) -> list[Tensor]:
    """Each connector output on its static-teacher level's grid: average-pooled down (a student's 8 x 8 tokens
    against a CNN's 4 x 4 stage) or bilinearly resized up; unchanged where the grids agree (every same-family pair)."""
    out = []
    for f, t in zip(connected, static_features, strict=True):
        if f.ndim == 4 and t.ndim == 4 and f.shape[-2:] != t.shape[-2:]:
            larger = f.shape[-2] >= t.shape[-2] and f.shape[-1] >= t.shape[-1]
            f = F.adaptive_avg_pool2d(f, t.shape[-2:]) if larger else \
                F.interpolate(f, size=t.shape[-2:], mode="bilinear", align_corners=False)
        out.append(f)
    return out


def _heads(logits: Logits) -> tuple[Tensor, Tensor]:
    """(class-head, distillation-head) logits. A DeiT distilled model in distilled training returns both: the
    class head takes the label and dynamic-teacher terms, the distillation head the static teacher's psi. Any
    other model's one output plays both roles."""
    return logits if isinstance(logits, tuple) else (logits, logits)
