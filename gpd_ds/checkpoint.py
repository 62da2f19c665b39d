"""Checkpoints: DeepSpeed's ``save_checkpoint`` on every rank, made atomic by a completion marker.

Layout: ``RUN_DIR/checkpoints/step000001234/`` (DeepSpeed's files) plus ``gpd_complete.json``, written by rank 0
after every rank has finished writing. A checkpoint without the marker (a crash mid-save) is never resumed from
and is removed later; a new checkpoint never overwrites an old one, so a crash cannot damage the last good one.
The last ``keep`` complete checkpoints are kept. ``resume("auto")`` loads the newest complete checkpoint and, if
it cannot be read on some rank, falls back to the previous one.

Per-rank state (data position, RNG) is gathered into the client state, which rank 0 saves.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path

from gpd_ds.distributed import all_gather_object, barrier
from gpd_ds.errors import UserInputError

log = logging.getLogger(__name__)

MARKER = "gpd_complete.json"
_TAG = re.compile(r"^step(\d{9})$")


class ResumeError(UserInputError, RuntimeError):
    """No usable checkpoint where one was asked for."""


def tag_for(step: int) -> str:
    return f"step{step:09d}"


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoint directories under ``root``, newest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _TAG.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: p.name, reverse=True)


def save(engine, root: Path, step: int, client_state: dict, keep: int, is_main: bool, world_size: int) -> Path:
    """Save on every rank; rank 0 marks it complete and prunes old and incomplete checkpoints."""
    tag = tag_for(step)
    engine.save_checkpoint(str(root), tag=tag, client_state=client_state, save_latest=False)
    barrier()
    path = root / tag
    if is_main:
        tmp = path / f".{MARKER}.tmp"
        tmp.write_text(json.dumps({"step": step, "time": time.time(), "world_size": world_size}))
        os.replace(tmp, path / MARKER)
        complete = complete_checkpoints(root)
        for old in complete[keep:]:
            shutil.rmtree(old, ignore_errors=True)
        for partial in root.iterdir():
            if _TAG.match(partial.name) and not (partial / MARKER).is_file() and partial.name < tag:
                shutil.rmtree(partial, ignore_errors=True)
    barrier()
    return path


# What a damaged checkpoint file raises when torch/DeepSpeed read it.
_READ_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, AssertionError)


def _candidates(spec: str, root: Path) -> list[Path]:
    if spec == "auto":
        return complete_checkpoints(root)
    path = Path(spec)
    if (path / MARKER).is_file():
        return [path]
    for sub in (path, path / "checkpoints"):
        found = complete_checkpoints(sub)
        if found:
            return found
    raise ResumeError(f"--resume {spec!r}: no complete checkpoint there (a step000000123 directory with {MARKER}, "
                      "or a run directory holding checkpoints/)")


def _load(engine, path: Path, world_size: int) -> dict | None:
    """Load one checkpoint. Written by another number of ranks, it loads the weights, EMA, schedule and step but
    not the optimizer state: ZeRO's optimizer partitions cannot be re-sharded, so SGD momentum / Adam moments
    restart (a warning says so)."""
    written_by = json.loads((path / MARKER).read_text()).get("world_size", world_size)
    elastic = written_by != world_size
    if elastic:
        log.warning("checkpoint %s was written by %d ranks and this job has %d: resuming the weights, EMA, schedule "
                    "and step; the optimizer state (momentum) restarts", path, written_by, world_size)
    load_path, client = engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=True,
                                               load_optimizer_states=not elastic, load_lr_scheduler_states=True)
    if elastic and load_path is not None and hasattr(engine.optimizer, "refresh_fp32_params"):
        # where the ZeRO optimizer keeps its own fp32 copy (DeepSpeed's fp16/bf16 blocks), it must follow the
        # loaded weights; with torch_autocast's fp32 parameters this is a no-op
        engine.optimizer.refresh_fp32_params()
    return client if load_path is not None else None


def resume(engine, spec: str, root: Path, world_size: int) -> dict | None:
    """Load the checkpoint ``spec`` names (``auto``: the newest complete one under ``root``; ``none``: nothing)
    into ``engine`` on every rank; return the client state, or None when starting fresh."""
    if spec == "none":
        return None
    for path in _candidates(spec, root):
        try:
            client = _load(engine, path, world_size)
            error = None if client is not None else "DeepSpeed found nothing to load"
        except _READ_ERRORS as e:
            client, error = None, f"{type(e).__name__}: {str(e)[:300]}"
        errors = [e for e in all_gather_object(error) if e]
        if not errors:
            log.info("resumed from %s", path)
            return client
        log.warning("checkpoint %s is unusable (%s); trying the previous one", path, errors[0])
    if spec != "auto":
        raise ResumeError(f"--resume {spec!r}: no checkpoint there could be loaded (see the warnings above)")
    return None
