"""Training recipes: one frozen dataclass per model, defaults in one place.

A recipe (:class:`milotile.refine.recipe.PickerRecipe`, :class:`milotile.explore.recipe.ExploreRecipe`)
holds every hyper-parameter of one model's training. Its fields are declared with :func:`option`, whose
metadata (help text, CLI flag, parser, choices) the command line reads to build its options, so the
defaults, the ``--help`` text, the benchmarks and the checkpoint contract cannot drift apart:

* defaults live on the dataclass (each one's docstring names the benchmark that chose it);
* :meth:`Recipe.validate` runs once, when the recipe is made, and raises :class:`InputError` naming
  the field and the value;
* :meth:`Recipe.to_dict` / :meth:`Recipe.from_dict` store it in a checkpoint's contract and read it
  back (unknown keys of a newer or older checkpoint are reported, not fatal);
* :meth:`Recipe.replace` applies keyword overrides (an unknown name is an :class:`InputError` that
  lists the valid ones), which is how ``train(col, labels, epochs=5)`` keeps working.

This module imports neither torch nor the stages, so the CLI can build its options from a recipe
without paying for them.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from milotile.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["Recipe", "option", "option_meta"]

R = TypeVar("R", bound="Recipe")


def option(default: Any, help: str, *, flag: str | None = None, parse: Callable[[str], Any] | None = None,
           choices: Sequence[Any] | None = None, metavar: str | None = None, cli: bool = True) -> Any:
    """Declare a recipe field.

    Parameters
    ----------
    default
        The default value (immutable: numbers, strings, tuples, None).
    help
        One line for ``--help`` (the default is appended by the CLI).
    flag
        Command-line flag (default ``--<name with dashes>``).
    parse
        Parser of the flag's text (default: the type of ``default``; required when it is None).
    choices, metavar
        As in :meth:`argparse.ArgumentParser.add_argument`.
    cli
        False: the field is set through the Python API only.
    """
    meta = {"help": help, "flag": flag, "parse": parse, "choices": tuple(choices) if choices else None,
            "metavar": metavar, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


def option_meta(f: dataclasses.Field) -> dict[str, Any]:
    """The :func:`option` metadata of a recipe field (empty values when it has none)."""
    return {"help": "", "flag": None, "parse": None, "choices": None, "metavar": None, "cli": True, **f.metadata}


class Recipe:
    """Base of the frozen recipe dataclasses (see the module notes)."""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`InputError` for an invalid field (subclasses check their own fields)."""

    def _set(self, name: str, value: Any) -> None:
        """Normalise a field inside ``validate`` (the dataclass is frozen)."""
        object.__setattr__(self, name, value)

    @classmethod
    def field_names(cls) -> list[str]:
        """Names of every field, in declaration order."""
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    def replace(self: R, **changes: Any) -> R:
        """A copy with ``changes`` applied (validated); an unknown name raises :class:`InputError`."""
        names = self.field_names()
        unknown = [k for k in changes if k not in names]
        if unknown:
            hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else repr(k)
                     for k in unknown]
            raise InputError(f"{type(self).__name__} has no option {', '.join(hints)}; its options are "
                             f"{', '.join(names)}.")
        return dataclasses.replace(self, **changes)  # type: ignore[type-var]

    def to_dict(self) -> dict[str, Any]:
        """The recipe as JSON values (tuples become lists)."""
        return {k: _plain(v) for k, v in dataclasses.asdict(self).items()}  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[R], data: Mapping[str, Any] | None) -> R:
        """A recipe from :meth:`to_dict` output; keys this version does not know are logged and skipped,
        fields the data lacks keep today's default."""
        data = dict(data or {})
        names = cls.field_names()
        extra = sorted(k for k in data if k not in names)
        if extra:
            logger.warning("%s: ignoring option(s) %s stored by another milotile version", cls.__name__, extra)
        return cls(**{k: _tuples(v) for k, v in data.items() if k in names})

    def changed(self) -> dict[str, Any]:
        """The fields that differ from the class defaults."""
        base = type(self)()
        return {k: v for k, v in self.to_dict().items() if v != _plain(getattr(base, k))}


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def _tuples(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    return v
