"""fp32 exponential moving average of the whole GPD model (parameters and BatchNorm buffers, both modes')."""

from __future__ import annotations

import copy

import torch
from torch import nn


class ModelEma:
    """``ema = decay * ema + (1 - decay) * live`` after every optimizer step, in fp32 (a 0.99996 EMA in half
    precision stops moving). Integer buffers (batch counters) are copied. Create it after the engine has
    synchronised the weights, so every rank starts from the same model."""

    def __init__(self, model: nn.Module, decay: float, rebind: bool = False) -> None:
        """``rebind``: look the live tensors up at every update (ZeRO-3 swaps a parameter's storage when it
        gathers it; call :meth:`update` inside :func:`gpd_ds.engine.full_parameters`)."""
        self.decay, self.rebind = decay, rebind
        self.module = copy.deepcopy(model).float().eval().requires_grad_(False)
        self._pairs: tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]] | None = None

    def _bind(self, model: nn.Module) -> None:
        live = model.state_dict(keep_vars=True)
        ema = self.module.state_dict(keep_vars=True)
        floats = [k for k, v in live.items() if v.is_floating_point()]
        others = [k for k in live if k not in floats]
        self._pairs = ([ema[k].data for k in floats], [live[k].data for k in floats],
                       [ema[k].data for k in others], [live[k].data for k in others])

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        if self._pairs is None or self.rebind:
            self._bind(model)
        ema_f, live_f, ema_o, live_o = self._pairs
        torch._foreach_lerp_(ema_f, [t.float() for t in live_f], 1.0 - self.decay)
        for e, v in zip(ema_o, live_o, strict=True):
            e.copy_(v)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)
