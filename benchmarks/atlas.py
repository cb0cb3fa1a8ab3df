"""Atlas benchmark (issue 13): cluster quality, scale (time + peak RSS) and the app in headless Chromium.

(a) quality -- the real pipeline on generated tomograms (``benchmarks/explore.py``'s store: synth ->
    ingest -> preprocess -> mine -> slab patches, one store per SNR, incl. the low-SNR 0.04 setting),
    a short SimSiam training, then for each embedding output (``pred``, ``proj``, ``trunk``) the atlas's
    over-clustering (k-means -> spectral, ``k`` = 3 species and 12) scored against the species of the
    candidates that sit on a ground-truth particle: purity and adjusted Rand index. Baseline in the
    same run: k-means (same ``k``) on raw-pixel PCA (16 components) of the same patches.
(b) scale -- synthetic 128-D embeddings (a Gaussian mixture) of 10^5 and 10^6 rows; the whole CLI
    command ``milotile --workers 2 explore atlas STORE --no-plots --no-colormap3d`` (the defaults:
    ``--fit-sample 50000``, rows beyond it placed by k-NN on UMAP's index; ``--fit-sample F`` with
    ``--fit-sample``) is timed with the peak RSS of its process tree (workers included), next to a single
    ``umap.UMAP(n_neighbors=40, min_dist=0.3).fit_transform`` on all rows (sizes in ``--naive``).
    Numba's cache is warmed by a tiny UMAP fit first, so neither pays the compilation alone; each size
    with both gets ``atlas_over_naive`` (wall time of the atlas command / the single fit's command).
(c) browser -- the app serving those atlases in headless Chromium (software WebGL): page load to
    first paint, and lasso-to-selection latency (mouse-up -> server selection -> highlight drawn).

    python benchmarks/atlas.py --quick                 # small: 1 SNR, 5 epochs, 2e4/1e5 rows
    python benchmarks/atlas.py --work /tmp/atlas_bench # the full run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_results  # noqa: E402

log = logging.getLogger("bench.atlas")
PY = sys.executable


# --------------------------------------------------------------------------- (a) quality
def quality(work: Path, a: argparse.Namespace) -> list[dict]:
    import explore as xb  # benchmarks/explore.py: the store builder

    from milotile.explore import embed, train
    from milotile.explore.atlas import atlas
    from milotile.explore.data import open_bank
    from milotile.explore.evaluate import candidate_species, cluster_scores
    from milotile.explore.recipe import CPU_WIDTHS, ExploreRecipe

    out = []
    for snr in [float(s) for s in a.snr.split(",")]:
        ns = argparse.Namespace(n_tomograms=a.n_tomograms, size=a.size, snr=snr, n_particles=a.n_particles,
                                data_seed=0, bbox=32, border=16, border_z=8)
        sw = work / f"snr{snr}"
        sw.mkdir(parents=True, exist_ok=True)
        col, key, gt, info = xb.build_store(sw, ns)
        t0 = time.perf_counter()
        recipe = ExploreRecipe().replace(epochs=a.epochs, batch_size=64, widths=CPU_WIDTHS, seed=0, save_every=1000)
        enc = train(col, key=key, mode="3d", recipe=recipe, out=sw / "run")
        train_s = time.perf_counter() - t0
        cands = col.read_table(f"patches-{key}")
        species = candidate_species(cands, gt)
        res = {"snr": snr, "candidates": len(cands), "on_particle": int(sum(s is not None for s in species)),
               "train_s": round(train_s, 1), "epochs": a.epochs, "features": {}, "pixel_pca_kmeans": {}}
        for feat in ("pred", "proj", "trunk"):
            e = embed(col, model=enc, key=key, feature=feat, out_key=f"{key}-{feat}", overwrite=True)
            res["features"][feat] = {}
            for k in (3, 12):
                t1 = time.perf_counter()
                at = atlas(col, e.key, method="pca", n_clusters=k, overcluster=min(256, len(cands) // 4),
                           outlier_z=None, seed=0, overwrite=True)
                res["features"][feat][f"k{k}"] = {**cluster_scores(at.table["cluster"].to_numpy(), species),
                                                  "seconds": round(time.perf_counter() - t1, 2)}
        bank = open_bank(col, key)
        pix = bank.read(0, bank.n)[:, 0].reshape(bank.n, -1)
        from sklearn.cluster import KMeans
        from sklearn.decomposition import PCA

        z = PCA(16, random_state=0).fit_transform((pix - pix.mean(0)) / (pix.std(0) + 1e-6))
        for k in (3, 12):
            lab = KMeans(k, n_init=1, random_state=0).fit_predict(z)
            res["pixel_pca_kmeans"][f"k{k}"] = cluster_scores(lab, species)
        log.info("quality snr %s: %s", snr, json.dumps(res))
        out.append(res)
    return out


# --------------------------------------------------------------------------- (b) scale
def synthetic_store(path: Path, n: int, d: int = 128, centres: int = 24, seed: int = 0) -> None:
    """A store holding ``embeddings/syn`` (n × d, Gaussian mixture) and its table, written in blocks."""
    import pandas as pd
    import zarr

    from milotile.store import open_collection

    if (path / "done").exists():
        return
    shutil.rmtree(path, ignore_errors=True)
    col = open_collection(path, mode="a")
    rng = np.random.default_rng(seed)
    c = rng.normal(0, 1, (centres, d)).astype(np.float32)
    g = col.zarr_group.require_group("embeddings")
    arr = g.create_array("syn", shape=(n, d), chunks=(16384, d), dtype="float32", overwrite=True,
                         compressors=[zarr.codecs.ZstdCodec(level=1)])
    lab = rng.integers(0, centres, n)
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        arr[s:e] = c[lab[s:e]] + rng.normal(0, 0.45, (e - s, d)).astype(np.float32)
    arr.attrs["milotile"] = {"complete": True, "params": {"bank": None, "feature": "synthetic", "n": n, "dim": d}}
    col.write_table("embeddings-syn", pd.DataFrame({
        "tomogram": np.char.add("tomo_", (np.arange(n) % 50).astype(str)),
        "x": rng.uniform(0, 1000, n), "y": rng.uniform(0, 1000, n), "z": rng.uniform(0, 300, n),
        "centre": lab, "embedding_index": np.arange(n)}))
    (path / "done").write_text("ok")


NAIVE = """
import sys, time, numpy as np, zarr, umap
arr = zarr.open_group(sys.argv[1], mode="r")["embeddings"]["syn"]
x = np.asarray(arr[:], np.float32)
t = time.perf_counter()
xy = umap.UMAP(n_neighbors=40, min_dist=0.3).fit_transform(x)
fit_s = time.perf_counter() - t
np.save(sys.argv[2], xy)
print("fit_s", fit_s)
"""


def map_agreement(xy: np.ndarray, centre: np.ndarray, k: int = 10, n_query: int = 20000, seed: int = 0) -> float:
    """Quality of a 2D map of the Gaussian mixture: the mean fraction of each point's ``k`` nearest map
    neighbours that come from its own mixture centre (``n_query`` random points; 1.0 = centres intact)."""
    from scipy.spatial import cKDTree

    q = np.random.default_rng(seed).choice(len(xy), size=min(n_query, len(xy)), replace=False)
    _, idx = cKDTree(xy).query(xy[q], k=k + 1)
    return round(float((centre[idx[:, 1:]] == centre[q, None]).mean()), 4)


def run_limited(cmd: list[str], env: dict, timeout: float) -> dict:
    """Run ``cmd`` with a wall-clock limit; wall time, peak tree RSS, stdout (or that it timed out)."""
    from _common import PeakRSS

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **env})
    with PeakRSS(proc.pid) as rss:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            import psutil

            for c in psutil.Process(proc.pid).children(recursive=True):
                c.kill()
            proc.kill()
            proc.communicate()
            return {"timed_out_after_s": timeout, "peak_rss_gib": round(rss.peak / 2**30, 2)}
    if proc.returncode != 0:
        return {"error": err[-500:]}
    return {"wall_s": round(time.perf_counter() - t0, 1), "peak_rss_gib": round(rss.peak / 2**30, 2), "stdout": out}


WARM = """
import numpy as np, umap
x = np.random.default_rng(0).normal(size=(6000, 50)).astype(np.float32)
m = umap.UMAP(n_neighbors=40, min_dist=0.3).fit(x)
m._knn_search_index.query(x[:100], k=10)
"""


def scale(work: Path, a: argparse.Namespace) -> list[dict]:
    env = {"NUMBA_CACHE_DIR": str(work / "numba_cache"), "MILOTILE_PROGRESS": "0"}
    out = []
    warm = run_limited([PY, "-c", WARM], env, a.timeout)  # numba's cache: neither variant pays compilation
    out.append({"variant": "numba warm-up (tiny UMAP fit, 6000 rows)", "cli": {k: v for k, v in warm.items()
                                                                             if k != "stdout"}})
    sizes = [int(float(s)) for s in a.sizes.split(",")]
    umap_sizes = [int(float(s)) for s in a.umap_sizes.split(",") if s]
    naive = [int(float(s)) for s in a.naive.split(",") if s]
    from milotile.store import open_collection

    for n in sizes:
        store = work / f"syn_{n}.zarr"
        synthetic_store(store, n)
        for method in [m for m in a.methods.split(",") if m != "umap" or n in umap_sizes]:
            proj, _, tr = method.partition("-")  # "umap-model": UMAP map, UMAP's transform for the rest
            cmd = [PY, "-m", "milotile.cli", "-q", "--workers", str(a.workers), "--threads-per-worker", "1",
                   "explore", "atlas", str(store), "--method", proj, "--transform", tr or "knn",
                   *(["--fit-sample", str(a.fit_sample)] if a.fit_sample else []),
                   "--neighbors", str(a.neighbors), "--no-plots", "--no-colormap3d", "--overwrite"]
            load0 = os.getloadavg()
            r = run_limited(cmd, env, a.timeout)
            r.pop("stdout", None)
            row = {"n": n, "method": method, "fit_sample": a.fit_sample or "default (50000)", "neighbors": a.neighbors,
                   "workers": a.workers, "cli": r, "load_avg_before": [round(v, 2) for v in load0]}
            if "wall_s" in r:
                at = open_collection(store, mode="r")
                row["timings"] = at.table_params("atlas-syn").get("timings")
                t = at.read_table("atlas-syn")  # rows in embedding order; the table's columns carried along
                row["map_10nn_same_centre"] = map_agreement(t[["map_x", "map_y"]].to_numpy(), t["centre"].to_numpy())
            log.info("scale %d %s: %s", n, method, json.dumps(row))
            out.append(row)
        if n in naive:
            load0 = os.getloadavg()
            r = run_limited([PY, "-c", NAIVE.replace("40", str(a.neighbors)), str(store), str(work / "naive_xy.npy")],
                            env, a.timeout)
            row = {"n": n, "method": f"naive umap.UMAP(n_neighbors={a.neighbors}).fit_transform(all rows), 1 process",
                   "cli": r, "load_avg_before": [round(v, 2) for v in load0]}
            if "stdout" in r:
                r["fit_s"] = round(float(r.pop("stdout").split()[-1]), 1)
                centre = open_collection(store, mode="r").read_table("embeddings-syn")["centre"].to_numpy()
                row["map_10nn_same_centre"] = map_agreement(np.load(work / "naive_xy.npy"), centre)
            log.info("scale %d naive: %s", n, json.dumps(row))
            out.append(row)
            mine = [r for r in out if r.get("n") == n and r.get("method") == "umap" and "wall_s" in r["cli"]]
            if mine and "wall_s" in r:
                out.append({"n": n, "atlas_over_naive": round(mine[0]["cli"]["wall_s"] / r["wall_s"], 2)})
                log.info("scale %d: atlas / single fit_transform = %.2f", n, out[-1]["atlas_over_naive"])
    return out


# --------------------------------------------------------------------------- (c) browser
def browser(work: Path, a: argparse.Namespace) -> list[dict]:
    chromium = shutil.which("chromium")
    if chromium is None:
        return [{"skipped": "no chromium executable"}]
    from playwright.sync_api import sync_playwright

    from milotile.explore.atlas import load_atlas
    from milotile.explore.select import selection_ids
    from milotile.explore.serve import make_server

    flags = ["--no-sandbox", "--disable-gpu", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
             "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
             "--disable-dev-shm-usage"]
    out = []
    for n in [int(float(s)) for s in a.sizes.split(",")]:
        at = load_atlas(str(work / f"syn_{n}.zarr"), "syn")
        srv = make_server(at, port=0)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{srv.server_address[1]}/"
        srv.app.points()  # the first request would build the buffer; build it before timing
        row: dict = {"n": n}
        with sync_playwright() as p, tempfile.TemporaryDirectory() as prof:
            ctx = p.chromium.launch_persistent_context(prof, executable_path=chromium, headless=True, args=flags,
                                                       viewport={"width": 1200, "height": 760})
            page = ctx.new_page()
            loads, paints, lassos = [], [], []
            for _ in range(a.repeats):
                t0 = time.perf_counter()
                page.goto(url)
                page.wait_for_function("window.milotile && window.milotile.ready", timeout=300000)
                loads.append(time.perf_counter() - t0)
                paints.append(page.evaluate("window.milotile.firstPaintMs") / 1000)
                ov = page.locator("#overlay").bounding_box()
                w, h = ov["width"], ov["height"]
                pts = [(0.3, 0.3), (0.7, 0.25), (0.75, 0.7), (0.4, 0.75)]
                page.mouse.move(ov["x"] + pts[0][0] * w, ov["y"] + pts[0][1] * h)
                page.mouse.down()
                for fx, fy in pts[1:] + pts[:1]:
                    page.mouse.move(ov["x"] + fx * w, ov["y"] + fy * h, steps=5)
                t1 = time.perf_counter()
                page.mouse.up()
                page.wait_for_function("window.milotile.selection !== null", timeout=300000)
                lassos.append({"wall_s": time.perf_counter() - t1, "in_page_s": page.evaluate("window.milotile.lastSelectMs") / 1000,
                               "n_selected": page.evaluate("window.milotile.selection.n")})
            poly = [page.evaluate("([x, y]) => window.milotile.screenToData(x, y)", [fx * w, fy * h]) for fx, fy in pts]
            ctx.close()
        t2 = time.perf_counter()
        selection_ids(at.table, polygon=poly)
        row.update({
            "load_to_first_paint_s": round(float(np.median(loads)), 2), "in_page_first_paint_s": round(float(np.median(paints)), 2),
            "lasso_to_selection_s": round(float(np.median([r["wall_s"] for r in lassos])), 3),
            "lasso_in_page_s": round(float(np.median([r["in_page_s"] for r in lassos])), 3),
            "server_polygon_select_s": round(time.perf_counter() - t2, 3), "n_selected": lassos[-1]["n_selected"],
            "points_payload_mib": round(n * 12 / 2**20, 1), "repeats": a.repeats,
        })
        srv.shutdown()
        srv.server_close()
        if a.bokeh:
            try:
                row["bokeh_webgl"] = bokeh_page(at, chromium, flags, work)
            except Exception as exc:  # a timeout at 10^6 points is a result too
                row["bokeh_webgl"] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        log.info("browser %d: %s", n, json.dumps(row))
        out.append(row)
    return out


def bokeh_page(at, chromium: str, flags: list[str], work: Path) -> dict:
    """Bokeh (the dashboard's library) WebGL scatter of the same points: load to first render in Chromium."""
    from bokeh.models import ColumnDataSource
    from bokeh.plotting import figure, save
    from bokeh.resources import INLINE
    from playwright.sync_api import sync_playwright

    t = at.table
    html = work / f"bokeh_{len(t)}.html"
    t0 = time.perf_counter()
    fig = figure(output_backend="webgl", width=900, height=740, tools="pan,wheel_zoom,lasso_select,box_select")
    fig.scatter("x", "y", color="c", size=2, source=ColumnDataSource({"x": t.map_x.to_numpy(), "y": t.map_y.to_numpy(),
                                                                     "c": t.cluster_color.to_numpy()}))
    save(fig, filename=html, resources=INLINE, title="bokeh")  # inline BokehJS: no network here
    build = time.perf_counter() - t0
    with sync_playwright() as p, tempfile.TemporaryDirectory() as prof:
        ctx = p.chromium.launch_persistent_context(prof, executable_path=chromium, headless=True, args=flags,
                                                   viewport={"width": 1200, "height": 760})
        page = ctx.new_page()
        t1 = time.perf_counter()
        page.goto(html.as_uri())
        page.wait_for_function(
            "window.Bokeh && Bokeh.index && Bokeh.index.roots && Bokeh.index.roots.length > 0"
            " && Bokeh.index.roots.every(v => v.has_finished())",
            timeout=600000)
        page.evaluate("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")
        load = time.perf_counter() - t1
        ctx.close()
    return {"html_mib": round(html.stat().st_size / 2**20, 1), "python_build_s": round(build, 1),
            "load_to_render_s": round(load, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--parts", default="quality,scale,browser")
    ap.add_argument("--snr", default="0.04,0.15")
    ap.add_argument("--n-tomograms", type=int, default=4)
    ap.add_argument("--size", default="64,256,256")
    ap.add_argument("--n-particles", type=int, default=90)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--sizes", default="1e5,1e6", help="embedding rows of the scale and browser parts")
    ap.add_argument("--naive", default="1e5", help="sizes that also run one umap fit_transform on all rows")
    ap.add_argument("--methods", default="pca,umap",
                    help="atlas projections timed in the scale part (umap-model: --transform model)")
    ap.add_argument("--umap-sizes", default="1e5,1e6", help="sizes the umap atlas runs at")
    ap.add_argument("--neighbors", type=int, default=40)
    ap.add_argument("--timeout", type=float, default=1800, help="wall limit of each timed command (s)")
    ap.add_argument("--fit-sample", type=int, default=None, help="atlas --fit-sample (default: the atlas's)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--bokeh", action="store_true", help="also time a Bokeh WebGL page of the same points")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.quick:
        a.snr, a.epochs, a.sizes, a.naive, a.n_tomograms, a.fit_sample = "0.15", 5, "2e4,1e5", "2e4", 3, 5000
        a.umap_sizes = "2e4"
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("distributed", "milotile", "numba", "bokeh"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="atlas_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"command": "python benchmarks/atlas.py " + " ".join(sys.argv[1:]), "load_avg_at_start": os.getloadavg(),
                 "args": vars(a)}
    parts = a.parts.split(",")
    if "quality" in parts:
        res["quality"] = quality(work, a)
    if "scale" in parts:
        res["scale"] = scale(work, a)
    if "browser" in parts:
        res["browser"] = browser(work, a)
    res["load_avg_at_end"] = os.getloadavg()
    name = a.out or ("atlas_quick" if a.quick else "atlas")
    path = write_results(name, res)
    print(json.dumps(res, indent=1, default=float))
    print("wrote", path, "machine", machine())


if __name__ == "__main__":
    main()
