"""Loading torch files without running code from them.

A pickle can name any Python callable, and ``torch.load(weights_only=False)`` (what DeepSpeed's loaders pass)
calls it: a crafted checkpoint in a run directory copied from elsewhere would run its payload. Here every load is
weights-only: tensors, numbers, strings and containers, plus the few types DeepSpeed and numpy put into gpd_ds
checkpoints (:func:`allowed_globals`). Anything else is refused with :class:`UnsafeFileError`, naming the file
and the offending global, before any of it runs.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pickle
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpd_ds.errors import UserInputError

_FORCE = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeFileError(UserInputError, RuntimeError):
    """A file holds a Python object outside the allow-list; nothing of it was run. ``offender``: its global."""

    offender = "an object that is not a tensor"


@functools.cache
def allowed_globals() -> tuple:
    """The only non-builtin types torch may rebuild: DeepSpeed's loss scalers, ZeRO's fragment addresses and
    stage enum (optimizer shards), and numpy's array pieces (RNG states in checkpoints written before gpd_ds
    stored them as plain lists)."""
    import numpy as np
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    numpy_core = getattr(np, "_core", None) or np.core
    return (LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address, numpy_core.multiarray._reconstruct,
            np.ndarray, np.dtype, type(np.dtype(np.uint32)))


_depth = 0  # how many safe_loading() blocks are open


@contextlib.contextmanager
def safe_loading() -> Iterator[None]:
    """Inside, every ``torch.load`` is weights-only, a caller's ``weights_only=False`` included (torch's own
    environment switch overrides it), with :func:`allowed_globals` allowed. Re-entrant: torch's allow-list context
    removes its globals on exit, so only the outermost one enters it (a nested exit emptied the outer one's list,
    and DeepSpeed's ZeRO-3 weight consolidation, which runs after a nested load, was refused)."""
    global _depth
    if _depth:
        _depth += 1
        try:
            yield
        finally:
            _depth -= 1
        return
    _depth = 1
    previous = os.environ.get(_FORCE)
    os.environ[_FORCE] = "1"
    try:
        with torch.serialization.safe_globals(list(allowed_globals())):
            yield
    finally:
        _depth = 0
        if previous is None:
            os.environ.pop(_FORCE, None)
        else:
            os.environ[_FORCE] = previous


def is_unsafe(e: BaseException) -> bool:
    """Whether ``e`` is torch refusing a global (rather than a damaged file)."""
    return isinstance(e, pickle.UnpicklingError) and "GLOBAL" in str(e)


def unsafe_error(path: str | Path, e: BaseException) -> UnsafeFileError:
    match = _GLOBAL.search(str(e))
    offender = match.group(1) if match else "an object that is not a tensor"
    error = UnsafeFileError(
        f"refusing to load {path}: it holds {offender}, which is not a tensor, number, string or one of the "
        f"{len(allowed_globals())} DeepSpeed/numpy types gpd_ds allows (loading it could run code). Nothing from it "
        "was run. Use a file written by gpd_ds, or convert foreign weights to .safetensors with `gpd-ds "
        "convert-weights FILE OUT.safetensors` (it reads the weights without running code)")
    error.offender = offender
    return error


def scan_file(path: str | Path) -> None:
    """Read only the pickle of a torch file (not its tensors) and raise :class:`UnsafeFileError` if it names a
    global outside the allow-list; a damaged file raises what torch raises. Cheap: run it before a load that
    other ranks take part in, so an unsafe file is refused before any rank starts loading."""
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            return  # not torch's zip format (legacy serialization): only the weights-only load guards it
    with safe_loading():
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    if unsafe:
        raise unsafe_error(path, pickle.UnpicklingError(f"GLOBAL {sorted(unsafe)[0]}"))


def load_file(path: str | Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` of one file, weights-only; an unsafe file raises :class:`UnsafeFileError`."""
    try:
        with safe_loading():
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if is_unsafe(e):
            raise unsafe_error(path, e) from None
        raise
