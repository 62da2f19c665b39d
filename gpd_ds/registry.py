"""Registries: where users extend gpd_ds by name (a KD loss, a recipe: :data:`gpd_ds.recipes.RECIPES`) without
editing the framework.

A :class:`Registry` maps a name to an object. Built-in entries are a table of ``"module:attribute"`` strings,
imported on first use, so the command line knows every built-in name (config validation, ``--help``) before torch
is imported; a user's entry is one decorator in their own file::

    from gpd_ds.registry import KD_LOSSES

    @KD_LOSSES.register("cosine")
    def cosine_kd(logits, static_logits, target, params):
        return 1 - torch.cosine_similarity(logits.float(), static_logits.detach().float()).mean()

then ``gpd-ds train --plugin my_losses.py --set loss.kd=cosine`` (``--plugin`` imports the file, or a module by
name, before the config is checked; in a test or a notebook a name is known as soon as its cell has run).

This module imports nothing heavy, and nothing of gpd_ds but :mod:`gpd_ds.errors`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from gpd_ds.errors import UserInputError

T = TypeVar("T")


class UnknownNameError(UserInputError, KeyError):
    """A name no registry entry has (the message names the key, the value and the registered names)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class Registry:
    """``name -> object``, for the objects of one ``kind`` that the config key ``key`` chooses between."""

    def __init__(self, kind: str, key: str, builtin: dict[str, str] | None = None) -> None:
        self.kind, self.key = kind, key
        self._entries: dict[str, Any] = dict(builtin or {})  # an object, or "module:attribute" not yet imported
        self._builtin = frozenset(self._entries)

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the decorated object under ``name``. A name is registered once (registering the same
        object again, as a module imported twice does, is harmless)."""
        def add(obj: T) -> T:
            known = self._entries.get(name)
            if name in self._builtin:
                raise ValueError(f"{self.kind} {name!r} is a built-in one; choose another name")
            if known is not None and known is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered ({known!r}); choose another name")
            self._entries[name] = obj
            return obj
        if not name or "+" in name or name == "none":
            raise ValueError(f"{self.kind} name {name!r} is invalid: use a non-empty name without '+', not 'none'")
        return add

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test's registration, say); built-in entries stay."""
        if name in self._builtin:
            raise ValueError(f"{self.kind} {name!r} is a built-in one and stays registered")
        self._entries.pop(name, None)

    def names(self) -> tuple[str, ...]:
        """The registered names, in the order of registration."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, Any]]:
        """(name, object) pairs, importing built-in entries."""
        return ((name, self.get(name)) for name in self.names())

    def get(self, name: str) -> Any:
        """The object registered as ``name`` (a built-in one is imported now)."""
        if name not in self._entries:
            raise UnknownNameError(f"{self.key}={name!r} is unknown: {self.choices()}")
        entry = self._entries[name]
        if isinstance(entry, str):
            module, _, attribute = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attribute)
        return entry

    def choices(self, extra: tuple[str, ...] = ()) -> str:
        """"use one of a, b, c" for a message."""
        return f"use one of {', '.join((*self.names(), *extra))}"

    def close_to(self, name: str) -> list[str]:
        return difflib.get_close_matches(name, self.names(), n=3)


# A KD loss: psi in the GPD objective, the term that distils the static teacher's logits into the student (and into
# the dynamic teacher). Called as fn(logits, static_logits, target, params) -> scalar tensor, in fp32; ``target`` is
# class indices (B,) or a soft/mixed target (B, K); ``params`` is the run's GPDLoss (temperature, dkd_alpha,
# dkd_beta: the loss.* settings). loss.kd chooses it by name ("dkd"), optionally with ReviewKD's feature term
# ("dkd+reviewkd").
KD_LOSSES = Registry("KD loss", "loss.kd", {"dkd": "gpd_ds.losses:dkd_loss", "kl": "gpd_ds.losses:kl_loss",
                                           "dist": "gpd_ds.kd.dist:dist_loss"})


class FeatureLoss:
    """A feature distillation method: ``connector(widths, static_widths, loss_config)`` builds the module (trained
    with the student) that maps a network's tapped features, one ``(B, C, H, W)`` map per level, to the static
    teacher's widths; ``loss(connected, static_features)`` compares them (a scalar, fp32, the static features
    detached); ``weight_key`` names the ``loss.*`` setting that weights it."""

    def __init__(self, connector: Callable[..., Any], loss: Callable[..., Any], weight_key: str) -> None:
        self.connector, self.loss, self.weight_key = connector, loss, weight_key


# A feature loss (FeatureLoss), the feature term of the GPD objective: loss.kd chooses it alone ("reviewkd") or after
# a KD loss ("dkd+fitnet"). The taps it reads are gpd_ds.tap_sets'.
FEATURE_LOSSES = Registry("feature loss", "loss.kd", {"reviewkd": "gpd_ds.reviewkd:REVIEWKD",
                                                      "fitnet": "gpd_ds.kd.fitnet:FITNET"})
