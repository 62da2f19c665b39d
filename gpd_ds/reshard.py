"""Re-shard a ZeRO checkpoint's optimizer state for another number of ranks (elastic resume).

DeepSpeed loads ZeRO optimizer partitions only into the world size that wrote them. Its route across a change of
world size, universal checkpoints (``ds_to_universal`` + ``checkpoint.load_universal``), converts Adam-family states
only: it reads ``exp_avg``/``exp_avg_sq`` of every parameter, so an SGD checkpoint (the CNN recipes'
``momentum_buffer``) stops it with ``KeyError: 'exp_avg'`` (DeepSpeed 0.19.8). So gpd_ds re-shards itself, for any
``torch.optim`` optimizer and ZeRO-1, 2 and 3:

1. every rank reads the old ranks' optimizer files (under :func:`gpd_ds.safeload.safe_loading`) and rebuilds each
   parameter's full fp32 master weight and each per-element optimizer tensor, following DeepSpeed's layouts (the
   ones its own ``zero_to_fp32`` reads): ZeRO-1/2 flatten a parameter group and cut it into equal rank
   partitions (padding at the end); ZeRO-3 cuts every parameter into ``ceil(numel / ranks)`` pieces and each
   rank concatenates its pieces;
2. every rank writes its partition of the new layout into the engine's fp32 master partitions and into the base
   optimizer's state (scalar state such as Adam's ``step`` is copied);
3. the result is checked: every parameter's full fp32 master weight, as DeepSpeed itself assembles it
   (``safe_get_full_fp32_param``), must equal the checkpoint's bit for bit, or the resume stops.

Memory: each rank holds the full fp32 weights and optimizer tensors once while it re-shards.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpd_ds.errors import UserInputError
from gpd_ds.safeload import load_file

log = logging.getLogger(__name__)

class ReshardError(UserInputError, RuntimeError):
    """The checkpoint's optimizer state cannot be re-sharded for this run (the resume stops: never a silent restart
    of the optimizer)."""


MASTER = "fp32"  # the key of the fp32 master weights next to the optimizer's own state keys
_OPTIM_FILE = re.compile(r"^(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt$")


@dataclass
class FullState:
    """A checkpoint's optimizer state as full tensors: per parameter (in the optimizer's order) its fp32 master
    weight and its per-element optimizer tensors, flattened; plus the state that is not per element."""

    groups: list[dict[str, torch.Size]]  # DeepSpeed's param_shapes: per parameter group, name -> shape
    tensors: dict[str, list[torch.Tensor]]  # MASTER and each optimizer key -> one flat tensor per parameter
    scalars: dict[str, Any]  # e.g. Adam's step

    @property
    def shapes(self) -> list[torch.Size]:
        return [shape for group in self.groups for shape in group.values()]


def optimizer_files(path: Path) -> list[Path]:
    """The checkpoint's ZeRO optimizer files in rank order."""
    found = {int(m.group(1)): f for f in path.iterdir() if (m := _OPTIM_FILE.match(f.name))}
    if sorted(found) != list(range(len(found))) or not found:
        raise ReshardError(f"checkpoint {path} lacks ZeRO optimizer files (ranks found: {sorted(found)})")
    return [found[r] for r in range(len(found))]


def _param_shapes(path: Path) -> list[dict[str, torch.Size]]:
    model_file = next((f for f in (path / "mp_rank_00_model_states.pt",
                                   path / "zero_pp_rank_0_mp_rank_00_model_states.pt") if f.is_file()), None)
    if model_file is None:
        raise ReshardError(f"checkpoint {path} lacks its model states file (mp_rank_00_model_states.pt)")
    return [dict(group) for group in load_file(model_file)["param_shapes"]]


def _split(flat: torch.Tensor, shapes: list[torch.Size]) -> list[torch.Tensor]:
    return list(torch.split(flat, [s.numel() for s in shapes]))


def read_full_state(path: Path) -> FullState:
    """The optimizer state of checkpoint ``path`` (any ZeRO stage, any world size) as full tensors."""
    groups = _param_shapes(path)
    shapes = [s for g in groups for s in g.values()]
    sds = [load_file(f)["optimizer_state_dict"] for f in optimizer_files(path)]
    if "fp32_flat_groups" in sds[0]:
        tensors, scalars = _read_zero3(sds, shapes)
    else:
        tensors, scalars = _read_zero12(sds, groups)
    return FullState(groups, tensors, scalars)


def _per_element(state: dict, like: torch.Tensor) -> list[str]:
    return [k for k, v in state.items() if torch.is_tensor(v) and v.shape == like.shape]


def _read_zero12(sds: list[dict], groups: list[dict[str, torch.Size]]
                 ) -> tuple[dict[str, list[torch.Tensor]], dict[str, Any]]:
    tensors: dict[str, list[torch.Tensor]] = {}
    scalars: dict[str, Any] = {}
    for g, group in enumerate(groups):
        if any(any((sd.get("param_alignment_paddings") or [[0]] * len(groups))[g]) for sd in sds):
            raise ReshardError("the checkpoint's ZeRO parameter groups are padded per parameter "
                                  "(zero_optimization.parameter_alignment); gpd_ds re-shards unpadded groups only")
        shapes, numel = list(group.values()), sum(s.numel() for s in group.values())
        parts = [sd["single_partition_of_fp32_groups"][g] for sd in sds]
        states = [sd["base_optimizer_state"]["state"][g] for sd in sds]
        keys = _per_element(states[0], parts[0])
        flats = {MASTER: parts, **{k: [s[k] for s in states] for k in keys}}
        for key, pieces in flats.items():
            tensors.setdefault(key, []).extend(_split(torch.cat(pieces)[:numel].float(), shapes))
        scalars.update({k: v for k, v in states[0].items() if k not in keys})
    return tensors, scalars


def _read_zero3(sds: list[dict], shapes: list[torch.Size]) -> tuple[dict[str, list[torch.Tensor]], dict[str, Any]]:
    world = len(sds)
    flats = {MASTER: [torch.cat(sd["fp32_flat_groups"]) for sd in sds]}
    sub_states = [sd["optimizer_state_dict"]["state"] for sd in sds]
    keys = _per_element(sub_states[0][0], sds[0]["fp32_flat_groups"][0])
    for key in keys:
        flats[key] = [torch.cat([s[i][key] for i in sorted(s)]) for s in sub_states]
    tensors: dict[str, list[torch.Tensor]] = {key: [] for key in flats}
    offset = 0
    for shape in shapes:
        n = shape.numel()
        piece = math.ceil(n / world)
        for key, per_rank in flats.items():
            tensors[key].append(torch.cat([f[offset:offset + piece] for f in per_rank])[:n].float())
        offset += piece
    if offset != flats[MASTER][0].numel():
        raise ReshardError(f"the ZeRO-3 partitions hold {flats[MASTER][0].numel()} elements per rank where the "
                              f"parameters need {offset}")
    return tensors, {k: v for k, v in sub_states[0][0].items() if k not in keys}


def _slice(full: torch.Tensor, rank: int, size: int, world: int) -> torch.Tensor:
    padded = torch.zeros(size * world, dtype=full.dtype)
    padded[:full.numel()] = full
    return padded[rank * size:(rank + 1) * size]


def load_into(engine, state: FullState, rank: int, world: int) -> list[str]:
    """Write this rank's partitions of ``state`` into ``engine``'s ZeRO optimizer; returns the keys written."""
    new_groups = [dict(g) for g in engine._get_zero_param_shapes()]
    if [list(g.items()) for g in new_groups] != [list(g.items()) for g in state.groups]:
        raise ReshardError("the checkpoint's optimizer parameter groups differ from this run's (another model, "
                              "or other weight-decay groups); resume with the checkpoint's config")
    opt = engine.optimizer
    if _is_zero3(opt):
        _write_zero3(opt, state, rank, world)
    else:
        _write_zero12(opt, state, rank, world)
    return list(state.tensors)


def _is_zero3(opt) -> bool:
    """ZeRO-3's optimizer (partitions per parameter) rather than ZeRO-1/2's (flat groups)."""
    return hasattr(opt, "fp32_partitioned_groups_flat")


def _optimizer_state(state: FullState, part: torch.Tensor, pieces: dict[str, torch.Tensor]) -> dict[str, Any]:
    moved = {k: v.to(part.device, part.dtype) for k, v in pieces.items() if k != MASTER}
    return {**moved, **state.scalars}


def _write_zero12(opt, state: FullState, rank: int, world: int) -> None:
    first = 0
    for g, part in enumerate(opt.single_partition_of_fp32_groups):
        count = len(state.groups[g])
        pieces = {key: _slice(torch.cat(full[first:first + count]), rank, part.numel(), world)
                  for key, full in state.tensors.items()}
        first += count
        part.data.copy_(pieces[MASTER])
        opt.optimizer.state[part] = _optimizer_state(state, part, pieces)
    # DeepSpeed's per-parameter views of the new partitions and state tensors, as its own load makes them
    opt._link_all_hp_params()
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def _write_zero3(opt, state: FullState, rank: int, world: int) -> None:
    index = 0
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
        pieces: dict[str, list[torch.Tensor]] = {key: [] for key in state.tensors}
        for param in opt.fp16_groups[i]:
            size = param.partition_numel()
            for key, full in state.tensors.items():
                pieces[key].append(_slice(full[index], rank, size, world))
            index += 1
        joined = {key: torch.cat(p) for key, p in pieces.items()}
        if joined[MASTER].numel() != flat.numel():
            raise ReshardError(f"ZeRO-3 sub-group {i} holds {flat.numel()} elements on this rank, its parameters' "
                                  f"partitions {joined[MASTER].numel()}")
        flat.data.copy_(joined[MASTER])
        opt.optimizer.state[flat] = _optimizer_state(state, flat, joined)
        opt.fp16_partitioned_groups_flat[i].data.copy_(flat.data)
    # as DeepSpeed's own ZeRO-3 load does after copying the partitions: the parameters' views, then the
    # persistent (never partitioned) parameters re-partitioned so the next forward gathers the new values
    for i in range(len(opt.fp16_partitioned_groups_flat)):
        views = opt.unflatten(opt.fp16_partitioned_groups_flat[i], opt.fp16_partitioned_groups[i])
        for partitioned, view in zip(opt.fp16_partitioned_groups[i], views, strict=True):
            partitioned.data = view.data
    if opt.persistent_parameters:
        opt.persistent_parameters[0].partition(opt.persistent_parameters)


def verify(engine, state: FullState) -> None:
    """Every parameter's full fp32 master weight, assembled by DeepSpeed, equals the checkpoint's (collective)."""
    from deepspeed.utils import safe_get_full_fp32_param

    opt = engine.optimizer
    params = [p for group in (opt.fp16_groups if _is_zero3(opt) else opt.bit16_groups) for p in group]
    for k, (param, expected) in enumerate(zip(params, state.tensors[MASTER], strict=True)):
        got = safe_get_full_fp32_param(param)
        if got is None or not torch.equal(got.detach().cpu().flatten(), expected):
            raise ReshardError(f"re-sharding the optimizer state went wrong: parameter {k} "
                                  f"({state.shapes[k]}) differs from the checkpoint's after the re-shard")


def reshard(engine, path: Path, rank: int, world: int) -> str:
    """Load checkpoint ``path``'s optimizer state (written by another number of ranks) into ``engine``: re-shard,
    write, verify. Returns a one-line summary for the log."""
    state = read_full_state(path)
    keys = load_into(engine, state, rank, world)
    verify(engine, state)
    elements = sum(t.numel() for t in state.tensors[MASTER])
    return (f"{len(state.shapes)} parameters ({elements} elements) x {len(keys)} tensors "
            f"({', '.join(keys)}) re-partitioned for {world} ranks; the full fp32 weights checked equal")
