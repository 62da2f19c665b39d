"""Logit standardisation (Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024): before a logit
KD loss, each sample's logits of the student and of the teacher are z-scored,

    Z(z) = (z - mean(z)) / std(z)          (over the classes; std with Bessel's correction, as the authors' code)

so the student matches the teacher's logit *relations* and keeps its own logit range (the paper: a shared
temperature forces the student's logits to the teacher's range). The temperature then divides the standardised
logits (the paper's ``tau`` as a base temperature). ``loss.logit_standardize=true`` applies it before any logit KD
loss (kl, dkd, dist, a registered one); the authors pair it with a larger KD weight (e.g. 9 for KD on CIFAR-100).
The 1e-7 added to std guards a constant logit vector (the authors' code adds the same).
"""

from __future__ import annotations

from torch import Tensor

EPS = 1e-7


def standardize(logits: Tensor) -> Tensor:
    """Each row z-scored over the last dimension (classes), in fp32."""
    z = logits.float()
    return (z - z.mean(dim=-1, keepdim=True)) / (z.std(dim=-1, keepdim=True) + EPS)
