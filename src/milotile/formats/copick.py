"""copick projects: picks JSON, tomograms and the config (no dependency on the ``copick`` package).

Layout (copick's data model, ``docs/datamodel.md``)::

    <root>/copick_config.json
    <root>/ExperimentRuns/<run>/Picks/<user_id>_<session_id>_<object_name>.json
    <root>/ExperimentRuns/<run>/VoxelSpacing<size:.3f>/<tomo_type>.zarr   OME-NGFF 0.4, Zarr v2

:func:`write_copick` writes a complete project: the config (``pickable_objects`` with label,
colour and radius in Å; ``overlay_root`` the project's absolute folder, ``local:///abs/path``, unless
one is chosen), the picks
and, given the collection, every tomogram as a 3-level NGFF 0.4 / Zarr v2 multiscale (what copick
1.x with zarr 2 and the CryoET Data Portal read), written chunk by chunk.
copick 1.31 resolves a relative ``overlay_root`` (``local://.``) against the *working directory*, so a
project with it opens empty from any other folder; the default is therefore absolute. A relative root
(``overlay_root="local://."``) keeps the tree movable for users who run copick from the project
folder; milotile itself resolves a relative root against the config file's folder.

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
from milotile.store.copick_tree import config_roots, is_copick_config, read_config

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
    return config_roots(path)[0]


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
    elif path.name == "copick_config.json" or is_copick_config(path):
        roots = [r for r in config_roots(path) if r.is_dir()]
        if not any(r.glob("ExperimentRuns/*/Picks/*.json") for r in roots):
            raise InputError(f"copick project {path} holds no ExperimentRuns/<run>/Picks/*.json files.")
        return concat_tables([
            read_copick(r, info, voxel_size=voxel_size, user_id=user_id, session_id=session_id,
                        object_name=object_name)
            for r in roots if any(r.glob("ExperimentRuns/*/Picks/*.json"))
        ])
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


def _voxel_size_of(run: str, info: dict[str, TomoInfo], voxel_sizes: dict[str, float] | None) -> float:
    if voxel_sizes and run in voxel_sizes:
        return float(voxel_sizes[run])
    if run in info:
        return info[run].voxel_size
    raise InputError(f"copick export needs the voxel size of tomogram {run!r}; give the collection (--store).")


def spacing_folder(voxel_size: float) -> str:
    """copick's voxel-spacing folder name: ``VoxelSpacing`` + the size in Å with 3 decimals."""
    return f"VoxelSpacing{float(voxel_size):.3f}"


def write_copick(
    picks: pd.DataFrame,
    out: str | os.PathLike,
    info: dict[str, TomoInfo],
    *,
    user_id: str = "milotile",
    session_id: str = "0",
    object_name: str | None = None,
    voxel_sizes: dict[str, float] | None = None,
    col: Any = None,
    tomo_type: str = "wbp",
    overlay_root: str | None = None,
    radius: float | dict[str, float] | None = None,
) -> list[Path]:
    """Write a copick project: config, picks JSON and (given ``col``) the tomograms.

    Parameters
    ----------
    picks : pandas.DataFrame
        Picks with ``tomogram, x, y, z`` (voxels), optional ``class``, ``score`` and ``radius``.
    out : path-like
        Project folder; an existing ``copick_config.json`` is kept and only gains missing objects.
    info : dict
        Collection geometry (voxel size per tomogram).
    user_id, session_id : str
        copick user and session ids (``"0"`` marks tool output).
    object_name : str, optional
        Object name for all picks; default the ``class`` column (``particle`` when absent).
    voxel_sizes : dict, optional
        Voxel size per tomogram when there is no collection.
    col : Collection, optional
        The collection: every tomogram is written as ``ExperimentRuns/<run>/VoxelSpacing<s>/<tomo_type>.zarr``.
    tomo_type : str
        copick tomogram type of the written volumes (``wbp``, ``denoised``...).
    overlay_root : str, optional
        ``overlay_root`` of a new config (e.g. ``local://.`` or ``s3://...``); default the absolute
        output folder ``local:///abs/out``, which copick opens from any working directory.
    radius : float or dict, optional
        Particle radius in Å (one, or per object) for ``pickable_objects``; default the picks'
        ``radius`` column (voxels) times the voxel size, when present.

    Returns
    -------
    list of Path
        The picks files, tomogram folders and config written.
    """
    out = as_path(out)
    out.mkdir(parents=True, exist_ok=True)
    check_copick_name(user_id, "user_id")
    check_copick_name(session_id, "session_id")
    check_copick_name(tomo_type, "tomogram type")
    picks = picks.copy()
    if object_name is not None:
        picks["class"] = object_name
    elif "class" not in picks.columns:
        picks["class"] = "particle"
    objects = sorted(picks["class"].astype(str).unique())
    for obj in objects:
        check_copick_name(obj, "object name")
    written: list[Path] = []
    spacings: set[float] = set()
    radii: dict[str, float] = {}
    for (run, obj), g in picks.groupby([picks["tomogram"].astype(str), picks["class"].astype(str)], sort=True):
        vs = _voxel_size_of(run, info, voxel_sizes)
        spacings.add(round(vs, 3))
        if "radius" in g.columns and obj not in radii and np.isfinite(g["radius"]).any():
            radii[obj] = float(np.nanmedian(g["radius"].to_numpy(np.float64))) * vs
        written.append(_write_picks_file(out, run, obj, g, vs, user_id, session_id))
    if col is not None and hasattr(col, "zarr_group"):  # a real collection store (not geometry only)
        for name in col.names:
            t = col[name]
            spacings.add(round(t.voxel_size, 3))
            written.append(write_copick_tomogram(t, out, tomo_type=tomo_type))
    if isinstance(radius, dict):
        radii.update({k: float(v) for k, v in radius.items()})
    elif radius is not None:
        radii = {o: float(radius) for o in objects}
    written.append(_write_config(out, objects, radii, spacings, user_id, session_id, overlay_root))
    log.info("wrote copick project %s (%d files/folders)", out, len(written))
    return written


def _write_picks_file(out: Path, run: str, obj: str, g: pd.DataFrame, vs: float, user_id: str,
                      session_id: str) -> Path:
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
    return f


def write_copick_tomogram(t: Any, out: str | os.PathLike, *, tomo_type: str = "wbp") -> Path:
    """Write one collection tomogram (all its pyramid levels) into a copick tree as NGFF 0.4 / Zarr v2.

    Parameters
    ----------
    t : Tomogram
        A collection tomogram (``name``, ``voxel_size``, ``levels``, ``data(level)``).
    out : path-like
        copick project folder.
    tomo_type : str
        copick tomogram type (the ``.zarr`` folder name).

    Returns
    -------
    Path
        ``<out>/ExperimentRuns/<name>/VoxelSpacing<s>/<tomo_type>.zarr``.
    """
    from milotile.store.ngff import write_ngff04

    dest = as_path(out) / "ExperimentRuns" / t.name / spacing_folder(t.voxel_size) / f"{tomo_type}.zarr"
    dest.parent.mkdir(parents=True, exist_ok=True)
    levels = [t.data(level) for level in t.levels]
    write_ngff04(levels, dest, voxel_size=t.voxel_size, name=t.name,
                 attributes={"milotile": {"tomogram": t.name, "tomo_type": tomo_type}})
    return dest


def _write_config(out: Path, objects: list[str], radii: dict[str, float], spacings: set[float], user_id: str,
                  session_id: str, overlay_root: str | None) -> Path:
    from milotile.store.ngff import distinct_colors

    cfg_path = out / "copick_config.json"
    if cfg_path.exists():
        config = read_config(cfg_path)
        if overlay_root is not None:
            config["overlay_root"] = overlay_root
    else:
        config = {
            "config_type": "filesystem",
            "name": "milotile export",
            "description": "Picks and tomograms exported by milotile.",
            "version": "0.1.0",
            "pickable_objects": [],
            "user_id": user_id,
            "session_id": session_id,
            # copick resolves a relative root against the working directory, not the config's folder:
            # the absolute folder opens from anywhere (``overlay_root="local://."`` keeps the tree movable)
            "overlay_root": overlay_root or f"local://{out.resolve().as_posix()}",
            "overlay_fs_args": {"auto_mkdir": True},
        }
    known = {o["name"] for o in config["pickable_objects"]}
    labels = [int(o.get("label", 0)) for o in config["pickable_objects"]]
    colors = distinct_colors(len(known) + len(objects))
    for obj in objects:
        if obj in known:
            continue
        label = max(labels, default=0) + 1
        labels.append(label)
        entry: dict[str, Any] = {"name": obj, "is_particle": True, "label": label,
                                 "color": [*colors[label - 1], 255]}
        if obj in radii:
            entry["radius"] = round(float(radii[obj]), 3)
        config["pickable_objects"].append(entry)
    if spacings:
        config["voxel_spacings"] = sorted(set(config.get("voxel_spacings", [])) | spacings)
    cfg_path.write_text(json.dumps(config, indent=2))
    return cfg_path


#: Store table that receives the picks of an ingested copick project.
COPICK_PICKS_TABLE = "copick-picks"


def ingest_copick(
    config: str | os.PathLike,
    store: Any,
    *,
    tomo_type: str | None = None,
    table: str = COPICK_PICKS_TABLE,
    **ingest_options: Any,
) -> Any:
    """Ingest a copick project: its tomograms into the store and its picks into a table.

    The copick tree is only read (tomograms through zarr in read-only mode, picks as JSON), so it is
    byte-identical afterwards.

    Parameters
    ----------
    config : path
        ``copick_config.json`` of a local (filesystem) project.
    store : path or Collection
        The collection store (created if missing).
    tomo_type : str, optional
        copick tomogram type to ingest (default the only or first type).
    table : str
        Store table for the picks (``tables/copick-picks.parquet``); skipped when the project has none.
    **ingest_options
        Passed to :func:`milotile.store.ingest` (``chunks``, ``overwrite``...).

    Returns
    -------
    Collection
    """
    from milotile.formats._common import collection_info
    from milotile.store import ingest

    col = ingest(config, store, copick_tomo_type=tomo_type, **ingest_options)
    picks = copick_picks(config, collection_info(col))
    if picks is not None:
        col.write_table(table, picks)
        log.info("copick picks: %d points into table %s", len(picks), table)
    return col


def copick_picks(config: str | os.PathLike, info: dict[str, TomoInfo] | None = None) -> pd.DataFrame | None:
    """All picks of a local copick project as a label table, or ``None`` when it has none."""
    roots = [r for r in config_roots(config) if r.is_dir()]
    if not any(any(r.glob("ExperimentRuns/*/Picks/*.json")) for r in roots):
        return None
    return read_copick(config, info)
