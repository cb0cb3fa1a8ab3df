"""Benchmark: PU picker trained from sparse labels vs a DoG + local-maxima picker (issue 5, Measure).

On ``milotile synth`` data: for each species (one after the other), label a random 30 % of its
particles in ONE tomogram, train the picker on CPU, pick every tomogram and report F1 against all
particles of that species (Hungarian matching within half the particle radius), seconds per epoch and
RSS — next to a DoG + local-maxima picker on the same data in the same run. The DoG picker gets an
oracle: its sigmas (size-matched or MiLoPYP's 3,5), polarity and score threshold are chosen to maximise
its F1 over all tomograms. The learned picker is reported at its own threshold (0.5; no validation
split with so few labels) and at its oracle threshold.

Also reported: the memory MiLoPYP's way needs for the same run (dense 2N×2N contrastive matrices for a
6×32×32 pair of crops; every tomogram in RAM as float64) against the subsampled matrix and the bounded
chunk cache used here.

Example::

    nice .venv/bin/python benchmarks/refine_train.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import milotile as mt
from milotile.metrics import evaluate, pr_curve
from milotile.refine.predict import picker_stats
from milotile.refine.validation import predict_region_picks
from milotile.synth import synth


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def best_f1(pred: pd.DataFrame, true: pd.DataFrame, radius: float) -> tuple[float, float]:
    """(F1, threshold) at the F1-optimal score threshold."""
    if len(pred) == 0:
        return 0.0, float("nan")
    curve = pr_curve(pred, true, radius, by="tomogram", max_thresholds=200)
    i = int(np.argmax(curve["f1"].to_numpy()))
    return float(curve["f1"].iloc[i]), float(curve["threshold"].iloc[i])


def per_tomo_f1(pred: pd.DataFrame, true: pd.DataFrame, radius: float, thr: float) -> dict[str, float]:
    res = evaluate(pred, true, radius, by="tomogram", threshold=thr)
    return {r["group"]: round(float(r["f1"]), 4) for _, r in res.iterrows()}


def dog_picks(col, names, sigmas, invert: bool, min_distance: float) -> pd.DataFrame:
    from milotile.ops.peaks import dog_peaks

    rows = []
    for n in names:
        vol = col[n].data(0)
        pk = dog_peaks(vol, sigmas, threshold_std=-10.0, min_distance=min_distance, border=(2, 4, 4),
                       invert=invert)
        pk = pk.assign(tomogram=n)
        rows.append(pk[["tomogram", "x", "y", "z", "score"]])
    return pd.concat(rows, ignore_index=True)


def run_species(args, col, res, gt, sp_name: str, work: Path, dog_cache: dict) -> dict:
    """Label 30 % of one species in the first tomogram, train, pick everything, compare with DoG."""
    sp = gt[gt["species"] == sp_name]
    if len(sp) == 0:
        raise SystemExit(f"no {sp_name} particles in the synthetic data")
    radius = float(sp["radius"].iloc[0])
    match_r = radius / 2.0
    bbox = 2 * radius
    rng = np.random.default_rng(args.seed)
    first = sp[sp["tomogram"] == res.names[0]]
    n_lab = max(2, int(round(args.fraction * len(first))))
    labels = first.iloc[np.sort(rng.choice(len(first), n_lab, replace=False))][["tomogram", "x", "y", "z"]]
    print(f"{sp_name}: {len(sp)} particles (radius {radius}), {n_lab} labelled in {res.names[0]}", flush=True)
    run = work / f"run_{sp_name}"
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    picker = mt.refine.train(col, labels, bbox=bbox, epochs=args.epochs, arch=args.arch,
                             arch_config={"start_filts": args.start_filts}, batch_size=args.batch_size,
                             crop=tuple(args.crop), lr=args.lr, tau=args.tau, random_fraction=args.random_fraction,
                             repeats=args.repeats, val_fraction=0.0, out=run, seed=args.seed, device="cpu")
    t_train = time.perf_counter() - t0
    recs = mt.nn.RunLog(run).records()
    s_epoch = float(np.median([r["seconds"] for r in recs]))
    rss_train = _rss_mb()
    t0 = time.perf_counter()
    picks = []
    for n in res.names:
        t = col[n]
        region = {"tomogram": n, "start": (0, 0, 0), "stop": tuple(t.shape)}  # pick's tiler and decoder
        picks.append(predict_region_picks(picker, col, region, picker_stats(col, n, picker))[0])
    picks = pd.concat(picks, ignore_index=True)
    t_pred = time.perf_counter() - t0
    picks.to_parquet(run / "picks.parquet")
    true = sp[["tomogram", "x", "y", "z"]]
    f1_learn_oracle, thr_learn = best_f1(picks, true, match_r)
    thr_own = float(picker.contract.get("suggested_threshold") or 0.5)

    t0 = time.perf_counter()
    best = (-1.0, None)
    for sig in (() if args.skip_dog else ((radius / 2, radius), (3.0, 5.0), (radius / 3, 2 * radius / 3))):
        for inv in (False, True):
            key = (round(sig[0], 3), round(sig[1], 3), inv)
            if key not in dog_cache:
                dog_cache[key] = dog_picks(col, res.names, sig, inv, min_distance=radius)
            dp = dog_cache[key]
            f1, thr = best_f1(dp, true, match_r)
            print(f"  DoG sigmas {tuple(round(v, 2) for v in sig)} invert={inv}: best F1 {f1:.3f}", flush=True)
            if f1 > best[0]:
                best = (f1, (sig, inv, thr, dp))
    t_dog = time.perf_counter() - t0
    dog: dict = {}
    if best[1] is not None:
        f1_dog, (sig_d, inv_d, thr_d, dp) = best
        dog = {"sigmas": [round(v, 3) for v in sig_d], "dark_particles": not inv_d, "oracle_threshold": thr_d,
               "seconds": round(t_dog, 1), "f1_oracle_per_tomogram": per_tomo_f1(dp, true, match_r, thr_d),
               "f1_oracle_all": round(f1_dog, 4)}
        dp35 = dog_cache.get((3.0, 5.0, False))
        if dp35 is not None:
            f, t = best_f1(dp35, true, match_r)
            dog["milopyp_default_3_5_f1_oracle_all"] = round(f, 4)
    return {
        "radius": radius, "match_radius": match_r, "bbox": bbox, "n_particles": int(len(sp)), "n_labelled": int(n_lab),
        "learned": {"train_seconds": round(t_train, 1), "seconds_per_epoch": round(s_epoch, 2),
                    "predict_seconds": round(t_pred, 1), "rss_after_train_mb": round(rss_train, 1),
                    "threshold_own": thr_own, "f1_own_threshold_per_tomogram": per_tomo_f1(picks, true, match_r, thr_own),
                    "oracle_threshold": thr_learn, "f1_oracle_per_tomogram": per_tomo_f1(picks, true, match_r, thr_learn),
                    "f1_oracle_all": round(f1_learn_oracle, 4)},
        "dog": dog,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small volumes and few epochs (smoke run)")
    ap.add_argument("--size", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--n-tomograms", type=int, default=3)
    ap.add_argument("--n-particles", type=int, default=60, help="particles per tomogram (synth default by volume)")
    ap.add_argument("--species", default="all", help="species name(s), comma-separated, or 'all'")
    ap.add_argument("--fraction", type=float, default=0.3, help="fraction of the species' particles labelled")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--arch", default="unet4")
    ap.add_argument("--start-filts", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--crop", type=int, nargs=3, default=(8, 64, 64))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--tau", type=float, default=0.01, help="PU prior (MiLoPYP docs: 0.01)")
    ap.add_argument("--random-fraction", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=3, help="crops per labelled particle and epoch")
    ap.add_argument("--skip-dog", action="store_true")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="keep data and run here (default: a temp dir)")
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "refine_train.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.size, args.epochs, args.start_filts, args.n_tomograms, args.n_particles = (48, 128, 128), 2, 8, 2, 20
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import torch

    torch.set_num_threads(2)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="refine_bench_"))
    t0 = time.perf_counter()
    res = synth(work / "synth", seed=args.seed, n_tomograms=args.n_tomograms, size=tuple(args.size), snr=args.snr,
                n_particles=args.n_particles)
    col = mt.ingest(res.manifest, work / "store.zarr", overwrite=True)
    t_data = time.perf_counter() - t0
    gt = res.ground_truth
    species = sorted(set(gt["species"])) if args.species == "all" else args.species.split(",")
    print(f"data: {args.n_tomograms} tomograms {tuple(args.size)}, species {gt['species'].value_counts().to_dict()}; "
          f"synth+ingest {t_data:.1f} s", flush=True)
    dog_cache: dict = {}
    results = {sp_name: run_species(args, col, res, gt, sp_name, work, dog_cache) for sp_name in species}

    # memory of MiLoPYP's way, for comparison: dense contrastive matrices and whole tomograms in RAM
    n_dense = 2 * 6 * 32 * 32
    dense_gb = (2 * n_dense) ** 2 * 4 * 3 / 1e9  # similarity + self_mask + identity, fp32
    n_sub = args.batch_size * (256 + 256 + 64)
    sub_mb = (2 * n_sub) ** 2 * 4 * 3 / 1e6
    whole_mb = args.n_tomograms * int(np.prod(args.size)) * 8 / 1e6  # float64 copies kept for the whole run
    out = {
        "command": " ".join(["python benchmarks/refine_train.py", *(argv if argv is not None else sys.argv[1:])]),
        "data": {"n_tomograms": args.n_tomograms, "size": list(args.size), "n_particles_per_tomogram": args.n_particles,
                 "snr": args.snr, "label_fraction": args.fraction, "labelled_tomogram": res.names[0]},
        "settings": {"arch": args.arch, "start_filts": args.start_filts, "epochs": args.epochs,
                     "batch_size": args.batch_size, "crop": list(args.crop), "lr": args.lr, "tau": args.tau,
                     "repeats": args.repeats, "random_fraction": args.random_fraction, "device": "cpu"},
        "species": results,
        "memory": {"milopyp_dense_contrastive_gb": round(dense_gb, 2), "subsampled_contrastive_mb": round(sub_mb, 1),
                   "milopyp_tomograms_in_ram_mb": round(whole_mb, 1),
                   "chunk_cache_mb_per_tomogram": round(8 * 64 * 256 * 256 * 4 / 1e6, 1)},
        "peak_rss_mb": round(_rss_mb(), 1),
    }
    print(json.dumps(out, indent=2))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
