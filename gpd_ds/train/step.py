"""The step: one micro-step of training (forwards, the loss, one backward, ``engine.step``) and what watches it.

Per micro-step: the static teacher's forward (no grad, outside the engine), both GPD modes through the engine (one
``mode="both"`` call), :class:`~gpd_ds.losses.GPDLoss`, one ``engine.backward`` of the summed loss and
``engine.step`` (which updates the weights at the end of a gradient-accumulation cycle).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from pathlib import Path

import torch

from gpd_ds.config import LossConfig
from gpd_ds.losses import Features, GPDLoss, LossOutput
from gpd_ds.models.teacher import StaticTeacher

Autocast = Callable[[], contextlib.AbstractContextManager]


class NonFiniteLossError(RuntimeError):
    """The loss stopped being a finite number."""


def train_step(engine, x: torch.Tensor, y: torch.Tensor, static_teacher: StaticTeacher | None, loss_fn: GPDLoss,
               gpd: bool, autocast: Autocast, static_taps: tuple = (), kd_scale: float = 1.0) -> LossOutput:
    """One micro-step: forwards, one backward of the summed loss, ``engine.step``. With ``static_taps`` (feature
    distillation) the same forwards also give the static teacher's features and the trained module's connector
    outputs."""
    static_logits, static_features = None, None
    if static_teacher is not None:
        with autocast():
            static_logits = static_teacher(x, static_taps)
        if static_taps:
            static_logits, static_features = static_logits
    if gpd:
        out = engine(x, mode="both", features=bool(static_taps))
        features = Features(out.student_features, out.teacher_features, static_features) if static_taps else None
        loss = loss_fn(out.student, out.teacher, y, static_logits, features=features, kd_scale=kd_scale)
    elif static_taps:
        logits, connected = engine(x, features=True)
        loss = loss_fn.plain(logits, y, static_logits, features=Features(connected, None, static_features),
                             kd_scale=kd_scale)
    else:
        loss = loss_fn.plain(engine(x), y, static_logits, kd_scale=kd_scale)
    engine.backward(loss.total)
    engine.step()
    return loss


def kd_warmup(loss: LossConfig, epoch: int) -> float:
    """The static-teacher terms' warm-up factor in (0-based) ``epoch``: ``min((epoch + 1) / kd_warmup_epochs, 1)``,
    as mdistiller counts epochs from 1; 1 without warm-up."""
    w = loss.kd_warmup_epochs
    return min((epoch + 1) / w, 1.0) if w > 0 else 1.0


def autocast_fn(device: torch.device, dtype: torch.dtype | None) -> Autocast:
    """A factory of the step's autocast context (a no-op context in float32)."""
    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)
    return autocast


class NonFiniteWatch:
    """Counts consecutive non-finite losses on the device, so there is no host sync per step. ``check()`` (at log
    intervals, before every checkpoint and evaluation) raises with the first offending step and its loss terms."""

    def __init__(self, limit: int, device: torch.device) -> None:
        self.limit = limit
        self.run = torch.zeros((), dtype=torch.int64, device=device)
        self.first_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.terms: torch.Tensor | None = None
        self.names: list[str] = []

    def update(self, loss: LossOutput, step: int) -> None:
        values = torch.stack([loss.total.detach().float(), *(v.detach().float() for v in loss.terms.values())])
        if self.terms is None:
            self.names, self.terms = ["total", *loss.terms], torch.zeros_like(values)
        bad = ~torch.isfinite(values[0])
        self.run = torch.where(bad, self.run + 1, torch.zeros_like(self.run))
        trigger = (self.run > self.limit) & (self.first_step < 0)
        self.first_step = torch.where(trigger, torch.full_like(self.first_step, step), self.first_step)
        self.terms = torch.where(trigger, values, self.terms)

    def check(self, where: Path) -> None:
        step = int(self.first_step.item())
        if step >= 0:
            terms = dict(zip(self.names, self.terms.tolist(), strict=True))
            raise NonFiniteLossError(f"non-finite loss at step {step} (more than {self.limit} in a row): {terms}; "
                                     f"the last good checkpoint is in {where}")
