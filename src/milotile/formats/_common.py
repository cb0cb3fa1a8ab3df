"""Shared helpers for coordinate import/export: collection look-ups, axis orders, tidy tables."""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

log = logging.getLogger(__name__)

#: Columns every label table returned by :func:`milotile.formats.read_labels` has.
LABEL_COLUMNS = ["tomogram", "x", "y", "z", "class"]
#: Class name used when a file carries no species / object name.
DEFAULT_CLASS = "particle"
#: Column orders accepted for legacy coordinate files (which coordinate each column holds).
ORDERS = ("xyz", "xzy", "zxy", "yxz")
#: Header names of the tomogram column of a label table, in order of preference (case-insensitive).
NAME_COLUMNS = ("tomogram", "image_name", "tomo", "tomo_name", "tomogram_name", "name", "rlntomoname",
                "rlnmicrographname", "run")
#: Header names of the three coordinate columns (x, y, z), in order of preference (case-insensitive).
XYZ_COLUMNS = (("x", "y", "z"), ("x_coord", "y_coord", "z_coord"),
               ("rlncoordinatex", "rlncoordinatey", "rlncoordinatez"),
               ("coordinate_x", "coordinate_y", "coordinate_z"), ("coord_x", "coord_y", "coord_z"))
#: A single column holding ``[x, y, z]`` (MiLoPYP's Phoenix export).
COORD_COLUMN = "coord"
#: The headed layouts every label reader accepts, for refusals (one phrase).
HEADED_FORMS = (
    "a header row (tab-, comma- or space-separated) with a tomogram column (tomogram, image_name, tomo, name, "
    "rlnTomoName) and coordinates (x y z, x_coord y_coord z_coord, rlnCoordinateX/Y/Z, or coord = [x, y, z])"
)


def headed_columns(columns: Iterable[str]) -> tuple[str | None, tuple[str, str, str] | str | None]:
    """Find the tomogram column and the coordinate columns among the header names ``columns``.

    Returns ``(name column or None, (x, y, z) columns | "coord" | None)`` with the names as written
    in the header (matching is case-insensitive; see :data:`NAME_COLUMNS`, :data:`XYZ_COLUMNS`).
    """
    cols = [str(c) for c in columns]
    lower = {c.strip().lower(): c for c in reversed(cols)}
    name = next((lower[n] for n in NAME_COLUMNS if n in lower), None)
    for triple in XYZ_COLUMNS:
        if all(a in lower for a in triple):
            return name, (lower[triple[0]], lower[triple[1]], lower[triple[2]])
    if COORD_COLUMN in lower:
        return name, lower[COORD_COLUMN]
    return name, None


@dataclass(frozen=True)
class TomoInfo:
    """Geometry of one tomogram of a collection: ``shape`` is ``(Z, Y, X)`` at level 0."""

    name: str
    shape: tuple[int, int, int]
    voxel_size: float


def open_collection(col: Any) -> Any:
    """Return a collection object for ``col`` (a collection, a store path, or ``None``)."""
    if col is None:
        return None
    if isinstance(col, (str, os.PathLike)):
        from milotile.store import (
            as_collection,  # local import: formats load without opening a store
        )

        return as_collection(col, mode="r")
    return col


def collection_info(col: Any) -> dict[str, TomoInfo]:
    """Map tomogram name -> :class:`TomoInfo` for a collection (empty for ``None``).

    Works with any object exposing ``names`` and ``col[name].shape`` / ``.voxel_size``.
    """
    col = open_collection(col)
    if col is None:
        return {}
    out: dict[str, TomoInfo] = {}
    for name in col.names:
        t = col[name]
        shape = tuple(int(s) for s in t.shape)[-3:]
        out[str(name)] = TomoInfo(str(name), shape, float(t.voxel_size))  # type: ignore[arg-type]
    return out


def check_order(order: str | None, what: str) -> str:
    """Validate a legacy column order string such as ``"xzy"``."""
    if order is None:
        raise InputError(
            f"{what} holds bare coordinate columns without a header; pass order='xyz', 'xzy' or 'zxy' (--order) "
            "to say which coordinate each column is, or give the file a header row naming its columns "
            "(tomogram/image_name, x, y, z)."
        )
    order = str(order).lower()
    if order not in ORDERS:
        raise InputError(f"Unknown coordinate order {order!r}; expected one of {', '.join(ORDERS)}.")
    return order


def columns_to_xyz(cols: np.ndarray, order: str) -> np.ndarray:
    """Reorder an ``(N, 3)`` array whose columns follow ``order`` into ``(N, 3)`` x, y, z."""
    idx = {axis: order.index(axis) for axis in "xyz"}
    return np.stack([cols[:, idx["x"]], cols[:, idx["y"]], cols[:, idx["z"]]], axis=1)


def xyz_to_columns(xyz: np.ndarray, order: str) -> np.ndarray:
    """Inverse of :func:`columns_to_xyz`: put x, y, z into the columns named by ``order``."""
    pos = {"x": 0, "y": 1, "z": 2}
    return np.stack([xyz[:, pos[axis]] for axis in order], axis=1)


def make_table(
    tomogram: Iterable[str] | str,
    xyz: np.ndarray,
    cls: Iterable[str] | str | None = None,
    score: Iterable[float] | None = None,
) -> pd.DataFrame:
    """Build a label table with the standard columns (plus ``score`` when given)."""
    xyz = np.asarray(xyz, dtype=np.float64).reshape(-1, 3)
    n = len(xyz)
    if isinstance(tomogram, str):
        tomogram = [tomogram] * n
    if cls is None:
        cls = DEFAULT_CLASS
    if isinstance(cls, str):
        cls = [cls] * n
    df = pd.DataFrame(
        {
            "tomogram": pd.Series(list(tomogram), dtype=object).astype(str),
            "x": xyz[:, 0],
            "y": xyz[:, 1],
            "z": xyz[:, 2],
            "class": pd.Series(list(cls), dtype=object).astype(str),
        }
    )
    if score is not None:
        df["score"] = np.asarray(list(score), dtype=np.float64)
    return df


def empty_table() -> pd.DataFrame:
    """A label table with no rows."""
    return make_table([], np.zeros((0, 3)))


def concat_tables(tables: list[pd.DataFrame]) -> pd.DataFrame:
    """Concatenate label tables; an empty list gives an empty table."""
    tables = [t for t in tables if len(t)]
    if not tables:
        return empty_table()
    df = pd.concat(tables, ignore_index=True)
    if "score" in df.columns and df["score"].isna().all():
        df = df.drop(columns="score")
    return df


def rescale(df: pd.DataFrame, factors: dict[str, float]) -> pd.DataFrame:
    """Multiply x, y, z of the rows of each tomogram by a per-tomogram factor (missing = 1)."""
    if not factors or all(math.isclose(f, 1.0) for f in factors.values()):
        return df
    f = df["tomogram"].map(factors).fillna(1.0).to_numpy(dtype=np.float64)
    df = df.copy()
    for axis in "xyz":
        df[axis] = df[axis].to_numpy(dtype=np.float64) * f
    return df


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str) -> str:
    """A file-system friendly version of a tomogram / class name."""
    return _SAFE.sub("-", str(name)).strip("-") or "unnamed"


def output_file(out: str | os.PathLike, suffix: str, default_name: str) -> Path:
    """The file an exporter writes for ``--out out``: one rule for every single-file format.

    ``out`` is a folder (``<out>/<default_name>``) when it is an existing folder, ends with a path
    separator or has no file suffix (``--out dir/csv`` is the folder ``dir/csv``); a path with the
    format's ``suffix`` is that file; another suffix is replaced by ``suffix``.
    """
    raw = os.fspath(out)
    path = as_path(raw)
    if raw.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return path / default_name
    if path.suffix.lower() != suffix:
        log.warning("output %s: writing %s (the %s format's suffix)", path, path.with_suffix(suffix).name, suffix)
        return path.with_suffix(suffix)
    return path


def as_path(path: str | os.PathLike) -> Path:
    """``Path`` with ``~`` expanded."""
    return Path(os.fspath(path)).expanduser()
