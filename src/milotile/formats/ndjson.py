"""CryoET Data Portal point annotations (newline-delimited JSON).

One JSON object per line, ``{"type": "point", "location": {"x": .., "y": .., "z": ..}}`` with the
location in **voxels** of the annotation's voxel spacing (``orientedPoint`` and ``instancePoint``
rows are read too; their extra fields are ignored). milotile writes one file per tomogram and
object: ``<out>/<tomogram>/<object>.ndjson``; reading that folder gives back tomogram and class.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import DEFAULT_CLASS, as_path, concat_tables, make_table, safe_name

log = logging.getLogger(__name__)

_TYPES = ("point", "orientedPoint", "instancePoint")


def read_ndjson_file(
    path: str | os.PathLike, *, tomogram: str | None = None, class_name: str | None = None
) -> pd.DataFrame:
    """Read one portal ndjson point file.

    Parameters
    ----------
    path : path-like
        ``.ndjson`` file.
    tomogram : str, optional
        Tomogram name; default the file stem.
    class_name : str, optional
        Class for every point (default ``"particle"``).

    Returns
    -------
    pandas.DataFrame
        Standard label table in voxels (``score`` when the rows carry one).
    """
    path = as_path(path)
    xyz, score = [], []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if row.get("type", "point") not in _TYPES:
                    continue
                loc = row["location"]
                xyz.append([float(loc["x"]), float(loc["y"]), float(loc["z"])])
                score.append(float(row.get("score", np.nan)))
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise InputError(f"ndjson file {path} line {lineno} is not a point annotation ({exc}).") from exc
    sc = np.asarray(score, dtype=np.float64)
    return concat_tables(
        [
            make_table(
                tomogram or path.stem,
                np.asarray(xyz, dtype=np.float64).reshape(-1, 3),
                class_name or DEFAULT_CLASS,
                None if np.isnan(sc).all() else sc,
            )
        ]
    )


def read_ndjson(
    path: str | os.PathLike, *, tomogram: str | None = None, class_name: str | None = None
) -> pd.DataFrame:
    """Read a portal ndjson file, or a folder ``<tomogram>/<object>.ndjson`` as written by milotile."""
    path = as_path(path)
    if path.is_file():
        return read_ndjson_file(path, tomogram=tomogram, class_name=class_name)
    tables = []
    for f in sorted(path.glob("*/*.ndjson")):
        tables.append(read_ndjson_file(f, tomogram=f.parent.name, class_name=class_name or f.stem))
    for f in sorted(path.glob("*.ndjson")):
        tables.append(read_ndjson_file(f, tomogram=tomogram or f.stem, class_name=class_name))
    if not tables:
        raise InputError(f"Folder {path} holds no .ndjson files.")
    return concat_tables(tables)


def write_ndjson(
    picks: pd.DataFrame, out: str | os.PathLike, *, object_name: str | None = None, with_score: bool = False
) -> list[Path]:
    """Write ``<out>/<tomogram>/<object>.ndjson`` point annotations in voxels.

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` (voxels), optional ``class`` and ``score``.
    out : path-like
        Output folder.
    object_name : str, optional
        File stem for all picks; default the ``class`` column.
    with_score : bool
        Add a ``score`` field to each row (not part of the portal schema; off by default).

    Returns
    -------
    list of Path
        The files written.
    """
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)  # an empty pick set still gives its (empty) export folder
    picks = picks.copy()
    if object_name is not None:
        picks["class"] = object_name
    elif "class" not in picks.columns:
        picks["class"] = DEFAULT_CLASS
    written = []
    for (run, obj), g in picks.groupby([picks["tomogram"].astype(str), picks["class"].astype(str)], sort=True):
        d = out / safe_name(run)
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{safe_name(obj)}.ndjson"
        xyz = g[["x", "y", "z"]].to_numpy(dtype=np.float64)
        scores = g["score"].to_numpy(dtype=np.float64) if with_score and "score" in g.columns else None
        with open(f, "w", encoding="utf-8") as fh:
            for i, p in enumerate(xyz):
                row: dict = {"type": "point", "location": {"x": float(p[0]), "y": float(p[1]), "z": float(p[2])}}
                if scores is not None:
                    row["score"] = float(scores[i])
                fh.write(json.dumps(row) + "\n")
        written.append(f)
    log.info("wrote %d ndjson files under %s", len(written), out)
    return written
