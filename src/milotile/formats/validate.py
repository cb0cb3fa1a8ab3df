"""Checks of label tables against a collection, run before any heavy work."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.formats._common import LABEL_COLUMNS, collection_info

log = logging.getLogger(__name__)

#: Fraction of points allowed outside the volume before an axis mix-up is suspected.
_MIXUP_FRACTION = 0.2


def _inside(v: np.ndarray, size: int) -> np.ndarray:
    return (v >= -0.5) & (v <= size - 0.5)


def _order_hint(perm: str, order_applies: bool | None) -> str:
    """How to fix an axis mix-up: ``--order`` only where the reader uses it (bare txt, IMOD)."""
    if order_applies:
        if perm == "xzy":
            return " re-read them with order='xzy' (--order xzy) if they were read as 'xyz'"
        return " re-read them with the matching order (--order)"
    if order_applies is None:
        return f" check which column holds which axis (they fit as order '{perm}'; --order applies to bare txt and IMOD files only)"
    return " the file names its columns (--order does not apply), so check that its x, y, z columns hold x, y, z"


def validate_labels(df: pd.DataFrame, col: Any) -> pd.DataFrame:
    """Check labels against a collection and return them tidy.

    Parameters
    ----------
    df : pandas.DataFrame
        Label table from :func:`milotile.formats.read_labels` (``tomogram, x, y, z, class``).
    col : Collection or path
        The collection the labels belong to.

    Returns
    -------
    pandas.DataFrame
        The same rows, with ``x_A, y_A, z_A`` added (Å) and ``class`` filled.

    Raises
    ------
    InputError
        For an empty table, missing columns, non-finite coordinates, tomogram names not in the
        collection, a probable axis-order mix-up (e.g. z values beyond the depth that would fit
        as y), or points outside the volume; the message names values and tomograms.
    """
    missing = [c for c in ("tomogram", "x", "y", "z") if c not in df.columns]
    if missing:
        raise InputError(f"Label table lacks the column(s) {', '.join(missing)}.")
    if len(df) == 0:
        raise InputError("The label table holds no points; nothing to train or evaluate on.")
    info = collection_info(col)
    df = df.copy()
    df["tomogram"] = df["tomogram"].astype(str)
    if "class" not in df.columns:
        df["class"] = "particle"
    xyz = df[["x", "y", "z"]].to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(xyz).all(axis=1))
    if len(bad):
        r = df.iloc[bad[0]]
        raise InputError(f"Label row {bad[0]} of tomogram {r['tomogram']!r} has a non-finite coordinate.")
    unknown = sorted(set(df["tomogram"]) - set(info))
    if unknown:
        known = sorted(info)
        raise InputError(
            f"{len(unknown)} labelled tomogram name(s) are not in the collection: "
            f"{', '.join(map(repr, unknown[:5]))}{' ...' if len(unknown) > 5 else ''} "
            f"(collection has {', '.join(map(repr, known[:5]))}{' ...' if len(known) > 5 else ''})."
        )
    for name, g in df.groupby("tomogram", sort=True):
        Z, Y, X = info[name].shape
        x, y, z = (g[a].to_numpy(dtype=np.float64) for a in "xyz")
        ok = _inside(x, X) & _inside(y, Y) & _inside(z, Z)
        if ok.all():
            continue
        n_bad = int((~ok).sum())
        frac = n_bad / len(g)
        if frac >= _MIXUP_FRACTION:
            vals = {"x": x, "y": y, "z": z}
            for perm in ("xzy", "zyx", "yxz", "yzx", "zxy"):
                px, py, pz = (vals[a] for a in perm)
                if (_inside(px, X) & _inside(py, Y) & _inside(pz, Z)).all():
                    hint = _order_hint(perm, df.attrs.get("order_applies"))
                    raise InputError(
                        f"{n_bad} of {len(g)} labels of tomogram {name!r} lie outside its (x, y, z) size "
                        f"({X}, {Y}, {Z}) but all fit when (x, y, z) is taken from the table's "
                        f"({', '.join(perm)}); probably an axis-order mix-up:{hint}."
                    )
        i = int(np.flatnonzero(~ok)[0])
        raise InputError(
            f"{n_bad} label(s) of tomogram {name!r} lie outside its (x, y, z) size ({X}, {Y}, {Z}), "
            f"e.g. ({x[i]:g}, {y[i]:g}, {z[i]:g})."
        )
    vs = df["tomogram"].map({n: t.voxel_size for n, t in info.items()}).to_numpy(dtype=np.float64)
    for a in "xyz":
        df[f"{a}_A"] = df[a].to_numpy(dtype=np.float64) * vs
    extra = [c for c in df.columns if c not in LABEL_COLUMNS]
    log.info("validated %d labels in %d tomograms", len(df), df["tomogram"].nunique())
    return df[LABEL_COLUMNS + extra].reset_index(drop=True)
