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
    python benchmarks/atlas_findable.py WORK/la3_s0/features_slab_seed0.npz --figure docs/lookalike-map.png
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


def knn_balanced(x: np.ndarray, species: np.ndarray, min_class: int = 5) -> tuple[float, int]:
    """Balanced 5-NN accuracy (standardised features, 5-fold CV, 3 repeats; ``benchmarks/explore.py``'s
    :func:`knn_cv`) on the particle candidates of species with at least ``min_class`` candidates, and that count."""
    from explore import knn_cv

    sp = np.asarray(species).astype(str)
    names, counts = np.unique(sp[sp != ""], return_counts=True)
    keep = np.isin(sp, names[counts >= min_class])
    return knn_cv(x[keep], sp[keep], "std", scorings=("balanced_accuracy",))["balanced_accuracy"][0], int(keep.sum())


def figure(npz: str, out: str, method: str = "umap", seed: int = 0) -> dict:
    """The look-alike map from the learned embedding next to the map of the raw-pixel PCA, every candidate coloured
    by the species of the particle it lies on (background grey), the balanced 5-NN accuracy in each title (item 5 of
    issue 24). Both maps are made the atlas's way (:func:`prepare`, then ``method``: UMAP or PCA to 2D)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = np.load(npz, allow_pickle=True)
    species = d["species"].astype(str)
    panels = {"learned embedding (SimSiam, 3d)": d["emb"], "PCA of the raw patch pixels (16 components)": d["pca"]}
    names = sorted(set(species.tolist()) - {""})
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    fig, axes = plt.subplots(1, 2, figsize=(12, 5.6), dpi=110)
    info = {"file": npz, "method": method, "n": int(len(species)), "n_on_particles": int((species != "").sum())}
    for ax, (title, x) in zip(axes, panels.items(), strict=True):
        f = prepare(np.asarray(x, np.float32))
        if method == "umap":
            import umap

            xy = umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=seed).fit_transform(f)
        else:
            from sklearn.decomposition import PCA

            xy = PCA(2, random_state=seed).fit_transform(f)
        acc, n_scored = knn_balanced(np.asarray(x, np.float64), species)
        info[title] = {"knn5_balanced": round(acc, 4), "n_scored": n_scored}
        bg = species == ""
        ax.scatter(xy[bg, 0], xy[bg, 1], s=6, c="0.78", lw=0, label=f"background ({int(bg.sum())})")
        for i, sp in enumerate(names):
            m = species == sp
            ax.scatter(xy[m, 0], xy[m, 1], s=22, color=cmap(i % cmap.N), lw=0.3, edgecolor="k",
                       label=f"{sp} ({int(m.sum())})")
        ax.set_title(f"{title}\nbalanced 5-NN species accuracy {acc:.2f}", fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
    axes[1].legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8, frameon=False, title="true species")
    fig.suptitle(f"{Path(npz).parent.name}: {info['n']} mined candidates, {info['n_on_particles']} on particles "
                 f"({method.upper()} map of each feature set)", fontsize=10)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    print(f"figure: {out} {json.dumps(info)}")
    return info


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="+")
    ap.add_argument("--clusters", default="48,16,96", help="final cluster counts of the spectral variant")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "atlas_findable.json"))
    ap.add_argument("--figure", default=None, metavar="PNG",
                    help="only draw the first file's learned map next to its pixel-PCA map, coloured by the true species "
                    "(docs/lookalike-map.png), and exit")
    ap.add_argument("--map", default="umap", choices=("umap", "pca"), help="2D projection of --figure")
    a = ap.parse_args(argv)
    if a.figure:
        figure(a.files[0], a.figure, a.map)
        return 0
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
