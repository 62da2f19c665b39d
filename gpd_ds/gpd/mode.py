"""The GPD mode: which of the two networks sharing the wide parameters a forward computes.

One GPD model is two networks: the dynamic teacher (``teacher``: full width) and the student (``student``: the
first ``1/r`` slice of every widened tensor). :meth:`gpd_ds.gpd.model.GPDModel.forward` sets the mode for the
duration of one call (:func:`mode_scope`) and every wide layer reads it (:func:`current_mode`); calling a wide layer
outside such a scope is an error, never a silent default. Like ``torch.autocast``, it is a scoped setting of the
process (the step runs one forward at a time), kept here and changed only through the two context managers.

A pair call (``mode="both"``) also keeps, between its teacher pass and its student pass, the student views taken
in the teacher pass (:func:`pair_scope`, :func:`paired_views`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

STUDENT = "student"
TEACHER = "teacher"
MODES = (STUDENT, TEACHER)


class _ModeState:
    def __init__(self) -> None:
        self.current: str | None = None
        # Inside a pair call (pair_scope): the student views taken in the teacher pass, by (layer, tensor name).
        self.pairs: dict[tuple[nn.Module, str], Tensor] | None = None


_STATE = _ModeState()


@contextlib.contextmanager
def mode_scope(mode: str) -> Iterator[None]:
    """Run the wide layers in ``mode`` inside this block (restored on exit, also on error)."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not a GPD mode; use one of {MODES}")
    previous = _STATE.current
    _STATE.current = mode
    try:
        yield
    finally:
        _STATE.current = previous


@contextlib.contextmanager
def pair_scope(enabled: bool = True) -> Iterator[None]:
    """One teacher pass followed by one student pass over the same wide parameters (``GPDModel`` ``mode="both"``).

    Inside it, the teacher pass takes each wide parameter's teacher and student values from one autograd node
    (:class:`gpd_ds.gpd.layers._PairViews`) and keeps the student value for the student pass. The backward then sums
    the student's gradient into the slice of the teacher's in place, instead of building a zero-padded wide gradient
    per tensor and adding it to the teacher's (four kernels and three wide-tensor passes per tensor, which made the
    GPD step host- and bandwidth-bound on small students). The numbers are the same as without it.
    """
    previous = _STATE.pairs
    _STATE.pairs = {} if enabled and torch.is_grad_enabled() and not torch.compiler.is_compiling() else None
    try:
        yield
    finally:
        _STATE.pairs = previous


def active_mode() -> str | None:
    """The mode of the enclosing :func:`mode_scope`, or None outside one (a plain model's forward)."""
    return _STATE.current


def current_mode() -> str:
    """The mode a wide layer must compute in; an error outside :meth:`GPDModel.forward`."""
    mode = _STATE.current
    if mode is None:
        raise RuntimeError(
            "a GPD wide layer was called outside GPDModel.forward(x, mode=...); call the GPDModel, "
            "not its inner network, so that the mode is explicit"
        )
    return mode


def paired_views() -> dict[tuple[nn.Module, str], Tensor] | None:
    """Inside a pair call with grad, the student views kept by the teacher pass (the student pass pops them);
    None otherwise."""
    return _STATE.pairs


def replicas(width_ratio: int) -> int:
    """How many replicas the current mode's activations hold: ``r`` in teacher mode, 1 in student mode."""
    return width_ratio if current_mode() == TEACHER else 1
