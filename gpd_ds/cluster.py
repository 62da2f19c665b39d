"""Cluster preflight checks (``gpd-ds preflight``), run by the launch scripts on each node before training.

They fail fast, naming the problem and the fix: a missing or malformed hostfile (DeepSpeed would silently fall
back to the local machine), fewer GPUs on the node than the hostfile promises, data shards not visible on the node.
Checks that need every node at once (the run directory must be shared; every rank must see the data) run inside
the job, collectively (:func:`gpd_ds.distributed.on_all_ranks`, :func:`gpd_ds.distributed.check_shared_dir`).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

from gpd_ds.errors import UserInputError

_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class PreflightError(UserInputError, RuntimeError):
    """The node or the job description is not ready for this launch."""


def parse_hostfile(path: str | Path) -> dict[str, int]:
    """``{host: slots}`` from a DeepSpeed hostfile (``host slots=N`` lines, ``#`` comments)."""
    path = Path(path)
    if not path.is_file():
        raise PreflightError(f"hostfile {str(path)!r} does not exist; write one line per node: '<host> slots=<gpus>'")
    hosts: dict[str, int] = {}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = _LINE.match(line)
        if not match:
            raise PreflightError(f"hostfile {path!s}:{number}: {raw.strip()!r} is not '<host> slots=<gpus>'")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise PreflightError(f"hostfile {path!s}:{number}: host {host!r} is listed twice")
        if slots < 1:
            raise PreflightError(f"hostfile {path!s}:{number}: {host!r} has slots={slots}; use >= 1")
        hosts[host] = slots
    if not hosts:
        raise PreflightError(f"hostfile {str(path)!r} lists no hosts")
    return hosts


def visible_gpus() -> int | None:
    """GPUs this node can use (``nvidia-smi -L``, respecting CUDA_VISIBLE_DEVICES); None without NVIDIA tools."""
    if shutil.which("nvidia-smi") is None:
        return None
    result = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=60, check=False)
    count = sum(1 for line in result.stdout.splitlines() if line.startswith("GPU "))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        count = min(count, len([d for d in visible.split(",") if d.strip()]))
    return count


def check_gpus(requested: int, allow_cpu: bool) -> str:
    found = visible_gpus()
    if found is None or found == 0:
        if allow_cpu:
            return f"no GPU on this node: running {requested} CPU process(es) (GPD_DS_ALLOW_CPU=1)"
        raise PreflightError(f"no GPU visible on {os.uname().nodename} (nvidia-smi missing or empty) but "
                             f"{requested} requested; check the node, or set GPD_DS_ALLOW_CPU=1 for a CPU rehearsal")
    if found < requested:
        raise PreflightError(f"{os.uname().nodename} has {found} GPU(s) but {requested} requested (hostfile slots or "
                             "--gpus); lower the slots or fix CUDA_VISIBLE_DEVICES")
    return f"{found} GPU(s) visible, {requested} used"


def check_data(root: str) -> str:
    """The dataset index and every split's first and last shard exist (local paths; URLs are not checked)."""
    if "://" in root or root.startswith("pipe:"):
        return f"data {root} is remote: not checked here"
    index = Path(root) / "_info.json"
    if not index.is_file():
        raise PreflightError(f"data root {root!r} is not visible on {os.uname().nodename}: no {index}; mount the "
                             "shared file system here or copy the shards (gpd-ds make-shards writes _info.json)")
    info = json.loads(index.read_text())
    missing = [name for split in info.get("splits", {}).values() for name in (split["filenames"][0],
                                                                               split["filenames"][-1])
               if not (Path(root) / name).is_file()]
    if missing:
        raise PreflightError(f"shards listed in {index} are missing on {os.uname().nodename}: {missing[:3]}")
    return f"data {root}: index and shards visible"


def preflight(hostfile: str | None, gpus: int | None, data: str | None, allow_cpu: bool) -> list[str]:
    """Run the checks that apply; return what was checked (raises :class:`PreflightError` on the first problem)."""
    done = []
    requested = gpus
    if hostfile:
        hosts = parse_hostfile(hostfile)
        done.append(f"hostfile {hostfile}: {len(hosts)} node(s), {sum(hosts.values())} slot(s)")
        requested = requested or max(hosts.values())
    if requested:
        done.append(check_gpus(requested, allow_cpu))
    if data:
        done.append(check_data(data))
    return done
