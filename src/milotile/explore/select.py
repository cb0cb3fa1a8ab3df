"""Target selection on the atlas: polygon / box / cluster selection and labels from a selection.

Selections are computed here in numpy (the web app only sends the drawn polygon and the visible
clusters), so the logic is testable without a browser. A selection becomes a labels table
``tables/labels-<name>.parquet`` (``tomogram, x, y, z, class`` in milotile's coordinate
convention, plus ``id, cluster``) that ``milotile refine train --labels`` reads directly, and is
exported as MiLoPYP's coordinate TSV. MiLoPYP's ``interactive_info`` parquet (``name, coord,
embeddings, label, image``) is written next to it for users of existing tools.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = [
    "points_in_polygon",
    "points_in_box",
    "selection_ids",
    "clusters_without",
    "selection_counts",
    "labels_from_ids",
    "save_selection",
    "save_negatives",
    "select",
    "write_interactive_info",
]


def points_in_polygon(xy: np.ndarray, polygon: Sequence[Sequence[float]]) -> np.ndarray:
    """Boolean mask of the rows of ``xy`` (n × 2) inside ``polygon`` (a closed or open ring)."""
    from matplotlib.path import Path as MplPath

    poly = np.asarray(polygon, np.float64).reshape(-1, 2)
    if len(poly) < 3:
        raise InputError(f"a lasso polygon needs at least 3 vertices, got {len(poly)}.")
    return MplPath(poly).contains_points(np.asarray(xy, np.float64))


def points_in_box(xy: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """Boolean mask of the rows of ``xy`` inside ``box = (x0, y0, x1, y1)`` (corners in any order)."""
    if len(box) != 4:
        raise InputError(f"a box needs 4 numbers (x0, y0, x1, y1), got {len(box)}.")
    x0, y0, x1, y1 = (float(v) for v in box)
    xy = np.asarray(xy)
    return (
        (xy[:, 0] >= min(x0, x1)) & (xy[:, 0] <= max(x0, x1))
        & (xy[:, 1] >= min(y0, y1)) & (xy[:, 1] <= max(y0, y1))
    )


def selection_ids(
    table: pd.DataFrame,
    *,
    polygon: Sequence[Sequence[float]] | None = None,
    box: Sequence[float] | None = None,
    clusters: Sequence[int] | None = None,
    subclusters: Sequence[int] | None = None,
) -> np.ndarray:
    """Ids (``table["id"]``, sorted) of atlas points in the polygon / box, in ``clusters`` and in ``subclusters``.

    With no polygon and no box every point of the listed clusters is selected; ``clusters=None``
    means all clusters (``-1`` is the unassigned group); ``subclusters`` likewise for the ``subcluster``
    column (the k-means over-clusters the clusters are merged from).
    """
    mask = np.ones(len(table), bool)
    if clusters is not None:
        mask &= np.isin(table["cluster"].to_numpy(), np.asarray(list(clusters), np.int64))
    if subclusters is not None:
        if "subcluster" not in table.columns:
            raise InputError("this atlas has no sub-clusters; re-run `milotile explore atlas --overwrite`.")
        mask &= np.isin(table["subcluster"].to_numpy(), np.asarray(list(subclusters), np.int64))
    if polygon is not None or box is not None:
        xy = table[["map_x", "map_y"]].to_numpy()
        if polygon is not None:
            mask &= points_in_polygon(xy, polygon)
        if box is not None:
            mask &= points_in_box(xy, box)
    return np.sort(table["id"].to_numpy()[mask])


def clusters_without(table: pd.DataFrame, ids: np.ndarray) -> list[int]:
    """The clusters (column ``cluster``, unassigned ``-1`` excluded) that hold none of the candidates ``ids``:
    everything a user did not take, except the clusters the selection came from (they may hold more of the
    target). ``select(..., negatives="rest")`` writes them as negatives."""
    held = set(table.loc[table["id"].isin(np.asarray(ids)), "cluster"].astype(int).tolist())
    return sorted(int(c) for c in set(table["cluster"].astype(int).unique().tolist()) - held - {-1})


def selection_counts(table: pd.DataFrame, ids: np.ndarray) -> dict[str, Any]:
    """``{"n", "per_tomogram", "per_cluster"}`` of a selection (JSON-able)."""
    sub = table.iloc[np.asarray(ids, np.int64)] if len(ids) else table.iloc[:0]
    per_t = sub["tomogram"].astype(str).value_counts().sort_index() if "tomogram" in sub else pd.Series(dtype=int)
    per_c = sub["cluster"].value_counts().sort_index()
    return {
        "n": int(len(sub)),
        "per_tomogram": {str(k): int(v) for k, v in per_t.items()},
        "per_cluster": {str(int(k)): int(v) for k, v in per_c.items()},
    }


def labels_from_ids(table: pd.DataFrame, ids: np.ndarray, class_name: str = "selection") -> pd.DataFrame:
    """Labels table ``tomogram, x, y, z, class, id, cluster`` for the atlas rows ``ids``."""
    missing = [c for c in ("tomogram", "x", "y", "z") if c not in table.columns]
    if missing:
        raise InputError(f"the atlas has no candidate coordinates ({', '.join(missing)}); re-run the atlas on "
                         "embeddings with a candidate table.")
    sub = table.iloc[np.asarray(ids, np.int64)]
    out = pd.DataFrame({
        "tomogram": sub["tomogram"].astype(str).to_numpy(),
        "x": sub["x"].to_numpy(np.float64), "y": sub["y"].to_numpy(np.float64), "z": sub["z"].to_numpy(np.float64),
        "class": class_name, "id": sub["id"].to_numpy(np.int64), "cluster": sub["cluster"].to_numpy(np.int32),
    })
    return out.reset_index(drop=True)


_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


def check_name(name: str) -> str:
    """A selection name usable as a table and file name."""
    if not _NAME.match(str(name)):
        raise InputError(f"selection name {name!r} must be letters, digits, '_', '-' or '.' (at most 80).")
    return str(name)


def save_selection(atlas: Any, ids: np.ndarray, name: str, params: dict[str, Any], class_name: str | None = None) -> pd.DataFrame:
    """Write ``tables/labels-<name>`` (with ``params``) and ``runs/atlas-<key>/selections/<name>.tsv``."""
    from milotile.formats.milopyp import write_coordinate_tsv

    name = check_name(name)
    labels = labels_from_ids(atlas.table, ids, class_name or name)
    recentred = candidates_recentred(atlas)
    full = {"atlas": atlas.key, "atlas_params": atlas.params.get("params", {}), "n": int(len(labels)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "candidates_recentred": recentred,
            **params}
    col = atlas.collection
    col.write_table(f"labels-{name}", labels, params=full,
                    sources={f"tables/{atlas.table_name}": col.source_token(f"tables/{atlas.table_name}")})
    tsv = selection_dir(atlas) / f"{name}.tsv"
    write_coordinate_tsv(labels, tsv)
    log.info("selection %s: %d labels -> tables/labels-%s.parquet and %s", name, len(labels), name, tsv)
    labels.attrs["name"] = name
    labels.attrs["candidates_recentred"] = recentred
    return labels


def candidates_recentred(atlas: Any) -> float | list[float] | None:
    """The ``mine --recentre`` radius of the candidates under ``atlas`` (``None``: DoG peaks as mined, or not
    known): atlas -> its patch bank -> the bank's candidate table's parameters."""
    from milotile.explore.data import open_bank

    try:
        bank = open_bank(atlas.collection, atlas.bank_key)
        source = bank.params.get("source_table")
        return atlas.collection.table_params(source).get("recentre") if source else None
    except (InputError, KeyError, OSError, ValueError) as exc:
        log.debug("selection: candidate recentring of atlas %s not known (%s)", atlas.key, exc)
        return None


def save_negatives(atlas: Any, ids: np.ndarray, name: str, params: dict[str, Any]) -> pd.DataFrame:
    """Write ``tables/negatives-<name>`` (``tomogram, x, y, z, class="negative", id, cluster``; read by
    ``refine train --negatives``) and its MiLoPYP TSV next to the selection's."""
    from milotile.formats.milopyp import write_coordinate_tsv

    name = check_name(name)
    neg = labels_from_ids(atlas.table, ids, "negative")
    col = atlas.collection
    col.write_table(f"negatives-{name}", neg, params={"atlas": atlas.key, "n": int(len(neg)), **params},
                    sources={f"tables/{atlas.table_name}": col.source_token(f"tables/{atlas.table_name}")})
    tsv = selection_dir(atlas) / f"negatives-{name}.tsv"
    write_coordinate_tsv(neg, tsv)
    log.info("negatives %s: %d candidates -> tables/negatives-%s.parquet and %s", name, len(neg), name, tsv)
    return neg


def selection_dir(atlas: Any) -> Path:
    """Local folder of selection exports (``runs/atlas-<key>/selections``)."""
    p = Path(atlas.run_dir) / "selections"
    p.mkdir(parents=True, exist_ok=True)
    return p


def _ids_from_parquet(atlas: Any, path: str | os.PathLike, tolerance: float = 1.0) -> np.ndarray:
    """Atlas ids of the rows of a nextPYP/Phoenix export (``name, coord``) or a milotile table.

    Each row is matched to the nearest candidate of its tomogram; coordinates rounded to integers
    (MiLoPYP writes ``coord`` as integer strings) match within ``tolerance`` voxels.
    """
    from scipy.spatial import cKDTree

    from milotile.formats import read_labels

    lab = read_labels(path, fmt="table")
    t = atlas.table
    ids = []
    for tomo, g in lab.groupby("tomogram", sort=False):
        cand = t[t["tomogram"].astype(str) == str(tomo)]
        if not len(cand):
            raise InputError(f"{path}: tomogram {tomo!r} has no candidates in atlas {atlas.key!r}.")
        dist, j = cKDTree(cand[["x", "y", "z"]].to_numpy()).query(g[["x", "y", "z"]].to_numpy())
        if (dist > tolerance).any():
            bad = int(np.flatnonzero(dist > tolerance)[0])
            row = g.iloc[bad]
            raise InputError(f"{path}: point ({tomo}, {row['x']:g}, {row['y']:g}, {row['z']:g}) is not a "
                             f"candidate of atlas {atlas.key!r} (nearest is {dist[bad]:.1f} voxels away).")
        ids.append(cand["id"].to_numpy()[j])
    return np.unique(np.concatenate(ids)) if ids else np.zeros(0, np.int64)


def select(
    col: Any,
    key: str | None = None,
    *,
    clusters: Sequence[int] | None = None,
    subclusters: Sequence[int] | None = None,
    selection: str | None = None,
    parquet: str | os.PathLike | None = None,
    name: str | None = None,
    class_name: str | None = None,
    interactive_info: bool = True,
    negatives: Sequence[int] | str | None = None,
) -> pd.DataFrame:
    """Labels from chosen clusters, a saved app selection or a nextPYP/Phoenix parquet export.

    Parameters
    ----------
    col : Collection or path
        The store with the atlas.
    key : str, optional
        Atlas key (default: the only atlas).
    clusters : sequence of int, optional
        Cluster ids to take (MiLoPYP's ``select_sublabels.py --use_classes``).
    subclusters : sequence of int, optional
        Sub-cluster ids to take (the atlas's ``subcluster`` column: its k-means over-clusters).
    selection : str, optional
        Name of a selection exported from the app (``tables/labels-<selection>``); re-exported.
    parquet : path, optional
        A parquet with ``name, coord`` (Phoenix / nextPYP export) or ``tomogram, x, y, z`` columns.
    name : str, optional
        Output name (default ``clusters-3-7-12``, the selection name, or the parquet's stem).
    class_name : str, optional
        ``class`` column value (default: the name).
    interactive_info : bool
        Also write MiLoPYP's ``interactive_info_parquet.gzip`` for the whole atlas.
    negatives : sequence of int or ``"rest"``, optional
        Cluster ids whose candidates are *not* the target (another species, membranes, gold): written
        to ``tables/negatives-<name>`` for ``refine train --negatives`` (never overlapping the labels'
        clusters or ids). ``"rest"``: every cluster that holds none of the selected candidates
        (:func:`clusters_without`; the label-free rule, ``benchmarks/label_free.py``).

    Returns
    -------
    pandas.DataFrame
        The labels (``tomogram, x, y, z, class, id, cluster``), also in ``tables/labels-<name>``; with
        ``negatives``, ``labels.attrs["negatives"]`` holds the negatives table.
    """
    from milotile.explore.atlas import load_atlas

    given = sum(v is not None for v in (clusters, subclusters, selection, parquet))
    if given != 1:
        raise InputError("give exactly one of --clusters, --subclusters, --selection or --parquet.")
    a = load_atlas(col, key)
    if clusters is not None or subclusters is not None:
        level = "cluster" if clusters is not None else "subcluster"
        cl = [int(c) for c in (clusters if clusters is not None else subclusters)]
        if level not in a.table.columns:
            raise InputError(f"atlas {a.key!r} has no sub-clusters; re-run `milotile explore atlas --overwrite`.")
        known = set(a.table[level].unique().tolist())
        unknown = [c for c in cl if c not in known]
        if unknown:
            raise InputError(f"atlas {a.key!r} has no {level} {unknown[0]}; {level}s are "
                             f"{', '.join(str(c) for c in sorted(known))}.")
        ids = selection_ids(a.table, **{f"{level}s": cl})
        name = name or f"{level}s-" + "-".join(str(c) for c in cl)
        params: dict[str, Any] = {"source": f"{level}s", f"{level}s": cl}
    elif selection is not None:
        prev = a.collection.read_table(f"labels-{check_name(selection)}")
        ids = np.sort(prev["id"].to_numpy(np.int64))
        name = name or selection
        params = {"source": "selection", "selection": selection,
                  **{k: v for k, v in a.collection.table_params(f"labels-{selection}").items() if k in ("polygon", "box", "clusters")}}
    else:
        ids = _ids_from_parquet(a, parquet)
        name = name or Path(parquet).name.split(".")[0]
        params = {"source": "parquet", "parquet": os.fspath(parquet)}
    neg_ids = None
    if isinstance(negatives, str):
        if negatives != "rest":
            raise InputError(f"--negatives takes cluster ids or 'rest', got {negatives!r}.")
        negatives = clusters_without(a.table, ids)
        if not negatives:
            raise InputError("--negatives rest: every cluster holds some of the selection; no cluster is left.")
    if negatives is not None:
        neg = [int(c) for c in negatives]
        known = set(a.table["cluster"].unique().tolist())
        bad = [c for c in neg if c not in known]
        if bad:
            raise InputError(f"atlas {a.key!r} has no cluster {bad[0]} (--negatives); clusters are "
                             f"{', '.join(str(c) for c in sorted(known))}.")
        if clusters is not None and set(neg) & {int(c) for c in clusters}:
            raise InputError(f"cluster(s) {sorted(set(neg) & {int(c) for c in clusters})} are given both as "
                             "--clusters and as --negatives; a cluster is either the target or not.")
        neg_ids = np.setdiff1d(selection_ids(a.table, clusters=neg), ids)
        if not len(neg_ids):
            raise InputError(f"the --negatives clusters {neg} hold no candidates outside the selection.")
    labels = save_selection(a, ids, name, params, class_name)
    if neg_ids is not None:
        labels.attrs["negatives"] = save_negatives(a, neg_ids, labels.attrs["name"], {**params, "negative_clusters": neg})
    if interactive_info:
        write_interactive_info(a, selection_dir(a).parent / "interactive_info_parquet.gzip")
    return labels


def write_interactive_info(atlas: Any, path: str | os.PathLike, *, port: int = 7000, rows_per_group: int = 65536) -> Path:
    """MiLoPYP's Phoenix parquet (``name, coord, embeddings, label, image``), written in row groups.

    ``coord`` holds ``[x, y, z]`` as strings like MiLoPYP's; ``image`` points at the app's thumbnail
    URL (``http://localhost:<port>/thumb/<id>.png``).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    col = atlas.collection
    emb = col.zarr_group["embeddings"][atlas.key]
    t = atlas.table
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    d = int(emb.shape[1])
    writer = None
    try:
        for s in range(0, len(t), rows_per_group):
            sub = t.iloc[s : s + rows_per_group]
            e = np.asarray(emb[s : s + len(sub)], np.float32).reshape(-1)
            coord = np.stack([np.round(sub[c].to_numpy()).astype(np.int64).astype(str) for c in "xyz"], axis=1)
            batch = pa.table({
                "name": pa.array(sub["tomogram"].astype(str).to_numpy()),
                "coord": pa.FixedSizeListArray.from_arrays(pa.array(coord.reshape(-1)), 3),
                "embeddings": pa.FixedSizeListArray.from_arrays(pa.array(e), d),
                "label": pa.array(sub["cluster"].to_numpy(np.int64)),
                "image": pa.array([f"http://localhost:{port}/thumb/{i}.png" for i in sub["id"].to_numpy()]),
            })
            if writer is None:
                writer = pq.ParquetWriter(str(path), batch.schema, compression="gzip")
            writer.write_table(batch)
    finally:
        if writer is not None:
            writer.close()
    log.info("wrote MiLoPYP interactive_info parquet %s (%d rows)", path, len(t))
    return path
