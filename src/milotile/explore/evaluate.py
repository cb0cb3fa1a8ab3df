"""Atlas quality against a ground truth (generated data): species of candidates, purity, ARI, enrichment.

Used by the demo (to choose clusters by a documented rule where a user would look at the gallery)
and by ``benchmarks/atlas.py``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

__all__ = ["candidate_species", "purity", "cluster_scores", "species_enrichment", "enriched_clusters",
           "purest_cluster", "best_cluster_selection"]


def candidate_species(cands: pd.DataFrame, truth: pd.DataFrame, radius: float | None = None) -> np.ndarray:
    """Species of the nearest ground-truth particle within its radius (or ``radius``), else ``None``.

    ``cands`` and ``truth`` have ``tomogram, x, y, z``; ``truth`` also ``species`` (and ``radius``).
    """
    from scipy.spatial import cKDTree

    out = np.full(len(cands), None, dtype=object)
    pos = np.arange(len(cands))
    for tomo, g in truth.groupby("tomogram"):
        m = (cands["tomogram"].astype(str) == str(tomo)).to_numpy()
        if not m.any():
            continue
        d, j = cKDTree(g[["x", "y", "z"]].to_numpy()).query(cands.loc[m, ["x", "y", "z"]].to_numpy())
        r = np.full(len(j), float(radius)) if radius is not None else g["radius"].to_numpy()[j]
        hit = d <= r
        out[pos[m][hit]] = g["species"].to_numpy()[j[hit]]
    return out


def purity(labels: np.ndarray, species: np.ndarray) -> float:
    """Fraction of points whose cluster's majority species is their own (unassigned ``-1`` excluded)."""
    df = pd.DataFrame({"c": np.asarray(labels), "s": np.asarray(species)})
    df = df[df["c"] >= 0]
    if not len(df):
        return 0.0
    return float(df.groupby("c")["s"].agg(lambda s: s.value_counts().iloc[0]).sum() / len(df))


def cluster_scores(labels: np.ndarray, species: np.ndarray) -> dict[str, float]:
    """Purity and adjusted Rand index of ``labels`` against ``species`` (rows with a species only)."""
    from sklearn.metrics import adjusted_rand_score

    sp = np.asarray(species, dtype=object)
    ok = np.array([s is not None for s in sp])
    lab = np.asarray(labels)[ok]
    return {"purity": round(purity(lab, sp[ok]), 4), "ari": round(float(adjusted_rand_score(sp[ok].astype(str), lab)), 4),
            "n": int(ok.sum()), "unassigned": round(float(np.mean(lab < 0)) if len(lab) else 0.0, 4)}


def species_enrichment(table: pd.DataFrame, species: np.ndarray, target: str, column: str = "cluster") -> pd.DataFrame:
    """Per cluster: ``size``, ``hits`` (candidates on a ``target`` particle) and ``fraction`` = hits/size.

    ``column``: ``"cluster"`` or ``"subcluster"`` (the atlas's finer level); the result's column is ``cluster``.
    """
    df = pd.DataFrame({"cluster": table[column].to_numpy(), "hit": np.asarray(species, dtype=object) == target})
    g = df[df["cluster"] >= 0].groupby("cluster").agg(size=("hit", "size"), hits=("hit", "sum"))
    g["fraction"] = g["hits"] / g["size"]
    return g.sort_values(["fraction", "hits"], ascending=False).reset_index()


def enriched_clusters(table: pd.DataFrame, species: np.ndarray, target: str, min_fraction: float = 0.5,
                      column: str = "cluster") -> list[int]:
    """The documented cluster choice: every cluster whose candidates are mostly (≥ ``min_fraction``) on
    ``target`` particles — what a user does by picking the gallery rows that show the target; the
    single most enriched cluster when none reaches the threshold. ``column``: the level (``"subcluster"``)."""
    e = species_enrichment(table, species, target, column)
    chosen = e[e["fraction"] >= min_fraction]["cluster"].astype(int).tolist()
    return chosen or e["cluster"].astype(int).head(1).tolist()


def purest_cluster(table: pd.DataFrame, species: np.ndarray, target: str, min_hits: int = 1,
                   column: str = "cluster") -> int | None:
    """The oracle's choice: the single cluster with the largest share of ``target`` candidates (ties: more hits),
    among clusters holding at least ``min_hits`` of them; ``None`` when no cluster does. ``column``: the level."""
    e = species_enrichment(table, species, target, column)
    e = e[e["hits"] >= min_hits]
    return int(e["cluster"].iloc[0]) if len(e) else None


def best_cluster_selection(labels: np.ndarray, species: np.ndarray) -> dict[str, dict[str, float]]:
    """Per species: the single cluster that, taken as a selection of that species, has the best F1 against the
    species' candidates, with its precision, recall and size (unassigned ``-1`` is never a selection).

    ``species`` holds the species of every candidate, ``None`` (or ``""``) for candidates on no particle:
    the background counts against precision, as it would in a user's selection.
    """
    lab = np.asarray(labels)
    sp = np.array(["" if v is None else str(v) for v in np.asarray(species, dtype=object)], dtype=object)
    out: dict[str, dict[str, float]] = {}
    clusters = np.unique(lab[lab >= 0])
    for target in sorted(set(sp.tolist()) - {""}):
        hit = sp == target
        best = {"cluster": -1, "f1": 0.0, "precision": 0.0, "recall": 0.0, "size": 0, "hits": 0}
        for c in clusters:
            m = lab == c
            tp = int((m & hit).sum())
            if not tp:
                continue
            prec, rec = tp / int(m.sum()), tp / int(hit.sum())
            f1 = 2 * prec * rec / (prec + rec)
            if f1 > best["f1"]:
                best = {"cluster": int(c), "f1": round(f1, 4), "precision": round(prec, 4), "recall": round(rec, 4),
                        "size": int(m.sum()), "hits": tp}
        out[target] = {**best, "n_species": int(hit.sum())}
    return out
