"""copick picks JSON (no dependency on the ``copick`` package).

Layout (copick's data model, ``docs/datamodel.md``)::

    <root>/copick_config.json
    <root>/ExperimentRuns/<run>/Picks/<user_id>_<session_id>_<object_name>.json

A picks file holds ``pickable_object_name``, ``user_id``, ``session_id``, ``run_name``,
``voxel_spacing``, ``unit: "angstrom"`` and ``points``: each with ``location`` ``{x, y, z}`` in Å
from the volume corner, a 4x4 ``transformation_`` (identity here), ``instance_id`` and ``score``.
milotile maps Å and voxels with ``x_A = x * voxel_size`` (voxel centres at integers, so copick's
``floor(Å / spacing)`` gives back the voxel index). Object names, user ids and session ids must
not contain underscores (they are separated by underscores in the file name).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import TomoInfo, as_path, concat_tables, make_table

log = logging.getLogger(__name__)

_IDENTITY = [[1.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]]
_NAME_RE = re.compile(r"^[A-Za-z0-9.\-]+$")
_REQUIRED = ("pickable_object_name", "user_id", "session_id", "run_name", "points")


def check_copick_name(value: str, what: str) -> str:
    """Raise :class:`InputError` unless ``value`` is a valid copick name (no underscores)."""
    value = str(value)
    if not value or not _NAME_RE.match(value):
        raise InputError(
            f"copick {what} {value!r} is invalid: use letters, digits, '-' or '.', and no underscores."
        )
    return value


def validate_picks_json(doc: dict[str, Any], source: str = "picks JSON") -> None:
    """Check a picks document against copick's ``CopickPicksFile`` schema (the parts milotile uses).

    Raises
    ------
    InputError
        Naming the first missing or malformed field.
    """
    if not isinstance(doc, dict):
        raise InputError(f"{source} is not a JSON object.")
    for key in _REQUIRED:
        if key not in doc:
            raise InputError(f"{source} lacks the field {key!r}.")
    if doc.get("unit", "angstrom") != "angstrom":
        raise InputError(f"{source} has unit {doc.get('unit')!r}; copick picks are in 'angstrom'.")
    if not isinstance(doc["points"], list):
        raise InputError(f"{source} field 'points' is not a list.")
    for i, p in enumerate(doc["points"]):
        loc = p.get("location") if isinstance(p, dict) else None
        if not isinstance(loc, dict) or not all(isinstance(loc.get(a), (int, float)) for a in "xyz"):
            raise InputError(f"{source} point {i} has no numeric location x, y, z.")
        t = p.get("transformation_", _IDENTITY)
        arr = np.asarray(t, dtype=np.float64)
        if arr.shape != (4, 4) or not np.allclose(arr[3], [0, 0, 0, 1]):
            raise InputError(f"{source} point {i} has a transformation_ that is not a 4x4 affine matrix.")


def _config_root(path: Path) -> Path:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"copick config {path} could not be read ({exc}).") from exc
    root = str(cfg.get("overlay_root") or "")
    if root.startswith("local://"):
        return Path(root[len("local://") :])
    return path.parent


def read_copick(
    path: str | os.PathLike,
    info: dict[str, TomoInfo] | None = None,
    *,
    voxel_size: float | None = None,
    user_id: str | None = None,
    session_id: str | None = None,
    object_name: str | None = None,
) -> pd.DataFrame:
    """Read copick picks (a project root, its ``copick_config.json`` or one picks JSON).

    Parameters
    ----------
    path : path-like
        copick root folder, config file, or a single picks file.
    info : dict, optional
        Collection geometry; its voxel size converts Å to voxels for runs it knows.
    voxel_size : float, optional
        Voxel size (Å) for runs the collection does not give; otherwise the file's ``voxel_spacing``.
    user_id, session_id, object_name : str, optional
        Read only matching picks files.

    Returns
    -------
    pandas.DataFrame
        Standard label table (``class`` = ``pickable_object_name``, ``score`` from the points).
    """
    path = as_path(path)
    if path.is_dir():
        files = sorted(path.glob("ExperimentRuns/*/Picks/*.json"))
        if not files:
            raise InputError(f"copick project {path} holds no ExperimentRuns/<run>/Picks/*.json files.")
    elif path.name == "copick_config.json":
        return read_copick(
            _config_root(path), info, voxel_size=voxel_size, user_id=user_id, session_id=session_id,
            object_name=object_name,
        )
    else:
        files = [path]
    info = info or {}
    tables = []
    for f in files:
        try:
            doc = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"copick picks file {f} could not be read ({exc}).") from exc
        validate_picks_json(doc, f"copick picks file {f}")
        if user_id is not None and doc["user_id"] != user_id:
            continue
        if session_id is not None and str(doc["session_id"]) != str(session_id):
            continue
        if object_name is not None and doc["pickable_object_name"] != object_name:
            continue
        run = str(doc["run_name"])
        if run in info:
            vs = info[run].voxel_size
        elif voxel_size:
            vs = float(voxel_size)
        elif doc.get("voxel_spacing"):
            vs = float(doc["voxel_spacing"])
        else:
            raise InputError(
                f"copick picks file {f} has no voxel_spacing; pass voxel_size (--voxel-size) or a collection."
            )
        pts = doc["points"]
        loc = np.array([[p["location"][a] for a in "xyz"] for p in pts], dtype=np.float64).reshape(-1, 3)
        score = [float(p.get("score", 1.0)) for p in pts]
        tables.append(make_table(run, loc / vs, str(doc["pickable_object_name"]), score))
    return concat_tables(tables)


def write_copick(
    picks: pd.DataFrame,
    out: str | os.PathLike,
    info: dict[str, TomoInfo],
    *,
    user_id: str = "milotile",
    session_id: str = "0",
    object_name: str | None = None,
    voxel_sizes: dict[str, float] | None = None,
) -> list[Path]:
    """Write picks into a copick project tree (one picks JSON per run and object).

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` (voxels), optional ``class`` and ``score``.
    out : path-like
        copick root (overlay) folder; a ``copick_config.json`` is written when none exists.
    info : dict
        Collection geometry (voxel size per tomogram).
    user_id, session_id : str
        copick user and session ids (``"0"`` marks tool output).
    object_name : str, optional
        Object name for all picks; default the ``class`` column (``particle`` when absent).
    voxel_sizes : dict, optional
        Voxel size per tomogram when there is no collection.

    Returns
    -------
    list of Path
        The picks files written.
    """
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_copick_name(user_id, "user_id")
    check_copick_name(session_id, "session_id")
    picks = picks.copy()
    if object_name is not None:
        picks["class"] = object_name
    elif "class" not in picks.columns:
        picks["class"] = "particle"
    objects = sorted(picks["class"].astype(str).unique())
    for obj in objects:
        check_copick_name(obj, "object name")
    written = []
    spacings: set[float] = set()
    for (run, obj), g in picks.groupby([picks["tomogram"].astype(str), picks["class"].astype(str)], sort=True):
        if voxel_sizes and run in voxel_sizes:
            vs = float(voxel_sizes[run])
        elif run in info:
            vs = info[run].voxel_size
        else:
            raise InputError(f"copick export needs the voxel size of tomogram {run!r}; give the collection (--store).")
        spacings.add(round(vs, 3))
        xyz_a = g[["x", "y", "z"]].to_numpy(dtype=np.float64) * vs
        scores = g["score"].to_numpy(dtype=np.float64) if "score" in g.columns else np.ones(len(g))
        points = [
            {
                "location": {"x": float(p[0]), "y": float(p[1]), "z": float(p[2])},
                "transformation_": _IDENTITY,
                "instance_id": 0,
                "score": float(s),
            }
            for p, s in zip(xyz_a, scores, strict=True)
        ]
        doc = {
            "pickable_object_name": obj,
            "user_id": user_id,
            "session_id": session_id,
            "run_name": run,
            "voxel_spacing": vs,
            "unit": "angstrom",
            "trust_orientation": False,
            "points": points,
        }
        d = out / "ExperimentRuns" / run / "Picks"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"{user_id}_{session_id}_{obj}.json"
        f.write_text(json.dumps(doc, indent=1))
        written.append(f)
    cfg = out / "copick_config.json"
    if not cfg.exists():
        config = {
            "config_type": "filesystem",
            "name": "milotile export",
            "description": "Picks exported by milotile.",
            "version": "0.1.0",
            "pickable_objects": [
                {"name": obj, "is_particle": True, "label": i + 1, "color": [255, 0, 0, 255]}
                for i, obj in enumerate(objects)
            ],
            "user_id": user_id,
            "session_id": session_id,
            "overlay_root": f"local://{out.resolve()}",
            "overlay_fs_args": {"auto_mkdir": True},
        }
        if spacings:
            config["voxel_spacings"] = sorted(spacings)
        cfg.write_text(json.dumps(config, indent=2))
    log.info("wrote %d copick picks files under %s", len(written), out)
    return written
