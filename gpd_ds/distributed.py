"""Process-group set-up, rank helpers and seeding (DeepSpeed's communication layer underneath)."""

from __future__ import annotations

import os
import random
import socket
from dataclasses import dataclass
from typing import Any

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init() -> DistInfo:
    """Join the job started by the ``deepspeed`` launcher (or become a one-process job without it)."""
    if "RANK" not in os.environ:  # plain `python launch/train.py` / `gpd-ds train`: a job of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, indexed by rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


@torch.no_grad()
def average_running_stats(module: torch.nn.Module) -> None:
    """Average every BatchNorm running statistic over the ranks.

    Decision: forward passes normalise with each rank's own batch statistics (as the reference's DDP does; no
    SyncBatchNorm collective per layer per step), and the running statistics are averaged before every
    evaluation and checkpoint, so all ranks evaluate and save the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    stats = [b for n, b in module.named_buffers() if "running_" in n.rsplit(".", 1)[-1] and b.is_floating_point()]
    if not stats:
        return
    flat = torch.cat([b.reshape(-1) for b in stats])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for b in stats:
        b.copy_(flat[offset:offset + b.numel()].view_as(b))
        offset += b.numel()


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
