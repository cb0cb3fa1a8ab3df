"""Segment-clustering benchmark (issue 14): throughput and memory at scale, clustering quality.

Part A — scale. A synthetic label volume (default 576 x 1024 x 1024 uint32 = 2.4 GB, ~18 000 objects of
four shape classes, radius 2-3.5 voxels) is generated chunk by chunk into Zarr (never whole in
memory), ingested, then timed, each variant in its own process (peak RSS = process + workers):

* milotile ``segments index`` and ``segments features`` (hand-crafted only) through the CLI with a
  2-worker LocalCluster (start-up included), and the same in-process (cluster already up);
* the naive way in one process, as EManalysis does it: the whole label volume in memory, then
  (index) per-z-slice ``regionprops`` merged per id, and a whole-volume scipy pass
  (``find_objects`` + ``bincount``); (features) per object, the full slices it spans are compared
  with its id (EManalysis re-reads whole slices per object) and the same measurements are taken.
  The naive feature loop is timed on a random sample of objects and extrapolated (stated in the JSON).

Part B — quality. On a smaller volume (default 64 x 256 x 256, ~128 objects) hand-crafted and learned features
(SimSiam, VAE, point-cloud AE trained briefly on CPU) are clustered with every algorithm; ARI,
NMI and Hungarian-matched accuracy against the known classes. The hand-crafted sets are also
clustered on the Part-A objects.

    nice -n 15 python benchmarks/segments.py                 # both parts
    python benchmarks/segments.py --quick                    # small sizes, a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_measured, write_results  # noqa: E402

NAIVE_INDEX = """
import sys, time, json, numpy as np, zarr
from scipy import ndimage
from skimage.measure import regionprops
store = sys.argv[1]
t0 = time.perf_counter()
vol = zarr.open_array(store, path="segments/volume/labels/objects/0", mode="r")[:]
t_load = time.perf_counter() - t0
t0 = time.perf_counter()
info = {}
for z in range(vol.shape[0]):              # EManalysis prep_data_info: regionprops per slice
    for r in regionprops(vol[z]):
        d = info.setdefault(r.label, [0, [], 0.0, 0.0, 0.0])
        d[0] += r.area; d[1].append(z)
        cy, cx = r.centroid
        d[2] += z * r.area; d[3] += cy * r.area; d[4] += cx * r.area
t_slices = time.perf_counter() - t0
t0 = time.perf_counter()
sl = ndimage.find_objects(vol)
counts = np.bincount(vol.ravel())
t_scipy = time.perf_counter() - t0
print(json.dumps({"load_s": t_load, "per_slice_regionprops_s": t_slices, "scipy_whole_volume_s": t_scipy,
                  "objects": len(info), "objects_scipy": int(np.count_nonzero(counts[1:]))}))
"""

NAIVE_FEATURES = """
import sys, time, json, numpy as np, zarr, pandas as pd
from milotile.segments.shape import measure
store, n_sample, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
ob = pd.read_parquet(store + "/tables/objects.parquet")
t0 = time.perf_counter()
vol = zarr.open_array(store, path="segments/volume/labels/objects/0", mode="r")[:]
t_load = time.perf_counter() - t0
rng = np.random.default_rng(seed)
pick = ob.iloc[np.sort(rng.choice(len(ob), size=min(n_sample, len(ob)), replace=False))]
t0 = time.perf_counter()
for r in pick.itertuples():
    # EManalysis: every slice the object spans is compared with its id over the whole slice
    stack = np.stack([vol[z] == r.id for z in range(r.z0, r.z1)])
    mask = stack[:, r.y0:r.y1, r.x0:r.x1]
    measure(mask, (80.0, 80.0, 80.0))
t_loop = time.perf_counter() - t0
t0 = time.perf_counter()
for r in pick.itertuples():                # the same loop with bounding-box reads (no slice re-reads)
    measure(vol[r.z0:r.z1, r.y0:r.y1, r.x0:r.x1] == r.id, (80.0, 80.0, 80.0))
t_bbox = time.perf_counter() - t0
print(json.dumps({"load_s": t_load, "sample": len(pick), "objects": len(ob), "emanalysis_loop_s": t_loop,
                  "bbox_loop_s": t_bbox}))
"""

IN_PROCESS = """
import sys, time, json
import milotile as mt
from milotile.segments import index_objects, compute_features
store, workers = sys.argv[1], int(sys.argv[2])
if __name__ == "__main__":
    with mt.cluster(workers=workers, threads_per_worker=1, dashboard_address=None):
        t0 = time.perf_counter(); ob = index_objects(store); t_index = time.perf_counter() - t0
        t0 = time.perf_counter(); ft = compute_features(store, crop_size=0, n_points=0); t_feat = time.perf_counter() - t0
    print(json.dumps({"index_s": t_index, "features_s": t_feat, "objects": len(ob)}))
"""


def _render_chunk(scene, lo, hi, em_path, lab_path, seed):
    import zarr

    from milotile.synth.segments import render_block

    em, lab = render_block(scene, lo, hi, seed=seed)
    key = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    zarr.open_array(em_path, mode="r+")[key] = em
    zarr.open_array(lab_path, mode="r+")[key] = lab
    return int(lab.size)


def generate(work: Path, shape, radius, seed, chunks=(64, 256, 256), workers=2):
    """Render a scene chunk by chunk into em.zarr / labels.zarr (parallel, bounded memory)."""
    import dask
    import zarr

    from milotile.synth.segments import iter_blocks, make_scene

    scene = make_scene(shape, radius=radius, seed=seed)
    em_p, lab_p = str(work / "em.zarr"), str(work / "labels.zarr")
    zarr.create_array(em_p, shape=shape, chunks=chunks, dtype="uint8", overwrite=True)
    zarr.create_array(lab_p, shape=shape, chunks=chunks, dtype="uint32", overwrite=True)
    task = dask.delayed(_render_chunk, pure=False)
    sc = dask.delayed(scene)
    dask.compute(*[task(sc, lo, hi, em_p, lab_p, seed) for lo, hi in iter_blocks(shape, chunks)],
                 scheduler="processes", num_workers=workers)
    scene.objects.to_parquet(work / "classes.parquet", index=False)
    return scene, em_p, lab_p


STEPS = ("index_cli", "features_cli", "in_process", "naive_index", "naive_features", "quality")


def part_a(work: Path, shape, radius, seed, sample, workers, steps=STEPS, prior: dict | None = None) -> dict:
    """Part A; an existing ``work/big.zarr`` (from an earlier run with ``--work``) is reused."""
    import pandas as pd

    store = work / "big.zarr"
    res: dict = dict(prior or {})
    if (store / "tables" / "objects.parquet").is_file():
        n = len(pd.read_parquet(store / "tables" / "objects.parquet"))
        res.setdefault("reused_store", str(store))
    else:
        t0 = time.perf_counter()
        scene, em_p, lab_p = generate(work, shape, radius, seed, workers=workers)
        t_gen = time.perf_counter() - t0
        n = len(scene.objects)
        wall_ing, rss_ing, _ = run_measured([sys.executable, "-m", "milotile.cli", "-q", "--workers", str(workers),
                                             "segments", "ingest", "--em", em_p, "--labels", lab_p, "--classes",
                                             str(work / "classes.parquet"), "--store", str(store), "--voxel-size",
                                             "80"], env={"MILOTILE_PROGRESS": "0"})
        print(f"generated {n} objects {shape} in {t_gen:.0f} s; ingest CLI {wall_ing:.0f} s", flush=True)
        res.update({"generate_s": t_gen,
                    "ingest_cli": {"wall_s": wall_ing, "peak_rss_gib": rss_ing / 2**30, "objects_per_s": n / wall_ing,
                                   "load_avg_1m": os.getloadavg()[0]}})
    res.update({"shape": list(shape), "label_bytes": int(np.prod(shape)) * 4, "objects": n})
    cli = [sys.executable, "-m", "milotile.cli", "-q", "--workers", str(workers), "segments"]
    for step, args in (("index_cli", ["index", str(store)]),
                       ("features_cli", ["features", str(store), "--crop-size", "0", "--points", "0"])):
        if step not in steps:
            continue
        wall, rss, _ = run_measured(cli + args, env={"MILOTILE_PROGRESS": "0"})
        res[step] = {"wall_s": wall, "peak_rss_gib": rss / 2**30, "objects_per_s": n / wall,
                     "load_avg_1m": os.getloadavg()[0]}
        print(step, res[step], flush=True)
    if "in_process" in steps:
        wall, rss, out = run_measured([sys.executable, "-c", IN_PROCESS, str(store), str(workers)],
                                      env={"MILOTILE_PROGRESS": "0"})
        ip = json.loads(out.strip().splitlines()[-1])
        res["in_process"] = {**ip, "index_objects_per_s": n / ip["index_s"],
                             "features_objects_per_s": n / ip["features_s"], "peak_rss_gib": rss / 2**30,
                             "load_avg_1m": os.getloadavg()[0]}
        print("in_process", res["in_process"], flush=True)
    if "naive_index" in steps:
        wall, rss, out = run_measured([sys.executable, "-c", NAIVE_INDEX, str(store)])
        ni = json.loads(out.strip().splitlines()[-1])
        res["naive_index"] = {**ni, "wall_s": wall, "peak_rss_gib": rss / 2**30,
                              "emanalysis_objects_per_s": n / (ni["load_s"] + ni["per_slice_regionprops_s"]),
                              "scipy_objects_per_s": n / (ni["load_s"] + ni["scipy_whole_volume_s"]),
                              "load_avg_1m": os.getloadavg()[0]}
        print("naive_index", res["naive_index"], flush=True)
    if "naive_features" in steps:
        wall, rss, out = run_measured([sys.executable, "-c", NAIVE_FEATURES, str(store), str(sample), str(seed)])
        nf = json.loads(out.strip().splitlines()[-1])
        per_ema, per_bbox = nf["emanalysis_loop_s"] / nf["sample"], nf["bbox_loop_s"] / nf["sample"]
        res["naive_features"] = {
            **nf, "wall_s": wall, "peak_rss_gib": rss / 2**30, "extrapolated": True,
            "emanalysis_objects_per_s": 1 / per_ema, "bbox_loop_objects_per_s": 1 / per_bbox,
            "emanalysis_extrapolated_total_s": nf["load_s"] + per_ema * n,
            "bbox_loop_extrapolated_total_s": nf["load_s"] + per_bbox * n,
            "note": f"per-object loops timed on {nf['sample']} random objects, extrapolated to {n}",
            "load_avg_1m": os.getloadavg()[0],
        }
        print("naive_features", res["naive_features"], flush=True)
    res["speedup"] = _speedups(res)
    if "quality" in steps:
        res["quality_handcrafted"] = quality(store, ["kmeans", "spectral", "agglomerative", "hdbscan", "affinity"],
                                             {k: v for k, v in FEATURE_SETS.items() if not any(x in v for x in LEARNED)})
    return res


def _speedups(res: dict) -> dict:
    """Ratios naive time / milotile time (whole CLI command, start-up included) where both were measured."""
    out = {}
    ni, nf = res.get("naive_index"), res.get("naive_features")
    if ni and "index_cli" in res:
        out["index_cli_vs_emanalysis_per_slice"] = (ni["load_s"] + ni["per_slice_regionprops_s"]) / res["index_cli"]["wall_s"]
        out["index_cli_vs_scipy_whole_volume"] = (ni["load_s"] + ni["scipy_whole_volume_s"]) / res["index_cli"]["wall_s"]
    if nf and "features_cli" in res:
        out["features_cli_vs_emanalysis_loop"] = nf["emanalysis_extrapolated_total_s"] / res["features_cli"]["wall_s"]
        out["features_cli_vs_bbox_loop"] = nf["bbox_loop_extrapolated_total_s"] / res["features_cli"]["wall_s"]
    return out


LEARNED = ("simsiam", "vae", "pointae")
FEATURE_SETS = {
    "size": "size",
    "shape": "sphericity,circularity,skeleton,axes,thickness",
    "all_handcrafted": "size,surface,sphericity,circularity,skeleton,axes,thickness,nn",
    "simsiam": "simsiam",
    "vae": "vae",
    "pointae": "pointae",
    "shape+learned": "sphericity,skeleton,axes,simsiam,vae,pointae",
}


def quality(store, algorithms, sets) -> dict:
    from milotile.errors import InputError
    from milotile.segments import cluster_objects

    out: dict = {}
    for sname, feats in sets.items():
        for alg in algorithms:
            t0 = time.perf_counter()
            try:
                r = cluster_objects(store, features=feats, algorithm=alg, n_clusters=4, relabel=False,
                                    **({"eps": 0.8} if alg == "dbscan" else {}))
                out[f"{sname}/{alg}"] = {**r.scores, "clusters": r.n_clusters, "seconds": time.perf_counter() - t0}
            except InputError as exc:
                out[f"{sname}/{alg}"] = {"refused": str(exc)}
            print(sname, alg, out[f"{sname}/{alg}"], flush=True)
    return out


def part_b(work: Path, shape, radius, seed, epochs) -> dict:
    from milotile.segments import compute_features, embed_objects, ingest_segments, train_model
    from milotile.synth.segments import synth_segments

    info = synth_segments(work / "small", shape=shape, radius=radius, seed=seed + 1)
    store = work / "small.zarr"
    ingest_segments(info["em"], info["labels"], store, classes=info["classes"], chunks=(32, 128, 128))
    compute_features(store, crop_size=16, n_points=64, seed=seed)
    train = {}
    for kind in LEARNED:
        t0 = time.perf_counter()
        ck = train_model(store, kind, epochs=epochs[kind], batch_size=32, seed=seed, local=True)
        embed_objects(store, kind, model=ck)
        train[kind] = {"epochs": epochs[kind], "seconds": time.perf_counter() - t0, "load_avg_1m": os.getloadavg()[0]}
        print("trained", kind, train[kind], flush=True)
    q = quality(store, ["kmeans", "spectral", "agglomerative", "affinity", "dbscan", "hdbscan"], FEATURE_SETS)
    return {"shape": list(shape), "objects": int(info["n_objects"]), "per_class": info["per_class"],
            "training": train, "scores": q}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="576,1024,1024", help="Part A volume (z,y,x)")
    ap.add_argument("--small", default="64,256,256", help="Part B volume (z,y,x)")
    ap.add_argument("--sample", type=int, default=60, help="objects of the naive per-object feature loop")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--parts", default="a,b")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--work", default=None, help="scratch folder (kept; an existing big.zarr in it is reused)")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"part A steps (default all: {','.join(STEPS)})")
    ap.add_argument("--prior", default=None, help="JSON of part-A figures measured by an earlier run on the same store")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    small = tuple(int(v) for v in args.small.split(","))
    epochs = {"simsiam": 12, "vae": 8, "pointae": 15}
    if args.quick:
        size, small, args.sample, epochs = (64, 256, 256), (64, 192, 192), 10, {"simsiam": 2, "vae": 2, "pointae": 2}
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="seg-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    payload: dict = {"quick": args.quick, "load_avg_start": os.getloadavg()}
    try:
        if "b" in args.parts:
            payload["quality"] = part_b(work, small, (2.0, 3.5), args.seed, epochs)
        if "a" in args.parts:
            prior = json.loads(Path(args.prior).read_text()) if args.prior else None
            payload["scale"] = part_a(work, size, (2.0, 3.5), args.seed, args.sample, args.workers,
                                      tuple(args.steps.split(",")), prior)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    payload["load_avg_end"] = os.getloadavg()
    parts = "".join(sorted(p for p in args.parts.split(",") if p))
    name = "segments" + ("" if parts == "ab" else f"_{parts}") + ("_quick" if args.quick else "")
    path = write_results(name, payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
