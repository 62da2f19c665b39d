"""Feature taps: where a network's distillation features are read (the input or the output of a module, by path),
and :func:`recording`, which collects them per GPD mode during a forward (see :mod:`gpd_ds.features` for the taps
of each architecture and the connectors)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from gpd_ds.gpd.mode import STUDENT, active_mode

INPUT, OUTPUT = "input", "output"


@dataclass(frozen=True)
class Tap:
    """A feature read at a module: its first ``input`` (a forward pre-hook) or its ``output``."""

    path: str
    where: str = INPUT


@contextlib.contextmanager
def recording(net: nn.Module, taps: Sequence[Tap]) -> Iterator[dict[str, list[Tensor]]]:
    """Within the block, every forward of ``net`` appends its tap tensors to ``features[mode]`` (the GPD mode the
    forward runs in; ``student`` outside a GPD model). Tensors are cloned (timm's activations are in place and
    would overwrite a stage output) and 2-D ones (a pooled feature) made ``(B, C, 1, 1)``."""
    features: dict[str, list[Tensor]] = {}

    def keep(t: Tensor) -> None:
        features.setdefault(active_mode() or STUDENT, []).append(t.clone() if t.ndim > 2 else t[:, :, None, None])

    handles = []
    for tap in taps:
        module = net.get_submodule(tap.path)
        if tap.where == INPUT:
            handles.append(module.register_forward_pre_hook(lambda _m, args: keep(args[0])))
        else:
            handles.append(module.register_forward_hook(lambda _m, _args, out: keep(out)))
    try:
        yield features
    finally:
        for h in handles:
            h.remove()
