"""Feature taps: where a network's distillation features are read (the input or the output of a module, by path),
and :func:`recording`, which collects them per GPD mode during a forward (see :mod:`gpd_ds.features` for the taps
of each architecture and the connectors)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gpd_ds.gpd.mode import STUDENT, active_mode

INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True)
class Tap:
    """A feature read at a module: its first ``input`` (a forward pre-hook) or its ``output``, as a ``(B, C, H, W)``
    map whatever the module's layout: a pooled ``(B, C)`` becomes ``(B, C, 1, 1)``; tokens ``(B, N, C)`` drop their
    ``prefix`` (class, distillation, register tokens) and fold the rest into their square grid; with ``nhwc`` a 4-D
    tensor is channels-last (timm's Swin) and is permuted."""

    path: str
    where: str = INPUT
    prefix: int = 0
    nhwc: bool = False

    def to_map(self, t: Tensor) -> Tensor:
        """``t`` as a new ``(B, C, H, W)`` tensor (a copy: timm's activations are in place and would overwrite it)."""
        if t.ndim == 2:
            return t[:, :, None, None]
        if t.ndim == 3:
            tokens = t[:, self.prefix:]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise ValueError(f"tap {self.path!r} gives {tokens.shape[1]} tokens after {self.prefix} prefix "
                                 "tokens, not a square grid: tap a module whose tokens are the image's patches")
            grid = tokens.transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)  # still a view of the tokens
            return grid.clone(memory_format=torch.contiguous_format)
        if self.nhwc:
            return t.permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format)
        return t.clone()


@contextlib.contextmanager
def recording(net: nn.Module, taps: Sequence[Tap]) -> Iterator[dict[str, list[Tensor]]]:
    """Within the block, every forward of ``net`` appends its tap tensors to ``features[mode]`` (the GPD mode the
    forward runs in; ``student`` outside a GPD model), as the ``(B, C, H, W)`` map :meth:`Tap.to_map` makes."""
    features: dict[str, list[Tensor]] = {}

    def keeper(tap: Tap):
        def keep(t: Tensor) -> None:
            features.setdefault(active_mode() or STUDENT, []).append(tap.to_map(t))
        return keep

    handles = []
    for tap in taps:
        module, keep = net.get_submodule(tap.path), keeper(tap)
        if tap.where == INPUT:
            handles.append(module.register_forward_pre_hook(lambda _m, args, keep=keep: keep(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, out, keep=keep: keep(out)))
    try:
        yield features
    finally:
        for h in handles:
            h.remove()
