"""Loading weights from local files, strictly, with errors that say what does not match."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from gpd_ds.errors import UserInputError
from gpd_ds.safeload import UnsafeFileError
from gpd_ds.safeload import load_file as load_torch_file

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict")


class WeightsError(UserInputError, ValueError):
    """A weights file is missing, unreadable, or does not fit the architecture."""


def read_state_dict(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch file (weights-only: :mod:`gpd_ds.safeload`); common wrappers
    (``state_dict``, ``model``, ``module``) and a DDP ``module.`` prefix are removed."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{what} weights file {str(path)!r} does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else load_torch_file(path)
    except UnsafeFileError as e:
        raise WeightsError(f"{what} weights: {e}") from None
    except Exception as e:  # a corrupt or foreign file: say which, keep the cause
        raise WeightsError(f"cannot read {what} weights {str(path)!r}: {type(e).__name__}: {e}") from e
    while isinstance(state, dict) and len(state) <= 4 and any(k in state for k in _WRAPPER_KEYS):
        state = state[next(k for k in _WRAPPER_KEYS if k in state)]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{what} weights {str(path)!r} is not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def load_weights(model: nn.Module, path: str | Path, what: str) -> None:
    """Load ``path`` into ``model`` strictly; on mismatch list the missing, unexpected and misshapen keys."""
    state = read_state_dict(path, what)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshapen = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in sorted(set(own) & set(state)) if state[k].shape != own[k].shape]
    if missing or unexpected or misshapen:
        def show(keys: list[str]) -> str:
            return f"{keys[:8]}{' ...' if len(keys) > 8 else ''} ({len(keys)})"
        raise WeightsError(
            f"{what} weights {str(path)!r} do not fit {type(model).__name__}: missing {show(missing)}, "
            f"unexpected {show(unexpected)}, wrong shape {show(misshapen)}. Is it the right architecture and "
            "number of classes?")
    model.load_state_dict(state, strict=True)
