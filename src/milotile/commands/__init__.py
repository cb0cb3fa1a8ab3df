"""Sub-commands of the ``milotile`` CLI; each module exposes ``register(subparsers)``."""

from __future__ import annotations

import argparse


def parse_floats(text: str, n: int | None = None, what: str = "value") -> tuple[float, ...]:
    """Parse ``"3,5"`` into ``(3.0, 5.0)``; argparse reports a bad value with its name."""
    try:
        vals = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if n is not None and len(vals) != n:
        raise argparse.ArgumentTypeError(f"{what} needs {n} comma-separated numbers, got {text!r}")
    return vals


def parse_ints(text: str, n: int | None = None, what: str = "value") -> tuple[int, ...]:
    """Parse ``"128,256,256"`` into ints."""
    vals = parse_floats(text, n, what)
    if any(v != int(v) for v in vals):
        raise argparse.ArgumentTypeError(f"{what} must be integers, got {text!r}")
    return tuple(int(v) for v in vals)
