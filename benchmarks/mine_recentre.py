"""Benchmark: the cost and the effect of ``mine --recentre`` (issue 24), as a user runs it.

The hard preset (``milotile synth --preset hard``: 3 tomograms of 128 x 256 x 256, four species of radius
12/9/7/5 voxels, crowders, membranes, gold) is generated, ingested and preprocessed once. Then, each in its
own fresh process (start-up, imports and the Dask cluster included):

* ``plain``: ``milotile mine STORE --border 8 --border-z 4 --recentre off`` (MiLoPYP's DoG candidates);
* ``auto``: the same with ``--recentre auto`` (mean shift of radius 2.4 x the largest DoG sigma as Dask
  tasks, then NMS again);

and, in this process on the plain candidates, the mean shift as it ran before it became Dask tasks: one
window read per candidate through the chunk-cached reader, tomogram after tomogram in the main process
(:func:`milotile.ops.recentre.density_centres`), against the tasks on a 2-worker cluster.

Reported per variant: wall time, candidates, and the candidates' centring: for every particle with a
candidate within its radius, the distance of the nearest one (median, per species), and the share of
particles with a candidate within 3 voxels of the centre.

    python benchmarks/mine_recentre.py --work /tmp/mine_recentre      # ~3 min on 2 cores

Writes ``benchmarks/results/mine_recentre.json`` (``MILOTILE_BENCH_SUFFIX`` appends a suffix).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

MINE_ARGS = ["--border", "8", "--border-z", "4"]


def centring(cands: pd.DataFrame, gt: pd.DataFrame) -> dict:
    """Per species: particles with a candidate within their radius, the nearest one's median distance, and the
    share of particles with a candidate within 3 voxels."""
    out = {}
    for sp, g in gt.groupby("species"):
        d = np.full(len(g), np.inf)
        for name, gg in g.groupby("tomogram"):
            c = cands[cands["tomogram"] == name]
            if len(c):
                dd, _ = cKDTree(c[["x", "y", "z"]].to_numpy()).query(gg[["x", "y", "z"]].to_numpy())
                d[np.flatnonzero(g["tomogram"].to_numpy() == name)] = dd
        on = d <= g["radius"].to_numpy()
        out[str(sp)] = {"particles": int(len(g)), "with_candidate": int(on.sum()),
                        "median_distance": round(float(np.median(d[on])), 2) if on.any() else None,
                        "within_3": round(float((d <= 3).mean()), 3)}
    return out


def cli(store: Path, table: str, recentre: str) -> float:
    t0 = time.perf_counter()
    exe = Path(sys.executable).parent / "milotile"  # the console script, as a user runs it
    subprocess.run([str(exe), "mine", str(store), *MINE_ARGS, "--recentre", recentre,
                    "--table", table], check=True, capture_output=True, text=True)
    return round(time.perf_counter() - t0, 2)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/mine_recentre")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=2, help="CLI runs per variant (interleaved; the best is reported)")
    a = ap.parse_args(argv)

    import dask

    import milotile as mt
    from milotile.ops.recentre import density_centre_tasks, density_centres, gather_centres
    from milotile.ops.volume_reader import VolumeReader
    from milotile.synth import synth

    work = Path(a.work)
    d = work / f"hard_s{a.seed}"
    if not (d / "ground_truth.parquet").exists():
        synth(d, seed=a.seed, preset="hard")
    store = d / "store.zarr"
    if not store.exists():
        with mt.cluster(workers=2, threads_per_worker=1, dashboard_address=None):
            mt.ingest(d / "tomograms.txt", store, overwrite=True).preprocess()
    gt = pd.read_parquet(d / "ground_truth.parquet")

    runs: dict[str, list[float]] = {"plain": [], "auto": []}
    for _ in range(a.repeats):
        runs["plain"].append(cli(store, "bench-plain", "off"))
        runs["auto"].append(cli(store, "bench-auto", "auto"))
    col = mt.open(store)
    plain, auto = col.read_table("bench-plain"), col.read_table("bench-auto")
    radius = float(col.table_params("bench-auto")["recentre"])

    # the mean shift alone: sequential reader (the earlier code path) against the Dask tasks
    t0 = time.perf_counter()
    for name in col.names:
        c = plain[plain["tomogram"] == name]
        density_centres(VolumeReader(col[name].data(0), name, max_chunks=64), c[["z", "y", "x"]].to_numpy(), radius,
                        contrast="dark")
    seq_s = time.perf_counter() - t0
    with mt.cluster(workers=2, threads_per_worker=1, dashboard_address=None):
        t0 = time.perf_counter()
        plans = {n: density_centre_tasks(col[n].data(0), plain[plain["tomogram"] == n][["z", "y", "x"]].to_numpy(),
                                         radius, contrast="dark") for n in col.names}
        res = dask.compute(*[t for p in plans.values() for _, t in p])
        k = 0
        for n, p in plans.items():
            gather_centres(plain[plain["tomogram"] == n][["z", "y", "x"]].to_numpy(), p, res[k:k + len(p)], "dark")
            k += len(p)
        task_s = time.perf_counter() - t0
    n = len(plain)
    out = {
        "data": {"preset": "hard", "seed": a.seed, "shape": list(col[col.names[0]].shape), "tomograms": len(col.names)},
        "cli_s": {k: {"runs": v, "best": min(v)} for k, v in runs.items()},
        "cli_ratio_auto_to_plain": round(min(runs["auto"]) / min(runs["plain"]), 2),
        "candidates": {"plain": int(len(plain)), "auto": int(len(auto))},
        "recentre_radius": radius,
        "mean_shift_only": {"sequential_reader_s": round(seq_s, 2), "dask_tasks_2_workers_s": round(task_s, 2),
                            "ms_per_candidate_sequential": round(seq_s / n * 1e3, 2),
                            "ms_per_candidate_tasks": round(task_s / n * 1e3, 2),
                            "speedup": round(seq_s / task_s, 2)},
        "centring": {"plain": centring(plain, gt), "auto": centring(auto, gt)},
        "load_avg": os.getloadavg(),
    }
    path = write_results("mine_recentre", out)
    print({k: out[k] for k in ("cli_s", "cli_ratio_auto_to_plain", "candidates", "mean_shift_only")})
    for k in ("plain", "auto"):
        print(k, {sp: (v["median_distance"], v["within_3"]) for sp, v in out["centring"][k].items()})
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
