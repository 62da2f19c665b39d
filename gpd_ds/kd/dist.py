"""DIST (Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022): match the *relations* of
the teacher's predictions instead of their values, with Pearson correlation, which ignores the scale and shift a
stronger teacher's sharper probabilities bring.

With ``Y_s = softmax(z_s / tau)`` and ``Y_t = softmax(z_t / tau)`` (batch x classes)::

    inter = 1 - mean_i rho(Y_s[i, :], Y_t[i, :])      (each sample's prediction over the classes)
    intra = 1 - mean_j rho(Y_s[:, j], Y_t[:, j])      (each class's scores over the batch)
    DIST  = tau^2 * (beta * inter + gamma * intra)

``rho(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + 1e-8)``, the Pearson correlation (the
paper's eq. 5 with the official code's epsilon). Defaults (``loss.dist_beta``, ``loss.dist_gamma``,
``loss.temperature``): beta = gamma = tau = 1, the paper's ImageNet setting. The intra-class term compares columns
over the batch: it depends on the batch a rank sees (per-rank batches, as in the reference's per-GPU loss).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from gpd_ds.losses import GPDLoss

EPS = 1e-8


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Pearson correlation of two (N, D) matrices: (N,)."""
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1) + EPS)


def dist(logits: Tensor, teacher_logits: Tensor, beta: float = 1.0, gamma: float = 1.0,
         temperature: float = 1.0) -> Tensor:
    """DIST of the student's ``logits`` against the (detached) teacher's, in fp32 (see the module docstring)."""
    t = temperature
    y_s = F.softmax(logits.float() / t, dim=1)
    y_t = F.softmax(teacher_logits.detach().float() / t, dim=1)
    inter = 1.0 - pearson(y_s, y_t).mean()
    intra = 1.0 - pearson(y_s.t(), y_t.t()).mean()
    return t * t * (beta * inter + gamma * intra)


def dist_loss(logits: Tensor, static_logits: Tensor, target: Tensor, params: GPDLoss) -> Tensor:
    """loss.kd=dist (a built-in entry of :data:`gpd_ds.registry.KD_LOSSES`): :func:`dist` with loss.dist_beta,
    loss.dist_gamma and loss.temperature."""
    return dist(logits, static_logits, params.dist_beta, params.dist_gamma, params.temperature)
