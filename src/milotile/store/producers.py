"""Which command makes each input a stage reads: one table, so every missing-input error names it.

A stage that finds an input missing raises :func:`missing_input` (``"<store> has no table
'segment-features'; run `milotile segments features` first"``). Names are table names
(``tables/<name>.parquet``) or store paths (``derived/preprocessed``, ``patches/<key>``); ``*`` matches
any key.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from milotile.errors import InputError

__all__ = ["PRODUCERS", "missing_input", "producer"]

#: ``(pattern, command)``: the first pattern matching a table name or a store path wins.
PRODUCERS: tuple[tuple[str, str], ...] = (
    ("tomograms*", "milotile ingest"),
    ("tilts*", "milotile ingest (with the tilt series' .tlt beside it)"),
    ("derived/preprocessed*", "milotile preprocess"),
    ("derived/stats*", "milotile preprocess"),
    ("derived/heatmaps*", "milotile refine pick"),
    ("candidates", "milotile mine"),
    ("patches-*", "milotile patches"),
    ("patches*", "milotile patches"),
    ("embeddings-*", "milotile explore embed"),
    ("embeddings*", "milotile explore embed"),
    ("atlas*", "milotile explore atlas"),
    ("labels-*", "milotile explore select"),
    ("picks", "milotile refine pick"),
    ("fibers", "milotile refine pick --fiber"),
    ("copick-picks", "milotile ingest <copick_config.json>"),
    ("segments*", "milotile segments ingest"),
    ("objects", "milotile segments index"),
    ("segment-features", "milotile segments features"),
    ("segment-clusters", "milotile segments cluster"),
    ("segment-*", "milotile segments embed --kind {key}"),
)


def producer(name: str) -> str | None:
    """The command that writes the table or store path ``name`` (``None`` when unknown).

    Examples
    --------
    >>> producer("segment-features")
    'milotile segments features'
    >>> producer("segment-pointae")
    'milotile segments embed --kind pointae'
    """
    name = str(name).removeprefix("tables/").removesuffix(".parquet")
    for pattern, command in PRODUCERS:
        if fnmatchcase(name, pattern):
            key = name.split("-", 1)[1] if "-" in name else name
            return command.format(key=key)
    return None


def missing_input(url: str, name: str, what: str = "table") -> InputError:
    """The one-sentence error for a missing input ``name`` of the store ``url``, naming its producer."""
    cmd = producer(name)
    hint = f"; run `{cmd}` first" if cmd else "; run the stage that writes it first"
    return InputError(f"{url} has no {what} {name!r}{hint}")
