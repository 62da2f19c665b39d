"""Loading weights from local files, strictly, with errors that say what does not match."""

from __future__ import annotations

import pickle
import re
import warnings
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
        raise WeightsError(f"cannot read {what} weights {str(path)!r}: {_why_unreadable(e)}") from e
    while isinstance(state, dict) and len(state) <= 4 and any(k in state for k in _WRAPPER_KEYS):
        state = state[next(k for k in _WRAPPER_KEYS if k in state)]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{what} weights {str(path)!r} is not a state dict of tensors")
    if all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _why_unreadable(e: Exception) -> str:
    """One line on why torch could not read a file. torch's weights-only refusal is a page that suggests
    ``weights_only=False`` (running the file's code): only its own reason is kept."""
    text = str(e)
    detail = re.search(r"WeightsUnpickler error: \s*(.+)", text)
    if isinstance(e, pickle.UnpicklingError) and detail:
        return (f"it is not a file torch reads without running code (a plain pickle, or a torch file that pickles "
                f"objects: {detail.group(1).strip()}); save the state dict alone where it was made: "
                "torch.save(model.state_dict(), path), or safetensors")
    return f"{type(e).__name__}: {text.strip().splitlines()[0][:300] if text.strip() else ''}"


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


class _PickledArgs:
    """Stands in for ``argparse.Namespace`` while reading a foreign training checkpoint: its attributes are set as
    plain data and nothing of the original class runs. Only tensors leave :func:`convert_weights`."""


# Objects that training scripts store beside the weights (DeiT/RVT save their argparse arguments) and that may be
# read as inert stand-ins; any other non-tensor global is refused, naming it.
_INERT_GLOBALS = [(_PickledArgs, "argparse.Namespace")]


def convert_weights(src: str | Path, dst: str | Path, key: str | None = None) -> tuple[str, int]:
    """Write the state dict held in a foreign torch checkpoint ``src`` as ``dst`` (.safetensors).

    The file is read weights-only (:mod:`gpd_ds.safeload`), with ``argparse.Namespace`` read as an inert stand-in,
    so a release that pickles its training arguments beside the weights (the official RVT/DeiT files) converts
    without running code. ``key`` picks the entry holding the weights (default: ``model``, ``state_dict``,
    ``model_state_dict``, ``module``, or the file itself if it is a state dict). Returns (entry, tensor count).
    """
    import torch.serialization
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    if dst.suffix != ".safetensors":
        raise WeightsError(f"output {str(dst)!r} must end in .safetensors")
    if not src.is_file():
        raise WeightsError(f"weights file {str(src)!r} does not exist")
    try:
        with torch.serialization.safe_globals(_INERT_GLOBALS), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # the error says all
            checkpoint = load_torch_file(src)
    except UnsafeFileError as e:
        raise WeightsError(f"refusing to convert {str(src)!r}: it holds {e.offender}, and only tensors, plain data "
                           "and argparse.Namespace are read (anything else could run code); nothing from it was run. "
                           "Save its state dict alone where it was made (torch.save(model.state_dict(), ...))"
                           ) from None
    except Exception as e:  # a corrupt or foreign file: say which, keep the cause
        raise WeightsError(f"cannot read {str(src)!r}: {_why_unreadable(e)}") from e
    if not isinstance(checkpoint, dict):
        raise WeightsError(f"{str(src)!r} holds a {type(checkpoint).__name__}, not a dict of weights")
    if key is None:
        key = next((k for k in _WRAPPER_KEYS if isinstance(checkpoint.get(k), dict)), "")
    state = checkpoint[key] if key else checkpoint
    if key and key not in checkpoint:
        raise WeightsError(f"{str(src)!r} has no entry {key!r}; its entries: {sorted(map(str, checkpoint))}")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)} if isinstance(state, dict) else {}
    if not tensors or len(tensors) != len(state):
        raise WeightsError(f"entry {key or '<file>'!r} of {str(src)!r} is not a state dict of tensors; pick the "
                           f"entry with --key (entries: {sorted(map(str, checkpoint))})")
    if all(k.startswith("module.") for k in tensors):
        tensors = {k.removeprefix("module."): v for k, v in tensors.items()}
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(dst)  # atomic: a crash never leaves a half-written file under the final name
    return key or "<file>", len(tensors)
