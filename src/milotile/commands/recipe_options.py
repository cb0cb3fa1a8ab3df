"""Command-line options built from a recipe dataclass (:mod:`milotile.recipe`).

Every :func:`milotile.recipe.option` field of a recipe becomes one flag whose help ends with the
recipe's default, so ``--help``, the API and the checkpoint contract show the same defaults. Flags
default to :data:`argparse.SUPPRESS`: only the options a user gives override the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, TypeVar

from milotile.recipe import Recipe, option_meta

__all__ = ["add_recipe_options", "recipe_from_args"]

R = TypeVar("R", bound=Recipe)


def add_recipe_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[Recipe], *,
                       skip: tuple[str, ...] = ()) -> None:
    """Add one option per command-line field of the recipe class ``cls`` (fields in ``skip`` excepted)."""
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = option_meta(f)
        if not meta["cli"] or f.name in skip:
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        shown = _shown(f.default)
        help_text = f"{meta['help']} (default {shown})" if "default" not in meta["help"] else meta["help"]
        kw: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text.replace("%", "%%")}
        if isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            continue
        parse = meta["parse"] or type(f.default)
        if f.default is None and meta["parse"] is None:
            raise TypeError(f"recipe field {cls.__name__}.{f.name} needs a parser (its default is None)")
        kw["type"] = parse
        if meta["choices"]:
            kw["choices"] = meta["choices"]
        if meta["metavar"]:
            kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kw)


def recipe_from_args(cls: type[R], args: argparse.Namespace, base: R | None = None) -> R:
    """The recipe ``base`` (default: the class defaults) with the options given on the command line."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)  # type: ignore[arg-type]
             if option_meta(f)["cli"] and hasattr(args, f.name)}
    return (base if base is not None else cls()).replace(**given)


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "from the data" if value is None else str(value)
