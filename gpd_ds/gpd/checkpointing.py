"""Activation checkpointing per block: keep only each block's input and recompute its inside in backward.

The GPD step keeps the activations of both modes alive until the single backward (the dynamic teacher's are ~2x the
student's per layer), so checkpointing is the main memory lever for large students. The recomputation must run
in the GPD mode the block originally ran in: the mode is a scoped setting (:func:`~gpd_ds.gpd.mode.mode_scope`)
that is no longer active when backward runs, so the checkpoint re-enters it (``context_fn``). Non-reentrant
checkpointing, with the RNG state restored (drop-path recomputes the same mask).
"""

from __future__ import annotations

import contextlib
import functools
import types

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from gpd_ds.gpd.mode import active_mode, mode_scope

# residual / transformer blocks of the supported families (timm and torchvision), by class name
BLOCK_CLASSES = ("BasicBlock", "Bottleneck", "Block", "InvertedResidual", "DepthwiseSeparableConv",
                 "ConvNeXtBlock", "SwinTransformerBlock")


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    """Installed as a block's ``forward`` (a method of the block, so a deep copy of the model rebinds it to the
    copy's block) in place of its class's forward."""
    forward = functools.partial(type(self).forward, self)
    if not torch.is_grad_enabled():
        return forward(*args, **kwargs)
    mode = active_mode()

    def contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
        return contextlib.nullcontext(), (mode_scope(mode) if mode else contextlib.nullcontext())

    return checkpoint(forward, *args, use_reentrant=False, context_fn=contexts, **kwargs)


def enable_activation_checkpointing(model: nn.Module, classes: tuple[str, ...] = BLOCK_CLASSES) -> int:
    """Checkpoint every outermost block of ``model`` (a GPD model or a plain student) whose class name is in
    ``classes``; returns how many. Apply it to the trained model only (EMA and eval copies run without grad)."""
    count = 0

    def visit(module: nn.Module) -> None:
        nonlocal count
        for child in module.children():
            # IR's parametrized tensors (torch.nn.utils.parametrize) rename a block's class "Parametrized<Name>"
            if type(child).__name__.removeprefix("Parametrized") in classes:
                child.forward = types.MethodType(_checkpointed_forward, child)
                count += 1
            else:
                visit(child)

    visit(model)
    if count == 0:
        raise ValueError(f"run.activation_checkpointing: no block of {classes} found in {type(model).__name__}; "
                         "this architecture has no known blocks to checkpoint")
    return count
