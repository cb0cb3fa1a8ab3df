"""Training labels of the picker: read, validate against the collection, map classes to channels."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats import read_labels, validate_labels

logger = logging.getLogger(__name__)

__all__ = ["class_index", "load_label_table"]


def load_label_table(labels: pd.DataFrame | str | os.PathLike[str], col: Any, what: str = "labels") -> pd.DataFrame:
    """Read (if a path) and validate a label table against the collection.

    Returns a table ``tomogram, x, y, z, class`` (level-0 voxels). A ``species`` column is used as the
    class when there is no ``class`` column. Raises :class:`InputError` for unknown tomograms, points
    outside the volume, a probable axis-order mix-up or an empty table.
    """

    if isinstance(labels, (str, os.PathLike)):
        df = read_labels(labels, col)
    elif isinstance(labels, pd.DataFrame):
        df = labels.copy()
    else:
        raise InputError(f"{what} must be a DataFrame or a path, got {type(labels).__name__}.")
    if "class" not in df.columns and "species" in df.columns:
        df = df.rename(columns={"species": "class"})
    if len(df) == 0:
        raise InputError(f"The {what} table holds no particles; there are zero positives to train from.")
    df = validate_labels(df, col)
    df["tomogram"] = df["tomogram"].astype(str)
    df["class"] = df["class"].astype(str)
    return df.reset_index(drop=True)

def class_index(df: pd.DataFrame, classes: Sequence[str] | bool | None) -> tuple[pd.DataFrame, list[str]]:
    """Add the output channel ``cls`` of every label; returns the table and the channel names.

    ``None``/``False``: one channel for all labels; ``True``/``"all"``: one per ``class`` value; or a
    list of class names (labels of other classes are dropped with a warning).
    """
    if classes is None or classes is False:
        out = df.copy()
        out["cls"] = 0
        names = sorted(set(df["class"]))
        return out, ["+".join(names) if len(names) <= 3 else "particle"]
    if classes is True or classes == "all":
        names = sorted(set(df["class"]))
    else:
        names = [str(c) for c in classes]
        missing = [c for c in names if c not in set(df["class"])]
        if missing:
            raise InputError(f"Class(es) {missing} have no labelled particles (labels have {sorted(set(df['class']))}).")
    out = df[df["class"].isin(names)].copy()
    dropped = len(df) - len(out)
    if dropped:
        logger.warning("ignoring %d labels of classes not in %s", dropped, names)
    out["cls"] = out["class"].map({c: i for i, c in enumerate(names)}).astype(np.int64)
    return out, names
