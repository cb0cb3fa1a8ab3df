"""Collection-scale benchmark (issue 12, item 6): per-tomogram cost of every stage from 20 to 200 tomograms.

A generated collection of tiny tomograms (default 24 x 48 x 48, 11 tilts; ``--distinct`` different
volumes, repeated under new names up to N) goes through the whole CLI, one command per stage, as a
user would run it:

    milotile ingest -> preprocess -> mine -> patches -> explore embed -> refine pick

for N in ``--sizes`` (default 20 and 200). Models for embed/pick are trained once beforehand on a
separate small store (not timed). Each command writes its report (start-up / I/O / compute split,
store metadata reads, chunk reads, listings) through ``MILOTILE_REPORT_JSON``; the figures are per
tomogram and the ratio 200 vs 20 says whether the cost per tomogram stays flat.

Naive counterpart in the same run: ``milotile preprocess --names <one>`` called once per tomogram for
``--naive`` tomograms (what a per-tomogram script does), per-tomogram cost against the collection call.

    python benchmarks/collection.py                      # ~10 min on 2 busy cores
    python benchmarks/collection.py --quick              # sizes 4,8: checks the script
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
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, machine, result_path, threads  # noqa: E402

log = logging.getLogger("bench.collection")
SRC = Path(__file__).resolve().parents[1] / "src"
STAGES = ("ingest", "preprocess", "mine", "patches", "explore embed", "refine pick")


def _env(report: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MILOTILE_PROGRESS"] = "0"
    env["MILOTILE_REPORT_JSON"] = str(report)
    return env


def run_cli(args: list[str], report: Path) -> tuple[float, dict]:
    """Run ``milotile ARGS``; return (wall seconds of the whole command, its stage report)."""
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "milotile.cli", *args], env=_env(report),
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode != 0:
        raise RuntimeError(f"milotile {' '.join(args)} failed:\n{res.stderr[-3000:]}")
    lines = report.read_text().splitlines() if report.exists() else []
    return wall, (json.loads(lines[-1]) if lines else {})


def make_sources(work: Path, a: argparse.Namespace) -> Path:
    """``--distinct`` synthetic tomograms with tilt series, reused by name up to max(sizes)."""
    from milotile.synth import synth

    size = tuple(int(s) for s in a.size.split(","))
    res = synth(work / "syn", seed=0, n_tomograms=a.distinct, size=size, snr=0.1, angles=(-60, 60, 12),
                n_particles=a.particles, filament=False)
    return res.manifest


def manifest_for(src_manifest: Path, n: int, dest: Path) -> Path:
    """A MiLoPYP manifest naming ``n`` tomograms that cycle through the distinct source files."""
    rows = src_manifest.read_text().splitlines()
    head, body = rows[0], [r.split("\t") for r in rows[1:] if r.strip()]
    out = [head] + ["\t".join([f"t{i:04d}", *body[i % len(body)][1:]]) for i in range(n)]
    dest.write_text("\n".join(out) + "\n")
    return dest


def train_models(work: Path, manifest: Path, a: argparse.Namespace) -> tuple[Path, Path]:
    """Tiny explore + refine models on a separate store (not timed)."""
    import pandas as pd

    import milotile as mt
    from milotile.stages.patches import extract_patches

    col = mt.ingest(manifest, work / "train.zarr")
    with mt.cluster(workers=1, threads_per_worker=1, dashboard_address=None, processes=False):
        col.preprocess(gauss=0.8)
        col.mine(dog=(2, 3), threshold_std=0.5, nms_distance=4, border=4, border_z=2)
        key = extract_patches(col, table="candidates", bbox=a.bbox, modes=("slab",))
    recipe = mt.explore.ExploreRecipe().replace(epochs=1, batch_size=16, widths=(8, 16, 32),
                                                model_config={"blocks": [1, 1, 1]})
    enc = mt.explore.train(col, key=key, recipe=recipe, out=work / "runs" / "explore")
    gt = pd.read_parquet(manifest.parent / "ground_truth.parquet")
    labels = gt[gt["tomogram"] == gt["tomogram"].iloc[0]][["tomogram", "x", "y", "z"]]
    lab = work / "labels.parquet"
    labels.to_parquet(lab)
    picker = mt.refine.train(col, lab, bbox=6, epochs=1, arch="unet4", arch_config={"start_filts": 4},
                             crop=(8, 32, 32), out=work / "runs" / "refine", seed=0)
    return Path(enc.path), Path(picker.path)


def run_collection(work: Path, n: int, src: Path, models: tuple[Path, Path], a: argparse.Namespace) -> dict:
    """Every stage once over an n-tomogram collection; per-stage wall, split and store reads."""
    store = work / f"c{n}.zarr"
    shutil.rmtree(store, ignore_errors=True)
    man = manifest_for(src, n, work / f"manifest{n}.txt")
    rep = work / f"report{n}.jsonl"
    sched = ["--local-scheduler", a.scheduler] if a.scheduler else []
    cmds = {
        "ingest": ["ingest", str(man), "--store", str(store)],
        "preprocess": ["preprocess", str(store)],
        "mine": ["mine", str(store), "--dog", "2,3", "--min-distance", "4", "--border", "4", "--border-z", "2"],
        "patches": ["patches", str(store), "--bbox", str(a.bbox), "--key", "bank"],
        "explore embed": ["explore", "embed", str(store), "--model", str(models[0]), "--key", "bank"],
        "refine pick": ["refine", "pick", str(store), "--model", str(models[1]), "--no-heatmaps"],
    }
    out = {}
    for stage in STAGES:
        wall, r = run_cli(sched + cmds[stage], rep)
        out[stage] = {"wall_s": wall, "per_tomogram_s": wall / n,
                      **{k: r.get(k) for k in ("startup_s", "io_s", "compute_s", "meta_reads", "chunk_reads",
                                               "listings", "exists", "writes")},
                      "meta_reads_per_tomogram": (r.get("meta_reads") or 0) / n,
                      "listings_per_tomogram": (r.get("listings") or 0) / n}
        log.info("N=%d %-14s %7.1f s  %.3f s/tomogram  %.1f metadata reads/tomogram", n, stage, wall, wall / n,
                 out[stage]["meta_reads_per_tomogram"])
    return out


def naive_per_tomogram(work: Path, src: Path, k: int) -> dict:
    """`milotile preprocess --names one` once per tomogram: the per-tomogram-script baseline."""
    store = work / "naive.zarr"
    shutil.rmtree(store, ignore_errors=True)
    man = manifest_for(src, k, work / "manifest_naive.txt")
    rep = work / "report_naive.jsonl"
    run_cli(["ingest", str(man), "--store", str(store)], rep)
    walls = [run_cli(["preprocess", str(store), "--names", f"t{i:04d}"], rep)[0] for i in range(k)]
    return {"tomograms": k, "preprocess_per_tomogram_s": sum(walls) / k, "walls_s": walls}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="20,200", help="collection sizes (default 20,200)")
    p.add_argument("--size", default="24,48,48", help="tomogram shape z,y,x (default 24,48,48)")
    p.add_argument("--distinct", type=int, default=4, help="distinct generated volumes (default 4)")
    p.add_argument("--particles", type=int, default=6)
    p.add_argument("--bbox", type=int, default=16)
    p.add_argument("--naive", type=int, default=5, help="tomograms for the one-call-per-tomogram baseline")
    p.add_argument("--scheduler", default=None, help="force --local-scheduler (default: the CLI's auto choice)")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--quick", action="store_true", help="sizes 4,8, 2 distinct volumes, naive 2: checks the script")
    exit_on_sigterm()
    a = p.parse_args()
    if a.quick:
        a.sizes, a.distinct, a.naive = "4,8", 2, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="milotile-collection-"))
    work.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    src = make_sources(work, a)
    models = train_models(work, src, a)
    sizes = [int(s) for s in a.sizes.split(",")]
    try:
        results = {n: run_collection(work, n, src, models, a) for n in sizes}
        naive = naive_per_tomogram(work, src, a.naive)
    finally:
        if not a.work:  # a temporary work folder goes; one given with --work stays
            shutil.rmtree(work, ignore_errors=True)
    lo, hi = min(sizes), max(sizes)
    flat = {st: results[hi][st]["per_tomogram_s"] / results[lo][st]["per_tomogram_s"] for st in STAGES}
    meta_flat = {st: (results[hi][st]["meta_reads_per_tomogram"] / results[lo][st]["meta_reads_per_tomogram"]
                      if results[lo][st]["meta_reads_per_tomogram"] else None) for st in STAGES}
    coll_pre = results[hi]["preprocess"]["per_tomogram_s"]
    out = {
        "benchmark": "collection", "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
        "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg(),
        "settings": {k: v for k, v in vars(a).items() if k != "work"},
        "per_stage": {str(n): r for n, r in results.items()},
        f"per_tomogram_ratio_{hi}_vs_{lo}": flat, f"meta_reads_per_tomogram_ratio_{hi}_vs_{lo}": meta_flat,
        "naive_one_call_per_tomogram": naive,
        "naive_vs_collection_preprocess_per_tomogram": naive["preprocess_per_tomogram_s"] / coll_pre,
        "total_run_s": time.perf_counter() - t_all,
        "threads": {"note": "every stage is its own `milotile` CLI process with the CLI's default threads "
                            "(--local-scheduler auto: in-process threads below MILOTILE_SMALL_JOB_MB)", **threads()},
    }
    path = result_path("collection")
    path.write_text(json.dumps(out, indent=1))
    print(f"\nper-tomogram cost (whole CLI command incl. start-up), N={lo} -> N={hi}:")
    print(f"  {'stage':14s} {'s/tomo N=' + str(lo):>12s} {'N=' + str(hi):>8s} {'ratio':>6s} {'start-up s':>11s} "
          f"{'meta reads/tomo':>16s} {'listings/tomo':>14s}")
    for st in STAGES:
        r0, r1 = results[lo][st], results[hi][st]
        print(f"  {st:14s} {r0['per_tomogram_s']:12.3f} {r1['per_tomogram_s']:8.3f} {flat[st]:6.2f} "
              f"{r0['startup_s'] or 0:5.1f}/{r1['startup_s'] or 0:<5.1f} "
              f"{r0['meta_reads_per_tomogram']:7.1f}->{r1['meta_reads_per_tomogram']:<7.1f} "
              f"{r0['listings_per_tomogram']:6.2f}->{r1['listings_per_tomogram']:<6.2f}")
    print(f"naive: preprocess once per tomogram {naive['preprocess_per_tomogram_s']:.2f} s/tomogram vs "
          f"{coll_pre:.3f} in one collection call ({out['naive_vs_collection_preprocess_per_tomogram']:.0f}x)")
    print(f"load average {load0} -> {os.getloadavg()}; {out['total_run_s']:.0f} s; results in {path}")


if __name__ == "__main__":
    main()
