"""Benchmark: gauss + DoG + mining with milotile (1 and 2 Dask workers) vs MiLoPYP's whole-volume way.

Measures, in one run on the same ``milotile synth`` tomogram:

* wall time and peak RSS (whole process tree: driver + workers, sampled every 50 ms) of
  preprocess (Gaussian, global normalisation, clip) + mining (DoG, maxima, threshold, NMS) for
  milotile on a ``LocalCluster`` with 1 and 2 single-threaded workers, and for the MiLoPYP way
  (whole volume in float64, single-process scipy, pure-Python greedy NMS with linear-index sphere
  offsets) run in a subprocess;
* candidates per second of patch extraction (slab, bbox 36, with MiLoPYP's 4 shifted copies);
* recall of the ground-truth particles by the candidates, per species (a particle counts as found
  when a candidate lies within its radius).

Usage::

    python benchmarks/preprocess.py                 # 256 x 512 x 512 (the issue's size)
    python benchmarks/preprocess.py --quick         # 64 x 128 x 128, seconds

Writes ``benchmarks/results/preprocess.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent


class PeakRSS:
    """Sample the summed RSS of this process and all its descendants."""

    def __init__(self, pid: int | None = None, interval: float = 0.05):
        self.proc = psutil.Process(pid or os.getpid())
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()

    def _total(self) -> int:
        total = 0
        for p in [self.proc, *self.proc.children(recursive=True)]:
            try:
                total += p.memory_info().rss
            except psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._total())
            time.sleep(self.interval)

    def __enter__(self) -> PeakRSS:
        self.base = self._total()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.thread.join()


# --------------------------------------------------------------------------- MiLoPYP's way (subprocess)

MILOPYP_SCRIPT = r"""
import sys, time, json, resource
import numpy as np, mrcfile
from scipy import ndimage as ndi
path, gauss, s1, s2, k, md, bz, bxy = sys.argv[1], *map(float, sys.argv[2:])
t0 = time.perf_counter()
with mrcfile.open(path, permissive=True) as m:
    vol = np.zeros(m.data.shape)                      # float64 buffer, filled slice by slice
    for i in range(m.data.shape[0]):
        vol[i] = m.data[i]
vol = (vol - vol.mean()) / vol.std()
vol = ndi.gaussian_filter(vol, gauss)
vol = (vol - vol.mean()) / vol.std()
q = np.clip((vol + 3) / 6 * 255, 0, 255).astype(np.uint8).astype(np.float64)
vol = (q - q.min()) / (q.max() - q.min())
g1 = ndi.gaussian_filter(vol, s1); g2 = ndi.gaussian_filter(vol, s2)
d = g2 - g1
bz, bxy = int(bz), int(bxy)
d[:bz] = 0; d[-bz:] = 0; d[:, :bxy] = 0; d[:, -bxy:] = 0; d[:, :, :bxy] = 0; d[:, :, -bxy:] = 0
d = np.where(d == ndi.maximum_filter(d, size=(1, 3, 3)), d, 0)
pos = d[d > 0]
thr = pos.mean() + k * pos.std()
# greedy NMS over every voxel by descending value, suppressing linear-index sphere offsets
r = int(md)
g = np.mgrid[-r:r + 1, -r:r + 1, -r:r + 1].reshape(3, -1)
g = g[:, (g ** 2).sum(0) <= md * md]
Z, Y, X = d.shape
offs = g[0] * Y * X + g[1] * X + g[2]
flat = d.ravel()
order = np.argsort(-flat, kind="stable")
supp = set()
keep = []
for i in order:
    if flat[i] <= thr:
        break
    if i in supp:
        continue
    keep.append(i)
    supp.update((i + offs).tolist())
zz, yy, xx = np.unravel_index(np.array(keep, dtype=np.int64), d.shape)
t = time.perf_counter() - t0
print(json.dumps({"time_s": t, "n": len(keep), "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "xyz": np.stack([xx, yy, zz], 1).tolist()}))
"""


def run_milopyp(rec: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, "-c", MILOPYP_SCRIPT, str(rec), str(args.gauss), str(args.dog[0]), str(args.dog[1]),
           str(args.threshold_std), str(args.min_distance), str(args.border_z), str(args.border)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    mon = PeakRSS(proc.pid)
    with mon:
        out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    res = json.loads(out)
    res["wall_s"] = wall
    res["peak_rss_mb"] = max(mon.peak / 2**20, res["maxrss_mb"])
    return res


def recall(cands, gt) -> dict:
    from scipy.spatial import cKDTree

    if len(cands) == 0:
        return {s: 0.0 for s in gt["species"].unique()}
    d, _ = cKDTree(np.asarray(cands, float)).query(gt[["x", "y", "z"]].to_numpy())
    hit = d <= gt["radius"].to_numpy()
    out = {str(s): float(hit[(gt["species"] == s).to_numpy()].mean()) for s in sorted(gt["species"].unique())}
    out["all"] = float(hit.mean())
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256,512,512", help="Z,Y,X of the synthetic tomogram")
    p.add_argument("--quick", action="store_true", help="64,128,128 and smaller mining parameters")
    p.add_argument("--workers", default="1,2", help="LocalCluster sizes to time (default 1,2)")
    p.add_argument("--gauss", type=float, default=0.8)
    p.add_argument("--dog", default="3,5")
    p.add_argument("--threshold-std", type=float, default=0.5)
    p.add_argument("--min-distance", type=float, default=7.0)
    p.add_argument("--border", type=int, default=30)
    p.add_argument("--border-z", type=int, default=10)
    p.add_argument("--bbox", type=int, default=36)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--chunks", default="64,256,256", help="store chunks (z,y,x)")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--out", default=str(HERE / "results" / "preprocess.json"))
    args = p.parse_args()
    if args.quick:
        args.size, args.border, args.border_z, args.chunks = "64,128,128", 12, 4, "32,64,64"
    size = tuple(int(v) for v in args.size.split(","))
    args.dog = tuple(float(v) for v in args.dog.split(","))
    chunks = tuple(int(v) for v in args.chunks.split(","))
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("distributed").setLevel(logging.WARNING)

    import dask
    from distributed import Client, LocalCluster

    import milotile as mt
    from milotile.stages import extract_patches, mine, preprocess
    from milotile.synth import synth

    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="mt-bench-"))
    t0 = time.perf_counter()
    res = synth(tmp / "synth", seed=0, n_tomograms=1, size=size, snr=args.snr)
    print(f"synth {size}: {time.perf_counter() - t0:.1f} s, {len(res.ground_truth)} particles")
    gt = res.ground_truth
    col = mt.ingest(res.manifest, tmp / "store.zarr", chunks=chunks)
    out: dict = {"size_zyx": size, "chunks": chunks, "params": {k: v for k, v in vars(args).items() if k != "out"},
                 "cpu_count": os.cpu_count(), "load_avg_start": os.getloadavg()}

    base = run_milopyp(res.rec_paths[0], args)
    print(f"MiLoPYP whole-volume float64: {base['wall_s']:.1f} s, peak RSS {base['peak_rss_mb']:.0f} MiB, "
          f"{base['n']} candidates")
    out["milopyp"] = {k: v for k, v in base.items() if k != "xyz"}
    out["milopyp"]["recall"] = recall(base["xyz"], gt)

    mine_kw = dict(dog=args.dog, threshold_std=args.threshold_std, min_distance=args.min_distance,
                   border=args.border, border_z=args.border_z)
    out["milotile"] = {}
    for nw in [int(v) for v in args.workers.split(",")]:
        with LocalCluster(n_workers=nw, threads_per_worker=1, processes=True, dashboard_address=None) as cl, \
                Client(cl) as client:
            client.run(lambda: __import__("milotile.stages.mine"))  # warm the workers' imports
            mon = PeakRSS()
            with mon:
                t0 = time.perf_counter()
                preprocess(col, gauss=args.gauss, overwrite=True, tilts=False)
                t1 = time.perf_counter()
                cands = mine(col, **mine_kw)
                t2 = time.perf_counter()
            kp0 = time.perf_counter()
            key = extract_patches(col, bbox=args.bbox, modes=("slab",), shifts=True, overwrite=True)
            kp = time.perf_counter() - kp0
        r = {
            "wall_s": t2 - t0, "preprocess_s": t1 - t0, "mine_s": t2 - t1,
            "peak_rss_mb": mon.peak / 2**20, "rss_before_mb": mon.base / 2**20, "n": len(cands),
            "patches_s": kp, "patches_per_s": len(cands) / kp if kp > 0 else None,
            "recall": recall(cands[["x", "y", "z"]].to_numpy(), gt),
        }
        out["milotile"][str(nw)] = r
        print(f"milotile {nw} worker(s): {r['wall_s']:.1f} s (preprocess {r['preprocess_s']:.1f} + mine "
              f"{r['mine_s']:.1f}), peak RSS {r['peak_rss_mb']:.0f} MiB, {r['n']} candidates; patches "
              f"{r['patches_per_s']:.0f}/s ({key})")
        print(f"  recall per species: {r['recall']}")
    print(f"  MiLoPYP recall per species: {out['milopyp']['recall']}")
    for nw, r in out["milotile"].items():
        r["speedup_vs_milopyp"] = base["wall_s"] / r["wall_s"]
        r["memory_fraction_vs_milopyp"] = r["peak_rss_mb"] / base["peak_rss_mb"]
        print(f"{nw} worker(s): {r['speedup_vs_milopyp']:.2f}x faster, {r['memory_fraction_vs_milopyp']:.2f} of "
              f"MiLoPYP's peak memory")
    out["load_avg_end"] = os.getloadavg()
    out["dask_version"] = dask.__version__
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
