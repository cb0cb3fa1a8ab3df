"""Can a person find the species on the map? Clusterings of stored embeddings scored against the truth (issue 24, item 3).

Input: the ``features_*.npz`` files ``benchmarks/explore.py --dump`` writes (every candidate's stored embedding,
the species of the particle it lies on or ``""`` for background -- crowders, membranes, gold, noise --, and PCA
of its pixels). For each file and each clustering variant: the best single-cluster selection per species
(:func:`milotile.explore.evaluate.best_cluster_selection`: precision and recall of the one cluster a user
would take for that species, background counting against precision), and purity / ARI on the particle
candidates. Variants (all on the atlas's prepared features: row L2 normalisation, PCA 50):

* ``default`` -- the atlas's defaults: 256 k-means centroids, spectral clustering into 48;
* ``clusters=N`` -- other final cluster counts (``--clusters``);
* ``kmeans=N`` -- k-means with N centroids and no spectral merge of centroids;
* ``hdbscan_embed`` -- HDBSCAN in the embedding space (not on the 2D map): dense groups become clusters, the
  diffuse background becomes noise (``-1``, never a selection);
* ``split_top_half`` / ``split_otsu`` -- a blob-ness split first: only candidates whose DoG score is above the
  median / Otsu's threshold are clustered (into ``min(48, n/10)``), the rest is unassigned;
* ``pca_pixels/...`` -- the same cluster counts on the raw-pixel PCA features (the baseline map): small clusters
  are purer whatever the features, so the fine levels are compared at equal counts.

    python benchmarks/atlas_findable.py /tmp/explore_la/*/features_*.npz --out results/atlas_findable.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))


def prepare(x: np.ndarray, pca: int = 50, seed: int = 42) -> np.ndarray:
    """The atlas's feature preparation (:class:`milotile.explore.atlas.Reducer`): L2 rows, then PCA."""
    from sklearn.decomposition import PCA

    x = np.asarray(x, np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    if x.shape[1] > pca and len(x) > pca:
        x = PCA(pca, random_state=seed).fit_transform(x).astype(np.float32)
    return x


def variants(feats: np.ndarray, clusters: list[int], score: np.ndarray | None = None, seed: int = 42
             ) -> dict[str, np.ndarray]:
    from milotile.explore.overcluster import fit_overclusters, hdbscan_embedding_labels

    out = {}
    for n in clusters:
        if n > len(feats):
            continue
        oc = fit_overclusters(feats, n, 256, outlier_z=3.0, seed=seed)
        out["default" if n == 48 else f"clusters={n}"] = oc.predict(feats)
        km = fit_overclusters(feats, min(n, len(feats)), min(n, len(feats)), outlier_z=3.0, seed=seed)
        out[f"kmeans={n}"] = km.predict(feats)  # the centroids themselves, no spectral merge
    out["hdbscan_embed"] = hdbscan_embedding_labels(feats)
    if score is not None:  # blob-ness split first: only the stronger DoG peaks are clustered, the rest is -1
        for name, keep in (("top_half", score >= np.median(score)), ("otsu", score >= otsu(score))):
            lab = np.full(len(feats), -1, np.int32)
            n = int(min(48, max(2, keep.sum() // 10)))
            lab[keep] = fit_overclusters(feats[keep], n, 256, outlier_z=3.0, seed=seed).predict(feats[keep])
            out[f"split_{name}"] = lab
    return out


def otsu(v: np.ndarray, bins: int = 64) -> float:
    """Otsu's threshold of ``v`` (maximal between-class variance)."""
    h, edges = np.histogram(v, bins)
    mid = 0.5 * (edges[1:] + edges[:-1])
    w0 = np.cumsum(h)
    w1 = w0[-1] - w0
    m0 = np.cumsum(h * mid) / np.maximum(w0, 1)
    m1 = ((h * mid).sum() - np.cumsum(h * mid)) / np.maximum(w1, 1)
    return float(mid[int(np.argmax(w0 * w1 * (m0 - m1) ** 2))])


def candidate_scores(npz: Path, n: int) -> np.ndarray | None:
    """The DoG score of every candidate (the patch table next to the dump, same rows), if there is one."""
    store = npz.parent / "store.zarr"
    if not store.exists():
        return None
    import milotile as mt

    col = mt.open(store)
    for t in col.tables():
        if t.startswith("patches-"):
            df = col.read_table(t)
            if len(df) == n and "score" in df:
                return df["score"].to_numpy(np.float64)
    return None


def score(labels: np.ndarray, species: np.ndarray) -> dict:
    from milotile.explore.evaluate import best_cluster_selection, cluster_scores

    sp = np.array([s if s else None for s in species], dtype=object)
    best = best_cluster_selection(labels, sp)
    prec = [v["precision"] for v in best.values()]
    rec = [v["recall"] for v in best.values()]
    return {**cluster_scores(labels, sp), "n_clusters": int(labels.max()) + 1,
            "best_precision_mean": round(float(np.mean(prec)), 4), "best_recall_mean": round(float(np.mean(rec)), 4),
            "best_f1_mean": round(float(np.mean([v["f1"] for v in best.values()])), 4), "per_species": best}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--clusters", default="48,16,96", help="final cluster counts of the spectral variant")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "atlas_findable.json"))
    a = ap.parse_args(argv)
    clusters = [int(v) for v in a.clusters.split(",")]
    rows = []
    for f in a.files:
        d = np.load(f, allow_pickle=True)
        species = d["species"].astype(str)
        feats = {"learned": prepare(d["emb"])}
        if "pca" in d and d["pca"].ndim == 2:
            feats["pca_pixels"] = prepare(d["pca"])
        res = {"file": f, "n": int(len(species)), "n_on_particles": int((species != "").sum())}
        for name, x in feats.items():
            labs = (variants(x, clusters, candidate_scores(Path(f), len(species))) if name == "learned"
                    else {k: v for k, v in variants(x, clusters).items() if k != "hdbscan_embed"})
            for v, lab in labs.items():
                res[f"{name}/{v}"] = score(lab, species)
                r = res[f"{name}/{v}"]
                print(f"{Path(f).parent.name}/{Path(f).name}: {name}/{v}: clusters {r['n_clusters']} unassigned "
                      f"{r['unassigned']:.2f} purity {r['purity']:.3f} ARI {r['ari']:.3f} best single cluster: "
                      f"P {r['best_precision_mean']:.3f} R {r['best_recall_mean']:.3f} F1 {r['best_f1_mean']:.3f}",
                      flush=True)
        rows.append(res)
        Path(a.out).write_text(json.dumps({"benchmark": "atlas_findable", "load_avg": os.getloadavg(), "runs": rows,
                                           "partial": True}, indent=2) + "\n")
    Path(a.out).write_text(json.dumps({"benchmark": "atlas_findable", "load_avg": os.getloadavg(), "runs": rows},
                                      indent=2) + "\n")
    print(f"results: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
