"""Benchmark: gauss + DoG + mining with milotile (1 and 2 Dask workers) vs MiLoPYP's whole-volume way.

The ``milotile synth`` tomogram is generated and ingested once (in its own process). Then every
variant runs in its **own fresh subprocess**, and wall time and peak RSS are measured on that
subprocess's whole process tree (driver + Dask workers, sampled every 50 ms by
``_common.run_measured``):

* ``milopyp``: the MiLoPYP way — the whole tomogram in RAM as float64, single-process scipy
  Gaussian (σ ``--gauss``), global z-score, 8-bit quantisation of ``[-3, 3]`` std, min-max, two
  whole-volume Gaussians for the DoG, border zeroing, in-plane (1, 3, 3) maxima, threshold
  mean + k·std of the positive values, greedy NMS over *all voxels* sorted by value with
  linear-index sphere offsets (MiLoPYP §1.2–2.1);
* ``milotile N``: ``milotile.cluster(workers=N, threads_per_worker=1)`` (what the CLI starts),
  ``preprocess(col, gauss)`` + ``mine(col, dog, ...)`` on the store;
* ``cli`` (``--cli``): ``milotile preprocess`` + ``milotile mine`` as two commands with the CLI's defaults,
  on a store holding the tomogram alone (issue 12: what a user pays, start-up included).

"total" is the subprocess wall time from launch to exit (interpreter start, imports, cluster start
and shutdown included); "compute" is the time inside the process from the first byte read to the
last candidate (cluster start excluded). Also measured: candidates per second of patch extraction
(slab, bbox 36, MiLoPYP's 4 shifted copies; its own subprocess, 2 workers) and the recall of the
ground-truth particles by the candidates, per species (found = a candidate within the particle
radius).

Usage::

    python benchmarks/preprocess.py                 # 256 x 512 x 512 (the issue's size)
    python benchmarks/preprocess.py --quick         # 64 x 128 x 128, seconds (-> preprocess_quick.json)
    python benchmarks/preprocess.py --repeats 3     # interleaved repeats, medians reported
    python benchmarks/preprocess.py --cli --workers 2 --skip-extras   # issue 12: whole CLI vs whole-volume script

Writes ``benchmarks/results/preprocess.json`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, run_measured, threads, write_results  # noqa: E402

HERE = Path(__file__).resolve().parent


# --------------------------------------------------------------------------- child processes


def child_prepare(a: argparse.Namespace) -> dict:
    """Generate the synthetic tomogram and ingest it (once, outside the measured runs)."""
    import milotile as mt
    from milotile.synth import synth

    work = Path(a.workdir)
    size = tuple(int(v) for v in a.size.split(","))
    chunks = tuple(int(v) for v in a.chunks.split(","))
    t0 = time.perf_counter()
    res = synth(work / "synth", seed=0, n_tomograms=1, size=size, snr=a.snr)
    t1 = time.perf_counter()
    with mt.cluster(workers=2, threads_per_worker=1, dashboard_address=None):
        mt.ingest(res.manifest, work / "store.zarr", chunks=chunks)
        if a.cli:  # the tomogram alone (no tilt series): the same work as the whole-volume script
            mt.ingest([res.rec_paths[0]], work / "store_cli.zarr", chunks=chunks)
    return {"synth_s": t1 - t0, "ingest_s": time.perf_counter() - t1, "rec": str(res.rec_paths[0]),
            "n_particles": len(res.ground_truth)}


def child_milopyp(a: argparse.Namespace) -> dict:
    """MiLoPYP's whole-volume float64 way (only numpy, scipy and mrcfile are imported).

    The functions mirror MiLoPYP's ``load_rec``, ``preprocess`` and ``get_potential_coords_pyramid``
    (reference/milopyp.md §1.2, §1.3, §2.1), including which arrays are alive at the same time: the
    pre-processed volume stays referenced by the caller (MiLoPYP keeps it for patch extraction), the
    list of smoothed copies and the list of DoG levels live until the candidates are returned. The
    in-plane max-pool is ``scipy.ndimage.maximum_filter`` instead of torch's ``max_pool3d``.
    """
    import mrcfile
    import numpy as np
    from scipy import ndimage as ndi

    steps: dict[str, float] = {}
    t0 = last = time.perf_counter()

    def step(name: str) -> None:
        nonlocal last
        now = time.perf_counter()
        steps[name] = now - last
        last = now

    def load_rec(path: str) -> np.ndarray:
        with mrcfile.open(path, permissive=True) as m:
            data = m.data
            vol = np.zeros(data.shape)  # float64 buffer, filled slice by slice
            for i in range(data.shape[0]):
                vol[i] = data[i]
        return (vol - vol.mean()) / vol.std()

    def preprocess(vol: np.ndarray, gauss: float) -> np.ndarray:
        vol = ndi.gaussian_filter(vol, gauss)
        vol = (vol - vol.mean()) / vol.std()
        q = np.clip((vol + 3) / 6 * 255, 0, 255).astype(np.uint8).astype(np.float64)
        return (q - q.min()) / (q.max() - q.min())

    def nms3d(d: np.ndarray, thr: float, radius: float) -> list[int]:
        r = int(radius)
        g = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1].reshape(3, -1)
        g = g[:, (g**2).sum(0) <= radius**2]
        _, ny, nx = d.shape
        offs = g[0] * ny * nx + g[1] * nx + g[2]
        flat = d.ravel()
        order = np.argsort(-flat, kind="stable")  # every voxel, as MiLoPYP
        supp: set[int] = set()
        keep = []
        for i in order:
            if flat[i] <= thr:
                break
            if i in supp:
                continue
            keep.append(int(i))
            supp.update((i + offs).tolist())
        return keep

    def coords_pyramid(rec: np.ndarray, sigmas, k: float, radius: float, bz: int, bxy: int) -> np.ndarray:
        smoothed = [ndi.gaussian_filter(rec, s) for s in sigmas]
        dogs = [smoothed[i + 1] - smoothed[i] for i in range(len(sigmas) - 1)]
        step("dog")
        for d in dogs:
            d[:bz] = 0
            d[-bz:] = 0
            d[:, :bxy] = 0
            d[:, -bxy:] = 0
            d[:, :, :bxy] = 0
            d[:, :, -bxy:] = 0
        dogs = [np.where(d == ndi.maximum_filter(d, size=(1, 3, 3)), d, 0) for d in dogs]
        merged = np.max(np.stack(dogs), axis=0)
        pos = merged[merged > 0]
        thr = pos.mean() + k * pos.std()
        step("maxima")
        keep = nms3d(merged, thr, radius)
        zz, yy, xx = np.unravel_index(np.array(keep, dtype=np.int64), merged.shape)
        step("nms")
        return np.stack([xx, yy, zz], 1).astype(np.float64)

    rec = load_rec(a.rec)
    step("load")
    rec = preprocess(rec, a.gauss)
    step("preprocess")
    xyz = coords_pyramid(rec, a.dog, a.threshold_std, a.min_distance, a.border_z, a.border)
    np.save(Path(a.workdir) / "cands_milopyp.npy", xyz)
    return {"compute_s": time.perf_counter() - t0, "steps_s": steps, "n": len(xyz)}


def child_milotile(a: argparse.Namespace) -> dict:
    """milotile on a LocalCluster of ``--workers`` single-threaded worker processes."""
    t_imp = time.perf_counter()
    import numpy as np

    import milotile as mt
    from milotile.stages import mine, preprocess

    t0 = time.perf_counter()
    chunks = tuple(int(v) for v in a.mine_chunks.split(",")) if a.mine_chunks else None
    with mt.cluster(workers=a.workers, threads_per_worker=1, dashboard_address=None) as client:
        t1 = time.perf_counter()
        col = mt.open(Path(a.workdir) / "store.zarr")
        preprocess(col, gauss=a.gauss, overwrite=True, tilts=False)
        t2 = time.perf_counter()
        cands = mine(col, dog=a.dog, threshold_std=a.threshold_std, nms_distance=a.min_distance,
                     border=a.border, border_z=a.border_z, chunks=chunks)
        t3 = time.perf_counter()

        def probe() -> dict:
            t = os.times()
            return {"torch": "torch" in sys.modules, "cpu_s": t.user + t.system,
                    **{k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}}

        workers = list(client.run(probe).values())
        own = os.times()
    t4 = time.perf_counter()
    np.save(Path(a.workdir) / f"cands_milotile{a.workers}.npy", cands[["x", "y", "z"]].to_numpy(np.float64))
    return {
        "import_s": t0 - t_imp, "cluster_start_s": t1 - t0, "preprocess_s": t2 - t1, "mine_s": t3 - t2,
        "compute_s": t3 - t1, "cluster_close_s": time.perf_counter() - t4, "n": len(cands),
        "client_cpu_s": own.user + own.system, "workers_cpu_s": sum(w.pop("cpu_s") for w in workers),
        "client_imported_torch": "torch" in sys.modules, "workers": workers,
    }


def child_patches(a: argparse.Namespace) -> dict:
    """Patch extraction of the current candidate table (slab, MiLoPYP shifts), timed alone."""
    import milotile as mt
    from milotile.stages import extract_patches

    with mt.cluster(workers=a.workers, threads_per_worker=1, dashboard_address=None):
        col = mt.open(Path(a.workdir) / "store.zarr")
        n = len(col.read_table("candidates"))
        t0 = time.perf_counter()
        key = extract_patches(col, bbox=a.bbox, modes=("slab",), shifts=True, overwrite=True)
        dt = time.perf_counter() - t0
    return {"key": key, "n": n, "patches_s": dt, "candidates_per_s": n / dt if dt > 0 else None}


def child_gaussian(a: argparse.Namespace) -> dict:
    """The lazy Gaussian alone: ``ops.filters.gaussian`` (dask-image's ``gaussian_filter`` since issue 9)
    vs milotile's former own wrapper (scipy per block through ``ops.blocks.overlap_apply``).

    Same input (the stored level-0 tomogram), same sigma, truncation and boundary mode, threaded
    scheduler with 2 threads, interleaved repeats; the result is summed so nothing is held.
    """
    import dask
    import numpy as np
    from scipy import ndimage as ndi

    import milotile as mt
    from milotile.ops.blocks import BOUNDARY, overlap_apply
    from milotile.ops.filters import gaussian, gaussian_halo

    def own(x, s):
        sig = (float(s),) * x.ndim
        return overlap_apply(lambda b: ndi.gaussian_filter(b, sig, truncate=4.0, mode=BOUNDARY), x,
                             gaussian_halo(sig, x.ndim), dtype=np.float32)

    col = mt.open(Path(a.workdir) / "store.zarr")
    x = col[col.names[0]].data(0)
    fns = {"milotile": lambda: own(x, a.gauss),
           "dask_image": lambda: gaussian(x, a.gauss, mode=BOUNDARY)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(3):
        for k, f in fns.items():
            t0 = time.perf_counter()
            dask.compute(f().sum(dtype=np.float64), scheduler="threads", num_workers=2)
            times[k].append(time.perf_counter() - t0)
    sl = (slice(0, min(x.shape[0], 48)), slice(0, 128), slice(0, 128))
    a_, b_ = dask.compute(fns["milotile"]()[sl], fns["dask_image"]()[sl], scheduler="threads")
    return {"shape": list(x.shape), "chunks": list(x.chunksize), "sigma": a.gauss,
            **{f"{k}_s": statistics.median(v) for k, v in times.items()}, "runs": times,
            "max_abs_diff": float(np.abs(a_ - b_).max()), "load_avg": os.getloadavg()}


CHILDREN = {"prepare": child_prepare, "milopyp": child_milopyp, "milotile": child_milotile, "patches": child_patches,
            "gaussian": child_gaussian}


# --------------------------------------------------------------------------- parent


def recall(cands, gt) -> dict:
    """Fraction of ground-truth particles with a candidate within their radius, per species."""
    import numpy as np
    from scipy.spatial import cKDTree

    species = sorted(gt["species"].astype(str).unique())
    if len(cands) == 0:
        return {**{s: 0.0 for s in species}, "all": 0.0}
    d, _ = cKDTree(np.asarray(cands, float)).query(gt[["x", "y", "z"]].to_numpy())
    hit = d <= gt["radius"].to_numpy()
    out = {s: float(hit[(gt["species"].astype(str) == s).to_numpy()].mean()) for s in species}
    out["all"] = float(hit.mean())
    return out


def agreement(a, b, tol: float = 2.0) -> float:
    """Fraction of the points ``a`` with a point of ``b`` within ``tol`` voxels."""
    import numpy as np
    from scipy.spatial import cKDTree

    if len(a) == 0 or len(b) == 0:
        return 0.0
    d, _ = cKDTree(np.asarray(b, float)).query(np.asarray(a, float))
    return float((d <= tol).mean())


def child_cmd(a: argparse.Namespace, variant: str, **extra) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--variant", variant, "--workdir", str(a.workdir),
           "--size", a.size, "--chunks", a.chunks, "--gauss", str(a.gauss), "--dog", ",".join(map(str, a.dog)),
           "--threshold-std", str(a.threshold_std), "--min-distance", str(a.min_distance),
           "--border", str(a.border), "--border-z", str(a.border_z), "--bbox", str(a.bbox), "--snr", str(a.snr)]
    if a.mine_chunks:
        cmd += ["--mine-chunks", a.mine_chunks]
    if a.cli:
        cmd.append("--cli")
    for k, v in extra.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    return cmd


def measured(a: argparse.Namespace, variant: str, **extra) -> dict:
    """Run one variant in a fresh subprocess: wall time, peak tree RSS and CPU time of the tree."""
    import resource

    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    wall, peak, out = run_measured(child_cmd(a, variant, **extra))
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # the child and its waited-for workers
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    res = json.loads(out.strip().splitlines()[-1])
    res.update(total_s=wall, peak_rss_mb=peak / 2**20, cpu_s=cpu, cpu_share=cpu / wall,
               load_avg_1m_before=load, load_avg_1m_after=os.getloadavg()[0])
    return res


def measured_cli(a: argparse.Namespace) -> dict:
    """``milotile preprocess`` + ``milotile mine`` as a user runs them: two CLI processes with the CLI's
    default scheduler choice (a 256x512x512 float32 tomogram is above ``MILOTILE_SMALL_JOB_MB``, so each
    starts a LocalCluster), on a store holding the tomogram alone (no tilt series, as the naive script).

    ``total_s`` = both commands' wall time, start-up included; ``compute_s`` = their I/O + compute
    (the CLI's own report, ``MILOTILE_REPORT_JSON``), i.e. without interpreter and cluster start-up.
    """
    import resource

    import numpy as np

    import milotile as mt

    store, rep = Path(a.workdir) / "store_cli.zarr", Path(a.workdir) / "cli_report.jsonl"
    rep.unlink(missing_ok=True)
    src = str(HERE.parent / "src")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
           "MILOTILE_REPORT_JSON": str(rep), "MILOTILE_PROGRESS": "0"}
    base = [sys.executable, "-m", "milotile.cli"]
    cmds = {"preprocess": base + ["preprocess", str(store), "--gauss", str(a.gauss), "--overwrite"],
            "mine": base + ["mine", str(store), "--dog", ",".join(map(str, a.dog)), "--threshold-std",
                            str(a.threshold_std), "--min-distance", str(a.min_distance), "--border", str(a.border),
                            "--border-z", str(a.border_z)]}
    load = os.getloadavg()[0]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    walls, peaks = {}, []
    for k, cmd in cmds.items():
        walls[k], pk, _ = run_measured(cmd, env=env)
        peaks.append(pk)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    reports = [json.loads(line) for line in rep.read_text().splitlines()] if rep.exists() else []
    cands = mt.open(store).read_table("candidates")
    np.save(Path(a.workdir) / "cands_cli.npy", cands[["x", "y", "z"]].to_numpy(np.float64))
    total = sum(walls.values())
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"total_s": total, "compute_s": sum(r["io_s"] + r["compute_s"] for r in reports) if reports else total,
            "startup_s": sum(r["startup_s"] for r in reports), "commands_s": walls, "peak_rss_mb": max(peaks) / 2**20,
            "cpu_s": cpu, "cpu_share": cpu / total, "n": len(cands), "reports": reports,
            "commands": [" ".join(c[3:]) for c in cmds.values()],
            "load_avg_1m_before": load, "load_avg_1m_after": os.getloadavg()[0]}


def extras(a: argparse.Namespace, workers: list[int]) -> tuple[dict, dict]:
    """The lazy Gaussian alone and patch extraction, each in its own subprocess."""
    gauss = measured(a, "gaussian")
    print(f"lazy Gaussian sigma {a.gauss} on {gauss['shape']} (2 threads, median of 3): former own wrapper "
          f"{gauss['milotile_s']:.2f} s, dask-image {gauss['dask_image_s']:.2f} s "
          f"(ratio {gauss['dask_image_s'] / gauss['milotile_s']:.2f}), max |diff| {gauss['max_abs_diff']:.2e}")
    patches = measured(a, "patches", workers=max(workers))
    print(f"patch extraction (slab, bbox {a.bbox}, 4 shifts, {max(workers)} workers): {patches['n']} candidates "
          f"in {patches['patches_s']:.1f} s = {patches['candidates_per_s']:.0f} candidates/s")
    return gauss, patches


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="256,512,512", help="Z,Y,X of the synthetic tomogram")
    p.add_argument("--quick", action="store_true", help="64,128,128 with smaller borders (seconds)")
    p.add_argument("--workers", default="1,2", help="LocalCluster sizes to time (default 1,2)")
    p.add_argument("--repeats", type=int, default=1, help="interleaved repeats of every variant (medians)")
    p.add_argument("--gauss", type=float, default=0.8)
    p.add_argument("--dog", default="3,5")
    p.add_argument("--threshold-std", type=float, default=0.5)
    p.add_argument("--min-distance", type=float, default=7.0)
    p.add_argument("--border", type=int, default=30)
    p.add_argument("--border-z", type=int, default=10)
    p.add_argument("--bbox", type=int, default=36)
    p.add_argument("--snr", type=float, default=1.0)
    p.add_argument("--chunks", default="64,256,256", help="store chunks (z,y,x)")
    p.add_argument("--mine-chunks", default="", help="mining block shape z,y,x (default: milotile's)")
    p.add_argument("--skip-milopyp", action="store_true", help="only time milotile")
    p.add_argument("--cli", action="store_true",
                   help="also time `milotile preprocess` + `milotile mine` as two CLI commands (issue 12)")
    p.add_argument("--skip-extras", action="store_true", help="skip the lazy-Gaussian and patch-extraction timings")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one)")
    p.add_argument("--reuse", action="store_true", help="reuse the data already in --workdir")
    p.add_argument("--out", default="preprocess", help="results name: benchmarks/results/<out>.json")
    p.add_argument("--variant", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--rec", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick:
        a.size, a.border, a.border_z, a.chunks = "64,128,128", 12, 4, "32,64,64"
        if a.out == "preprocess":  # never overwrite the full-size figures with a quick run
            a.out = "preprocess_quick"
    a.dog = tuple(float(v) for v in str(a.dog).split(","))
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.variant:  # inside a measured subprocess
        a.workers = int(a.workers) if str(a.workers).isdigit() else 2
        print(json.dumps(CHILDREN[a.variant](a)))
        return 0

    exit_on_sigterm()
    import pandas as pd

    load_start = os.getloadavg()
    own_tmp = a.workdir is None
    a.workdir = Path(a.workdir or tempfile.mkdtemp(prefix="mt-bench-pre-"))
    a.workdir.mkdir(parents=True, exist_ok=True)
    try:
        if a.reuse and (a.workdir / "store.zarr").exists() and (a.workdir / "prepare.json").exists():
            prep = json.loads((a.workdir / "prepare.json").read_text())
        else:
            wall, _, out = run_measured(child_cmd(a, "prepare"))
            prep = json.loads(out.strip().splitlines()[-1])
            (a.workdir / "prepare.json").write_text(json.dumps(prep))
            print(f"synth {a.size}: {prep['synth_s']:.1f} s, ingest {prep['ingest_s']:.1f} s, "
                  f"{prep['n_particles']} particles")
        gt = pd.read_parquet(a.workdir / "synth" / "ground_truth.parquet")
        workers = [int(v) for v in str(a.workers).split(",")]
        variants = ([] if a.skip_milopyp else ["milopyp"]) + [f"milotile{n}" for n in workers] + (["cli"] if a.cli else [])
        runs: dict[str, list[dict]] = {v: [] for v in variants}
        for rep in range(a.repeats):
            for v in variants:
                r = (measured(a, "milopyp", rec=prep["rec"]) if v == "milopyp" else measured_cli(a) if v == "cli"
                     else measured(a, "milotile", workers=int(v[len("milotile"):])))
                runs[v].append(r)
                print(f"[{rep + 1}/{a.repeats}] {v:10s} total {r['total_s']:6.1f} s  compute {r['compute_s']:6.1f} s  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MiB  CPU {r['cpu_s']:5.1f} s ({r['cpu_share']:.2f} cores)  "
                      f"{r['n']} candidates  (load {r['load_avg_1m_before']:.1f} -> {r['load_avg_1m_after']:.1f})",
                      flush=True)
        import numpy as np

        summary: dict[str, dict] = {}
        for v, rs in runs.items():
            med = {k: statistics.median(r[k] for r in rs) for k in ("total_s", "compute_s", "peak_rss_mb", "cpu_s")}
            cands = np.load(a.workdir / f"cands_{v}.npy")
            summary[v] = {**med, "n": rs[-1]["n"], "recall": recall(cands, gt), "runs": rs}
        if "milopyp" in summary:
            ref = np.load(a.workdir / "cands_milopyp.npy")
            base = summary["milopyp"]
            for v in variants[1:]:
                s = summary[v]
                s["speedup_total"] = base["total_s"] / s["total_s"]
                s["speedup_compute"] = base["compute_s"] / s["compute_s"]
                s["memory_fraction"] = s["peak_rss_mb"] / base["peak_rss_mb"]
                s["cpu_fraction"] = s["cpu_s"] / base["cpu_s"]  # work done, whatever the CPU share
                c = np.load(a.workdir / f"cands_{v}.npy")
                s["candidates_near_milopyp"] = agreement(c, ref)
                s["milopyp_near_candidates"] = agreement(ref, c)
        gauss = patches = None
        if not a.skip_extras:
            gauss, patches = extras(a, workers)
        print(f"\n{'variant':12s} {'total s':>8s} {'compute s':>10s} {'CPU s':>6s} {'peak MiB':>9s} {'cands':>6s} "
              f"{'speed x (total/compute)':>24s} {'memory':>7s}  recall per species")
        for v, s in summary.items():
            ratio = (f"{s['speedup_total']:.2f} / {s['speedup_compute']:.2f}" if "speedup_total" in s else "1")
            mem = f"{s['memory_fraction']:.2f}" if "memory_fraction" in s else "1"
            rec = ", ".join(f"{k} {val:.2f}" for k, val in s["recall"].items())
            print(f"{v:12s} {s['total_s']:8.1f} {s['compute_s']:10.1f} {s['cpu_s']:6.1f} {s['peak_rss_mb']:9.0f} {s['n']:6d} "
                  f"{ratio:>24s} {mem:>7s}  {rec}")
        target = None
        best = f"milotile{max(workers)}"
        if "milopyp" in summary and 2 in workers:
            s = summary["milotile2"]
            target = {
                "speedup_total_ge_2": s["speedup_total"] >= 2.0, "speedup_compute_ge_2": s["speedup_compute"] >= 2.0,
                "memory_le_quarter": s["memory_fraction"] <= 0.25,
            }
            print(f"\ntarget on 2 workers (>= 2x faster, <= 1/4 of the peak memory): {target}")
        for v in variants[1:]:
            w = runs[v][-1]
            if v == "cli":
                print("cli: " + ", ".join(f"`milotile {c}` {t:.1f} s" for c, t in zip(w["commands"], w["commands_s"].values(), strict=True))
                      + "; " + "; ".join(f"{r['command']}: start-up {r['startup_s']:.1f} s + I/O {r['io_s']:.1f} s + "
                                         f"compute {r['compute_s']:.1f} s" for r in w["reports"]))
                continue
            print(f"{v}: import {w['import_s']:.1f} s, cluster start {w['cluster_start_s']:.1f} s, preprocess "
                  f"{w['preprocess_s']:.1f} s, mine {w['mine_s']:.1f} s, close {w['cluster_close_s']:.1f} s; CPU client "
                  f"{w['client_cpu_s']:.1f} s + workers {w['workers_cpu_s']:.1f} s; "
                  f"client imported torch: {w['client_imported_torch']}; workers: {w['workers'][0]}")
        if "milopyp" in summary:
            print("milopyp steps: " + ", ".join(f"{k} {v:.1f} s" for k, v in runs["milopyp"][-1]["steps_s"].items()))
        payload = {
            "size_zyx": [int(v) for v in a.size.split(",")], "store_chunks": [int(v) for v in a.chunks.split(",")],
            "params": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(a).items()
                       if k not in ("workdir", "variant", "out")},
            "prepare": prep, "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
            "results": summary, "patches": patches, "gaussian": gauss,
            "threads": {"milopyp": "one process, numpy/scipy (single-threaded filters)",
                        **{f"milotile{n}": f"LocalCluster of {n} worker processes x 1 thread" for n in workers},
                        "cli": "`milotile` CLI defaults: --local-scheduler auto (LocalCluster above 96 MiB, one "
                               "worker per core x 1 thread)", "parent": threads()},
            "target": target, "best": best,
        }
        path = write_results(a.out, payload)
        print(f"wrote {path}")
    finally:
        if own_tmp:
            shutil.rmtree(a.workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
