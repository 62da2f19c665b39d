"""fp32 exponential moving average of the whole GPD model (parameters and BatchNorm buffers, both modes'): whole
(:class:`ModelEma`, ZeRO <= 2) or partitioned like the parameters (:class:`PartitionedEma`, ZeRO-3)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch
from torch import nn


class ModelEma:
    """``ema = decay * ema + (1 - decay) * live`` after every optimizer step, in fp32 (a 0.99996 EMA in half
    precision stops moving). Integer buffers (batch counters) are copied. Create it after the engine has
    synchronised the weights, so every rank starts from the same model."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
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
        if self._pairs is None:
            self._bind(model)
        ema_f, live_f, ema_o, live_o = self._pairs
        torch._foreach_lerp_(ema_f, [t.float() for t in live_f], 1.0 - self.decay)
        for e, v in zip(ema_o, live_o, strict=True):
            e.copy_(v)

    def numel(self) -> int:
        """Elements this rank holds (the whole model's parameters and buffers)."""
        return sum(t.numel() for t in self.module.state_dict().values())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.module.load_state_dict(state, strict=True)


def _persistent_and_gathered(p: torch.Tensor) -> bool:
    """A small ZeRO-3 parameter kept whole on every rank after its first use (``ds_persist``): forwards read its
    full ``data``, not its partition."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return getattr(p, "ds_persist", False) and p.ds_status == ZeroParamStatus.AVAILABLE


class PartitionedEma:
    """The fp32 EMA of a ZeRO-3 model, partitioned like its parameters: each rank averages the partition it holds
    (``param.ds_tensor``), so between steps a rank holds ``1 / ranks`` of the EMA and no step gathers anything.
    Buffers (BatchNorm statistics, not partitioned by ZeRO) are averaged whole, like :class:`ModelEma` does.

    Evaluation runs the engine's own module with the EMA swapped into the partitions (:meth:`applied`): ZeRO-3
    then gathers it layer by layer as it gathers the live weights. Checkpoints keep each rank's partitions in a
    file of its own (:meth:`state_dict`); :func:`consolidate` joins such files into the whole model's EMA (for
    export), and :meth:`load_state_dict` takes this rank's slice of that, so a checkpoint of another world size
    resumes too. Create it after ``deepspeed.initialize`` (the parameters are partitioned by then)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.params = dict(model.named_parameters())
        saved = model.state_dict().keys()  # not the non-persistent buffers
        self.buffers = {n: b for n, b in model.named_buffers() if n in saved}
        with torch.no_grad():
            self.shadow = {n: p.ds_tensor.detach().float().clone() for n, p in self.params.items()}
            self.shadow_buffers = {n: b.detach().clone().float() if b.is_floating_point() else b.detach().clone()
                                   for n, b in self.buffers.items()}

    def _pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema = [*self.shadow.values(), *(b for b in self.shadow_buffers.values() if b.is_floating_point())]
        live = [*(p.ds_tensor for p in self.params.values()),
                *(b for b in self.buffers.values() if b.is_floating_point())]
        return ema, live

    @torch.no_grad()
    def update(self, model: nn.Module | None = None) -> None:
        """``ema = decay * ema + (1 - decay) * live`` on this rank's partitions (``model`` is the one bound)."""
        ema, live = self._pairs()
        torch._foreach_lerp_(ema, [t.float() for t in live], 1.0 - self.decay)
        for name, b in self.buffers.items():
            if not b.is_floating_point():
                self.shadow_buffers[name].copy_(b)

    @contextlib.contextmanager
    def applied(self) -> Iterator[None]:
        """Inside, the bound module computes with the EMA weights (on every rank at once: a parameter ZeRO-3 keeps
        whole is re-gathered from the EMA partitions, a collective)."""
        saved = {}
        with torch.no_grad():
            for name, p in self.params.items():
                saved[name] = (p.ds_tensor.clone(), p.data.clone() if _persistent_and_gathered(p) else None)
                p.ds_tensor.copy_(self.shadow[name])
                if saved[name][1] is not None:
                    p.data.copy_(_gather_partitions(self.shadow[name], p.ds_numel).view(p.ds_shape))
            live_buffers = {n: b.clone() for n, b in self.buffers.items()}
            for name, b in self.buffers.items():
                b.copy_(self.shadow_buffers[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, p in self.params.items():
                    part, whole = saved[name]
                    p.ds_tensor.copy_(part)
                    if _persistent_and_gathered(p) and p.data.numel() == p.ds_numel:
                        # whole now (the EMA's, or gathered from it): the live values. One DeepSpeed released
                        # meanwhile is gathered from the restored partition at its next use.
                        p.data.copy_(whole if whole is not None else _gather_partitions(part, p.ds_numel)
                                     .view(p.ds_shape))
                for name, b in self.buffers.items():
                    b.copy_(live_buffers[name])

    def numel(self) -> int:
        """Elements this rank holds: its partitions (about 1 / ranks of the parameters) and the whole buffers."""
        return sum(t.numel() for t in (*self.shadow.values(), *self.shadow_buffers.values()))

    def shapes(self) -> dict[str, torch.Size]:
        """The whole model's tensor shapes (what :func:`consolidate` rebuilds)."""
        return {**{n: p.ds_shape for n, p in self.params.items()},
                **{n: b.shape for n, b in self.shadow_buffers.items()}}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part: ``param:NAME`` (its partition, flat) and ``buffer:NAME`` (whole)."""
        return {**{f"param:{n}": t for n, t in self.shadow.items()},
                **{f"buffer:{n}": t for n, t in self.shadow_buffers.items()}}

    @torch.no_grad()
    def load_state_dict(self, full: dict[str, torch.Tensor]) -> None:
        """Take this rank's partitions from the whole model's EMA (:func:`consolidate`)."""
        import deepspeed.comm as dist

        rank = dist.get_rank() if dist.is_initialized() else 0
        missing = sorted(set(self.params) - set(full)) + sorted(set(self.buffers) - set(full))
        if missing:
            raise KeyError(f"the saved EMA has no {missing[:5]}")
        for name, p in self.params.items():
            size = p.ds_tensor.numel()
            flat = full[name].reshape(-1).float()
            part = flat[rank * size:(rank + 1) * size]
            self.shadow[name].zero_()
            self.shadow[name][:part.numel()].copy_(part)
        for name, b in self.shadow_buffers.items():
            b.copy_(full[name])


def _gather_partitions(part: torch.Tensor, numel: int) -> torch.Tensor:
    """The whole flat tensor from every rank's equal-size partition (ZeRO-3's layout: rank r holds
    ``[r * size, (r + 1) * size)`` of the flat tensor, padded at the end)."""
    import deepspeed.comm as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    out = part.new_empty(world * part.numel())
    if world > 1:
        dist.all_gather_into_tensor(out, part.contiguous())
    else:
        out.copy_(part)
    return out[:numel]


def consolidate(parts: list[dict[str, torch.Tensor]], shapes: dict[str, torch.Size]) -> dict[str, torch.Tensor]:
    """The whole model's EMA (``name -> tensor`` of ``shapes``) from every rank's :meth:`PartitionedEma.state_dict`,
    in rank order."""
    full = {}
    for name, shape in shapes.items():
        if f"buffer:{name}" in parts[0]:
            full[name] = parts[0][f"buffer:{name}"]
            continue
        flat = torch.cat([p[f"param:{name}"] for p in parts])
        full[name] = flat[:shape.numel()].view(shape).clone()
    return full
