"""Build models by name (``create("resnet18-trunc", ...)``), each architecture defined once.

The registry is filled by the modules that define models, when they are imported (``@register``):
:mod:`milotile.nn.resnet` (with :mod:`milotile.nn`), :mod:`milotile.explore.model` (with
:mod:`milotile.explore`) and :mod:`milotile.refine.model` (with :mod:`milotile.refine`). It never
imports a layer above it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["register", "create", "available", "get_builder"]

Builder = Callable[..., torch.nn.Module]

_BUILDERS: dict[str, Builder] = {}

def register(name: str) -> Callable[[Builder], Builder]:
    """Decorator registering a model builder ``fn(**config) -> torch.nn.Module`` under ``name``.

    Parameters
    ----------
    name : str
        Architecture name stored in checkpoints; must be unique.

    Examples
    --------
    >>> @register("tiny-linear-doc")
    ... def _tiny(n: int = 2):
    ...     return torch.nn.Linear(n, n)
    >>> create("tiny-linear-doc", n=3).in_features
    3
    """

    def deco(fn: Builder) -> Builder:
        old = _BUILDERS.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"architecture {name!r} is already registered by {old.__module__}")
        _BUILDERS[name] = fn
        return fn

    return deco


def available() -> list[str]:
    """Sorted names of all registered architectures (those of the model modules imported so far)."""
    return sorted(_BUILDERS)


def get_builder(name: str) -> Builder:
    """The builder registered under ``name`` (InputError naming the known ones if unknown)."""
    try:
        return _BUILDERS[name]
    except KeyError:
        raise InputError(
            f"unknown architecture {name!r}; available: {', '.join(available()) or '(none)'}."
        ) from None


def create(name: str, **config: Any) -> torch.nn.Module:
    """Build the architecture ``name`` with keyword ``config``.

    Parameters
    ----------
    name : str
        A registered architecture name, see :func:`available`.
    **config
        Keyword arguments of the builder.

    Returns
    -------
    torch.nn.Module
    """
    builder = get_builder(name)
    try:
        return builder(**config)
    except TypeError as exc:
        raise InputError(f"invalid configuration for architecture {name!r}: {exc}.") from exc
