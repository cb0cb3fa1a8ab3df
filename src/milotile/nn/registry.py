"""Build models by name (``create("resnet18-trunc", ...)``), each architecture defined once."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["register", "create", "available", "get_builder"]

Builder = Callable[..., torch.nn.Module]

_BUILDERS: dict[str, Builder] = {}

#: modules that register architectures when imported; loaded lazily by ``create``/``available``
_ARCH_MODULES: tuple[str, ...] = (
    "milotile.nn.resnet",
    "milotile.explore.model",
    "milotile.refine.model",
    "milotile.segments.models",
)
_loaded = False


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


def _load_arch_modules() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _ARCH_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            # a module not written yet (or an optional one) must not break the others
            if exc.name is not None and mod.startswith(exc.name):
                log.debug("architecture module %s not available: %s", mod, exc)
            else:
                log.warning("architecture module %s could not be imported: %s", mod, exc)
        except ImportError as exc:
            log.warning("architecture module %s could not be imported: %s", mod, exc)
    _loaded = True


def available() -> list[str]:
    """Sorted names of all registered architectures."""
    _load_arch_modules()
    return sorted(_BUILDERS)


def get_builder(name: str) -> Builder:
    """The builder registered under ``name`` (InputError naming the known ones if unknown)."""
    if name not in _BUILDERS:
        _load_arch_modules()
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
