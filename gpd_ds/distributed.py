"""Process-group set-up, rank helpers and seeding (DeepSpeed's communication layer underneath)."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import io
import os
import random
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import deepspeed
import deepspeed.comm as dist
import numpy as np
import torch
from deepspeed.accelerator import get_accelerator

from gpd_ds.errors import UserInputError
from gpd_ds.progress import named_while_waiting

T = TypeVar("T")
# Long evaluations and checkpoint writes must not trip the collective watchdog (DeepSpeed's default is 30 min).
COLLECTIVE_TIMEOUT = timedelta(minutes=int(os.environ.get("GPD_DS_COLLECTIVE_TIMEOUT_MIN", "120")))


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
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        remove_stale_shm_buffers()
        clear_stale_build_lock()
    skip_cpu_comm_op()
    if not dist.is_initialized():
        # where DeepSpeed builds its CPU op (GPD_DS_CPU_SHM_OP=1), each rank prints a success line: rank 0's is
        # enough (a failure raises, on every rank)
        quiet = contextlib.redirect_stdout(io.StringIO()) if os.environ["RANK"] != "0" else contextlib.nullcontext()
        with quiet, _port_in_use_is_one_line(), named_while_waiting(_start_up_wait):
            deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                                       timeout=COLLECTIVE_TIMEOUT)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator = get_accelerator()
    if accelerator.device_name() == "cpu":
        device = torch.device("cpu")
        atexit.register(_remove_shm_buffers, os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"], dist.get_rank())
    else:
        accelerator.set_device(local_rank)
        device = torch.device(accelerator.device_name(local_rank))
    _make_control_group()
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


class PortInUseError(UserInputError, RuntimeError):
    """The job's rendezvous port (MASTER_PORT) is taken, usually by another job on the same host."""


@contextlib.contextmanager
def _port_in_use_is_one_line() -> Iterator[None]:
    try:
        yield
    except torch.distributed.DistNetworkError as e:
        if "EADDRINUSE" not in str(e) and "address already in use" not in str(e).lower():
            raise
        addr, port = os.environ.get("MASTER_ADDR", "?"), os.environ.get("MASTER_PORT", "?")
        raise PortInUseError(f"the rendezvous port {port} on {addr} is in use (another job on this host?): give "
                             "each job on a host its own port, e.g. deepspeed --master_port 29600 launch/train.py "
                             "... (or MASTER_PORT=29600 without the launcher)") from None


_CONTROL_GROUP: list = []  # the CPU process group of small control messages (set by init)


def _make_control_group() -> None:
    """A gloo group for control messages (stop requests), so exchanging them never touches the GPU stream. Every
    rank calls this at start-up (creating a group is a collective); a gloo job uses its default group."""
    if _CONTROL_GROUP or dist.get_world_size() == 1:
        return
    default_is_gloo = torch.distributed.get_backend() == "gloo"
    _CONTROL_GROUP.append(None if default_is_gloo else torch.distributed.new_group(backend="gloo"))


def gather_rows(row: list[float]) -> list[list[float]]:
    """Every rank's ``row`` (a few numbers, the same length on every rank), indexed by rank, over the CPU control
    group, in float64 (integers below 2**53 come back exact)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [list(row)]
    rows = torch.zeros(dist.get_world_size(), len(row), dtype=torch.float64)
    rows[dist.get_rank()] = torch.tensor(row, dtype=torch.float64)
    torch.distributed.all_reduce(rows, group=_CONTROL_GROUP[0] if _CONTROL_GROUP else None)
    return rows.tolist()


def _remove_shm_buffers(addr: str, port: str, rank: int) -> None:
    """DeepSpeed's CPU all-reduce leaves its shared-memory buffers in /dev/shm when the job ends (~70 MB per rank
    and job; hundreds of jobs filled a 24 GB machine's RAM). Unlinking at exit is safe: mappings outlive names."""
    for path in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
        path.unlink(missing_ok=True)


def _mapped_shm_files() -> set[str]:
    """Every /dev/shm file some live process of this machine has mapped (from /proc/*/maps)."""
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        mapped.update(line.split(maxsplit=5)[-1] for line in text.splitlines() if "/dev/shm/" in line)
    return mapped


def remove_stale_shm_buffers(min_age_s: float = 30.0) -> list[Path]:
    """Remove DeepSpeed CPU all-reduce buffers that no live process maps: what SIGKILLed jobs left behind (the
    exit hook above never ran for them). Buffers younger than ``min_age_s`` are left alone: a job starting next
    to this one may not have mapped its own yet."""
    buffers = list(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    if not buffers:
        return []
    mapped, now, removed = _mapped_shm_files(), time.time(), []
    for path in buffers:
        with contextlib.suppress(OSError):  # another job's cleanup may race this one
            if str(path) not in mapped and now - path.stat().st_mtime > min_age_s:
                path.unlink()
                removed.append(path)
    return removed


SHM_OP = "deepspeed_shm_comm"  # the CPU communication op DeepSpeed builds (torch.utils.cpp_extension) on first use
SHM_OP_SWITCH = "GPD_DS_CPU_SHM_OP"


def skip_cpu_comm_op() -> None:
    """On CPUs, do not let DeepSpeed build its shared-memory communication op (unless ``GPD_DS_CPU_SHM_OP=1``).

    Only DeepSpeed's *inference* all-reduce uses it; training's collectives (ZeRO's reduce-scatter, all-gather,
    all-reduce) go to the process group (gloo) either way. Measured (bench/cpu_comm_op.py, BENCHMARKS.md): 2-rank
    steps as fast without it, and no compile (~40 s per environment), no build lock, no build output on every
    start. The switch stays for measuring it again."""
    if get_accelerator().device_name() != "cpu" or os.environ.get(SHM_OP_SWITCH) == "1":
        return
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _build_lock(name: str = SHM_OP) -> Path:
    from torch.utils.cpp_extension import _get_build_directory

    return Path(_get_build_directory(name, verbose=False)) / "lock"


def _lock_file_blocks() -> bool:
    """Whether torch waits on the build lock file's mere existence (its ``FileBaton``, torch < 2.14), which a
    killed build leaves behind. torch 2.14 holds an OS lock on it instead (``FileLock``): the kernel releases that
    when the holder dies, and the file left on disk blocks nothing."""
    import torch.utils.cpp_extension as cpp_extension

    return hasattr(cpp_extension, "FileBaton") and not hasattr(cpp_extension, "FileLock")


def _building(directory: Path) -> bool:
    """Whether a live process works in ``directory`` (torch runs ninja and the compiler there)."""
    import psutil

    for proc in psutil.process_iter(["cwd"]):
        cwd = proc.info.get("cwd")
        if cwd and Path(cwd).is_relative_to(directory):
            return True
    return False


def build_in_progress(lock: Path) -> bool:
    """Whether a process holds the op's build lock now."""
    if _lock_file_blocks():
        return lock.exists()
    import fcntl

    try:
        with open(lock, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the file
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


def clear_stale_build_lock(name: str = SHM_OP, min_age_s: float = 60.0) -> Path | None:
    """Under a torch whose build lock blocks by existing (see :func:`_lock_file_blocks`), remove the lock of
    DeepSpeed's CPU op that a build killed half-way left (torch would wait on it forever, silently): older than
    ``min_age_s`` with no process building in its directory. Returns the lock removed."""
    if not _lock_file_blocks():
        return None  # an OS lock: a dead builder's is released already; removing the file could race a live one
    lock = _build_lock(name)
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - lock.stat().st_mtime
        if age > min_age_s and not _building(lock.parent):
            lock.unlink()
            print(f"gpd_ds: removed a stale build lock {lock} ({age / 60:.1f} min old, no build running: a build "
                  "killed half-way leaves it); the op is built again", file=sys.stderr, flush=True)
            return lock
    return None


def _start_up_wait() -> str:
    """What DeepSpeed's start waits on: the CPU op's build (where it is built), else the rendezvous."""
    lock = _build_lock()
    if build_in_progress(lock):
        return f"DeepSpeed's CPU op build (lock {lock})"
    return (f"the rendezvous of {os.environ.get('WORLD_SIZE', '?')} ranks at {os.environ.get('MASTER_ADDR', '?')}:"
            f"{os.environ.get('MASTER_PORT', '?')}")


def on_all_ranks(fn: Callable[[], T], what: str) -> T:
    """Run ``fn`` on every rank; if it fails on any (a file missing on one node, say), fail on all ranks with
    every rank's error and host, instead of leaving the healthy ranks waiting in the next collective."""
    try:
        result, error = fn(), None
    except UserInputError as e:
        result, error = None, str(e)
    reports = all_gather_object((socket.gethostname(), error))
    bad = [(rank, host, err) for rank, (host, err) in enumerate(reports) if err]
    if bad:
        details = "; ".join(f"rank {rank} on {host}: {err}" for rank, host, err in bad[:4])
        raise UserInputError(f"{what} failed on {len(bad)} of {len(reports)} ranks: {details}")
    return result


def check_shared_dir(run_dir: Path, info: DistInfo) -> None:
    """Every rank must see the same run directory (checkpoints are written by all ranks and read back by all).
    Each rank writes a marker; rank 0 checks that it sees all of them."""
    marks = run_dir / ".ranks"
    marks.mkdir(parents=True, exist_ok=True)
    (marks / f"{info.rank}").write_text(socket.gethostname())
    barrier()
    missing = None
    if info.is_main:
        missing = [r for r in range(info.world_size) if not (marks / str(r)).is_file()]
    missing = broadcast_object(missing)
    barrier()
    if info.is_main:
        for r in range(info.world_size):
            (marks / str(r)).unlink(missing_ok=True)
    if missing:
        raise UserInputError(f"the run directory {run_dir} is not shared between nodes: rank 0 "
                             f"({socket.gethostname()}) cannot see the files of ranks {missing[:8]}; put --run-dir "
                             "on a file system every node mounts")


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


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` is true on any rank (a one-element all-reduce)."""
    t = torch.tensor([float(flag)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def is_running_stat(name: str, buffer: torch.Tensor) -> bool:
    return "running_" in name.rsplit(".", 1)[-1] and buffer.is_floating_point()


@torch.no_grad()
def average_running_stats(module: torch.nn.Module | dict[str, torch.Tensor]) -> None:
    """Average every BatchNorm running statistic (of a module, or in a dict of named buffers) over the ranks.

    Decision: forward passes normalise with each rank's own batch statistics (as the reference's DDP does; no
    SyncBatchNorm collective per layer per step), and the running statistics are averaged before every
    evaluation and checkpoint, so all ranks evaluate and save the same model."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    named = module.items() if isinstance(module, dict) else module.named_buffers()
    stats = [b for n, b in named if is_running_stat(n, b)]
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
    """This process's RNG states as tensors, numbers and strings only (checkpoints load weights-only)."""
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(keys), gauss],
             "numpy": [kind, torch.from_numpy(np_keys.astype(np.int64)), pos, has_gauss, cached],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, keys, gauss = state["python"]
    random.setstate((version, tuple(keys), gauss))
    kind, np_keys, *rest = state["numpy"]
    if isinstance(np_keys, torch.Tensor):
        np_keys = np_keys.numpy().astype(np.uint32)
    np.random.set_state((kind, np_keys, *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_for_new_rank(seed: int, step: int, rank: int) -> int:
    """The seed of rank ``rank`` resuming at ``step`` after a change of world size (elastic resume): a function of
    the three, so every rank draws its own stream (mixup, drop path, erasing) and a rerun draws the same ones."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "little") % 2**63
