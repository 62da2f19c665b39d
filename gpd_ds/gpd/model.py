"""GPDModel: the one trainable module (dynamic teacher + student as its slice)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from gpd_ds.gpd.layers import TensorSpec, WideModule, _grouped, student_view
from gpd_ds.gpd.mode import STUDENT, TEACHER, mode_scope, pair_scope
from gpd_ds.gpd.taps import recording

BOTH = "both"


class GPDOutput(NamedTuple):
    """Logits of both modes from one call: ``teacher`` (dynamic teacher) and ``student``; with ``features=True``
    also each mode's connector outputs (feature distillation, :mod:`gpd_ds.features`)."""

    teacher: Tensor
    student: Tensor
    teacher_features: list[Tensor] | None = None
    student_features: list[Tensor] | None = None


class _Detached:
    """Holds the plain source student outside the module tree.

    Not a parameter, not moved by ``.to()``, not in ``state_dict``, and shared (not copied) by
    ``deepcopy`` (e.g. for an EMA): it is only a template of the student's class and configuration.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __deepcopy__(self, memo: dict) -> _Detached:
        return self


class GPDModel(nn.Module):
    """The dynamic teacher, whose first ``1/r`` slice is the student.

    ``model(x, mode="teacher")`` runs the dynamic teacher, ``mode="student"`` the student view of
    the same tensors, ``mode="both"`` runs the teacher, then the student, and returns a
    :class:`GPDOutput`. The mode is scoped to the call; nothing else changes state between modes
    except each mode's own BatchNorm running statistics.
    """

    def __init__(self, net: nn.Module, *, width_ratio: int, in_chans: int, num_classes: int, source: nn.Module,
                 raw_parameters: list[tuple[str, str, TensorSpec]], branches: bool, pretrained_student: bool) -> None:
        super().__init__()
        self.net = net
        self.width_ratio, self.in_chans, self.num_classes = width_ratio, in_chans, num_classes
        self.branches, self.pretrained_student = branches, pretrained_student
        self.raw_parameters = tuple(raw_parameters)
        self._source = _Detached(source)
        # mode="both" hands the student pass the student views taken with the teacher's (pair_scope): the same
        # numbers as separate views, with a cheaper backward. False only to measure or test the difference.
        self.paired_views = True
        self.channel_sites: tuple[str, ...] = ()  # channel concat/split run replica-aware (gpd.functional)
        self.taps: tuple = ()
        self.connectors: nn.ModuleDict | None = None

    def attach_connectors(self, taps: tuple, connectors: nn.ModuleDict) -> None:
        """Feature distillation: read ``taps`` (:class:`~gpd_ds.gpd.taps.Tap`, module paths of the student, which
        the dynamic teacher keeps) and map them through ``connectors["teacher"]`` / ``["student"]``. They become
        part of this module (trained, checkpointed, averaged); :func:`~gpd_ds.gpd.extract` ignores them."""
        self.taps, self.connectors = tuple(taps), connectors

    @property
    def student_is_source(self) -> bool:
        """Whether the student view starts as the source student's exact function (not with a branch mix)."""
        return not self.branches or self.pretrained_student

    @property
    def source(self) -> nn.Module:
        """The plain student as given to ``expand`` (its class and configuration are the export target)."""
        return self._source.module

    def forward(self, x: Tensor, mode: str, features: bool = False) -> Tensor | GPDOutput:
        """``features=True`` (with ``mode="both"`` and connectors attached) adds the connector outputs."""
        if features:
            return self._run_with_features(x, mode)
        if mode == BOTH:
            with pair_scope(enabled=self.paired_views and not self._partitioned()):
                return GPDOutput(teacher=self._run(x, TEACHER), student=self._run(x, STUDENT))
        if mode not in (STUDENT, TEACHER):
            raise ValueError(f"mode={mode!r} is not a GPD mode; use 'student', 'teacher' or 'both'")
        return self._run(x, mode)

    def _run_with_features(self, x: Tensor, mode: str) -> GPDOutput:

        if mode != BOTH or self.connectors is None:
            raise ValueError("features=True needs mode='both' and connectors (attach_connectors)")
        with recording(self.net, self.taps) as found:
            out = self.forward(x, BOTH)
        return out._replace(teacher_features=self.connectors["teacher"](found[TEACHER]),
                            student_features=self.connectors["student"](found[STUDENT]))

    def _partitioned(self) -> bool:
        """Whether ZeRO-3 partitions the parameters (it tags them with ``ds_id``). It frees each layer's gathered
        tensors after the layer's forward, so the teacher pass cannot hand the student pass a view of them: each
        mode then takes its own view (:func:`~gpd_ds.gpd.layers.pair_scope` off)."""
        first = next(self.parameters(), None)
        return first is not None and hasattr(first, "ds_id")

    def _run(self, x: Tensor, mode: str) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"GPDModel input must be (batch, {self.in_chans}, height, width) images; got shape "
                             f"{tuple(x.shape)}")
        with mode_scope(mode):
            return self.net(x)

    def raw_student_tensor(self, path: str, name: str, spec: TensorSpec) -> Tensor:
        """Student value of a raw (parametrized) container parameter."""
        wide = self.net.get_submodule(path).parametrizations[name].original
        return student_view(wide, spec, self.width_ratio)

    def num_parameters(self, mode: str) -> int:
        """Trainable elements of the dynamic teacher (``teacher``) or of the student view (``student``); connectors
        (feature distillation) are not counted."""
        if mode == TEACHER:
            return sum(p.numel() for p in self.net.parameters())
        total = 0
        for m in self.net.modules():
            if isinstance(m, WideModule):
                total += sum(m.student_tensor(n).numel() for n in m.specs if isinstance(getattr(m, n), nn.Parameter))
        return total + sum(self.raw_student_tensor(*raw).numel() for raw in self.raw_parameters)

    @torch.no_grad()
    def replica_divergence(self, gathered: Callable[[list[Tensor]], contextlib.AbstractContextManager] | None = None
                           ) -> float:
        """How far the dynamic teacher has grown beyond a tiled student, one number: every wide tensor split into
        its replicas (``r**k`` blocks for ``k`` widened dimensions; IR makes them equal up to the noise),
        ``sqrt(sum ||block - mean||^2 / sum ||mean||^2)`` over all blocks of all wide tensors. ~``noise_std`` at
        IR, and it grows as the replicas learn different features. Needs the full tensors: under ZeRO-3 pass
        ``gathered`` (e.g. ``deepspeed.zero.GatheredParameters``; then call it on every rank), which makes one
        tensor at a time whole."""
        spread, base = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        for tensor, spec in self._wide_tensors():
            with gathered([tensor]) if gathered else contextlib.nullcontext():
                blocks = _replica_blocks(tensor.detach().double(), spec, self.width_ratio)
            mean = blocks.mean(0)
            spread += (blocks - mean).pow(2).sum().cpu()
            base += mean.pow(2).sum().cpu() * blocks.shape[0]
        return float((spread / base).sqrt()) if base > 0 else 0.0

    def _wide_tensors(self):
        for m in self.net.modules():
            if isinstance(m, WideModule):
                for name, spec in m.specs.items():
                    tensor = getattr(m, name)
                    if isinstance(tensor, nn.Parameter) and spec.dims:
                        yield tensor, spec
        for path, name, spec in self.raw_parameters:
            if spec.dims:
                yield self.net.get_submodule(path).parametrizations[name].original, spec

    def extra_repr(self) -> str:
        return (f"width_ratio={self.width_ratio}, source={type(self.source).__name__}, "
                f"branches={self.branches}")


def _replica_blocks(t: Tensor, spec: TensorSpec, r: int) -> Tensor:
    """A wide tensor as (replicas, elements): each widened dimension split into (r, width), the r-axes first."""
    t, dims = _grouped(t, spec)
    for d in sorted(dims, reverse=True):  # highest first, so the lower dimensions keep their index
        t = t.unflatten(d, (r, t.shape[d] // r))
    axes = [d + sum(e < d for e in dims) for d in dims]  # where each r-axis ended up
    return t.movedim(axes, list(range(len(axes)))).reshape(r ** len(dims), -1)
