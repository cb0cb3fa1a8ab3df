"""Exceptions raised by milotile."""

from __future__ import annotations


class InputError(ValueError):
    """Bad user input: one sentence naming the file, line or value.

    The CLI prints the message without a traceback and exits with status 2.
    """


class StoreError(RuntimeError):
    """The collection store is missing something a stage needs, or is in an inconsistent state."""
