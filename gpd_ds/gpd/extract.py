"""Channel-Branch Reparameterization (CBR): turn the student view back into a plain student."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from gpd_ds.gpd.layers import WideModule
from gpd_ds.gpd.mode import STUDENT
from gpd_ds.gpd.model import GPDModel


class ExtractionError(RuntimeError):
    """The extracted plain student does not compute what the student view computes."""


def student_state_dict(model: GPDModel) -> dict[str, Tensor]:
    """The student's state dict under the source model's keys: slices (x r where IR divided),
    merged multi-branch kernels, and the student's own BatchNorm running statistics."""
    state: dict[str, Tensor] = {}
    for path, m in model.net.named_modules():
        if isinstance(m, WideModule):
            prefix = f"{path}." if path else ""
            state.update({prefix + k: v for k, v in m.student_state().items()})
    for path, name, spec in model.raw_parameters:
        key = f"{path}.{name}" if path else name
        state[key] = model.raw_student_tensor(path, name, spec).detach().clone()
    return state


def extract(model: GPDModel) -> nn.Module:
    """A model of the source student's class and configuration holding the student's weights.

    Loaded with ``strict=True``; it is on the GPD model's device and in its train/eval mode. Its
    ``state_dict()`` loads strictly into a fresh ``timm.create_model(name)`` (or torchvision builder).
    """
    if not isinstance(model, GPDModel):
        raise TypeError(f"extract() needs a GPDModel (from gpd_ds.gpd.expand), got {type(model).__name__}")
    state = student_state_dict(model)
    plain = copy.deepcopy(model.source)
    plain.load_state_dict(state, strict=True)
    device = next(model.parameters()).device
    return plain.to(device).train(model.training)


@torch.no_grad()
def check_equivalence(model: GPDModel, plain: nn.Module, inputs: Tensor, rtol: float = 1e-5) -> float:
    """Max |plain(x) - model(x, student)| in eval mode; raise :class:`ExtractionError` above
    ``rtol * max(1, max|logit|)``. Restores both models' train/eval modes."""
    modes = model.training, plain.training
    model.eval()
    plain.eval()
    try:
        expected = model(inputs, mode=STUDENT).float()
        got = plain(inputs).float()
    finally:
        model.train(modes[0])
        plain.train(modes[1])
    diff = (got - expected).abs().max().item()
    bound = rtol * max(1.0, expected.abs().max().item())
    if not diff <= bound:
        raise ExtractionError(f"the extracted student differs from the GPD student mode by max |diff| = {diff:.3g} "
                              f"(allowed {bound:.3g}); do not ship it")
    return diff
