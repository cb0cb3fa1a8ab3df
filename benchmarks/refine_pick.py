"""Benchmark: tiled heatmap prediction on Dask vs a single whole-volume forward pass (issue 6, Measure).

Steps, all in one run:

1. ``milotile synth`` data -> ingest -> a short picker training with :func:`milotile.refine.train`
   (a random 30 % of one species' particles in the first tomogram labelled).
2. Prediction speed and memory, each in its own process so peak RSS is its own:
   * ``whole``: MiLoPYP's way, the tomogram read into RAM and passed through the network at once;
   * ``tiled``: :func:`milotile.refine.predict.predict_heatmap` over the store chunks on a
     ``LocalCluster`` with 1 and with 2 worker processes (1 thread each).
   Reported: level-0 voxels per second of prediction (cluster start excluded) and the peak RSS of the
   process tree (workers included).
3. Accuracy: :func:`milotile.refine.predict.pick` at a low threshold, then precision / recall / F1
   against the synthetic ground truth as a function of the threshold (Hungarian matching within
   half the particle radius).

Example::

    nice .venv/bin/python benchmarks/refine_pick.py --quick
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_measured, write_results  # noqa: E402


def _child(args: argparse.Namespace) -> int:
    """Measure one prediction mode inside this process; print a JSON line."""
    import torch

    import milotile as mt
    from milotile.refine.picker import Picker
    from milotile.refine.predict import predict_heatmap

    torch.set_num_threads(args.threads)
    col = mt.open(args.store, mode="r")
    names = col.names
    if args.mode == "whole":
        picker = Picker.load(args.model, device=args.device)
        t0 = time.perf_counter()
        nvox = 0
        for n in names:
            vol = np.asarray(col[n].data(0), dtype=np.float32)  # the whole tomogram in RAM
            stats = (float(vol.mean()), float(vol.std()))
            picker.predict_block(vol, stats)
            nvox += vol.size
        dt = time.perf_counter() - t0
    else:
        with mt.cluster(workers=args.workers, threads_per_worker=1, dashboard_address=None):
            picker = Picker.load(args.model, device=args.device)
            from milotile.cluster import compute_with_progress

            t0 = time.perf_counter()
            nvox = 0
            for n in names:
                hm = predict_heatmap(col, n, picker, tile=args.tile)
                compute_with_progress([hm.sum()], desc=n)
                nvox += int(np.prod(col[n].shape))
            dt = time.perf_counter() - t0
    print(json.dumps({"seconds": dt, "voxels": nvox}))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small volumes, short training (smoke run)")
    ap.add_argument("--size", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--n-tomograms", type=int, default=2)
    ap.add_argument("--species", default="ribosome")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--start-filts", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--model", default=None, help="skip training and use this picker checkpoint")
    ap.add_argument("--tile", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="tile size of the tiled runs (default: the store chunks, 64 x 256 x 256)")
    # child mode (internal)
    ap.add_argument("--child", dest="mode", choices=["whole", "tiled"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mode:
        return _child(args)
    if args.quick:
        args.size, args.epochs, args.start_filts = (48, 128, 128), 3, 8
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    import milotile as mt
    from milotile.metrics import pr_curve
    from milotile.refine.predict import pick
    from milotile.synth import synth

    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="pick_bench_"))
    t0 = time.perf_counter()
    res = synth(work / "synth", seed=args.seed, n_tomograms=args.n_tomograms, size=tuple(args.size))
    col = mt.ingest(res.manifest, work / "store.zarr", overwrite=True)
    gt = res.ground_truth
    sp = gt[gt["species"] == args.species]
    radius = float(sp["radius"].iloc[0])
    print(f"data: {args.n_tomograms} x {tuple(args.size)}, {len(sp)} {args.species} (radius {radius}); "
          f"{time.perf_counter() - t0:.1f} s", flush=True)

    model = args.model
    train_s = None
    if model is None:
        rng = np.random.default_rng(args.seed)
        first = sp[sp["tomogram"] == res.names[0]]
        labels = first.iloc[np.sort(rng.choice(len(first), max(2, int(0.3 * len(first))), replace=False))]
        t0 = time.perf_counter()
        mt.refine.train(col, labels[["tomogram", "x", "y", "z"]], bbox=2 * radius, epochs=args.epochs,
                        arch="unet4", arch_config={"start_filts": args.start_filts}, val_fraction=0.0,
                        out=work / "run", seed=args.seed, device=args.device)
        train_s = time.perf_counter() - t0
        model = str(work / "run")
        print(f"trained {args.epochs} epochs in {train_s:.1f} s", flush=True)

    speed = {}
    me = [sys.executable, str(Path(__file__).resolve())]
    common = ["--store", str(work / "store.zarr"), "--model", model, "--device", args.device]
    if args.tile:
        common += ["--tile", *map(str, args.tile)]
    for label, extra in (("whole_volume_1proc_1thread", ["--child", "whole", "--threads", "1"]),
                         ("whole_volume_1proc_2threads", ["--child", "whole", "--threads", "2"]),
                         ("tiled_1worker", ["--child", "tiled", "--workers", "1"]),
                         ("tiled_2workers", ["--child", "tiled", "--workers", "2"])):
        wall, rss, out = run_measured(me + extra + common)
        r = json.loads(out.strip().splitlines()[-1])
        speed[label] = {"voxels_per_s": round(r["voxels"] / r["seconds"]), "predict_s": round(r["seconds"], 2),
                        "process_wall_s": round(wall, 1), "peak_rss_mb": round(rss / 2**20, 1)}
        print(f"{label:30s} {speed[label]['voxels_per_s']:>10,d} vox/s  predict {r['seconds']:.1f} s  "
              f"peak RSS {rss / 2**20:.0f} MB", flush=True)

    # accuracy vs threshold (in-process threaded scheduler)
    picks = pick(col, model, threshold=0.02, max_picks=2000, nms_distance=radius, border=0, run="bench")
    picks = picks[picks["class"] == picks["class"].iloc[0]] if len(picks) else picks
    true = sp[["tomogram", "x", "y", "z"]]
    curve = pr_curve(picks, true, radius / 2.0, by="tomogram", max_thresholds=200) if len(picks) else None
    table = []
    for thr in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9):
        if curve is None:
            break
        rows = curve[curve["threshold"] >= thr]
        if len(rows):
            r = rows.iloc[-1]
            table.append({"threshold": thr, "n_pred": int(r["n_pred"]), "precision": round(float(r["precision"]), 3),
                          "recall": round(float(r["recall"]), 3), "f1": round(float(r["f1"]), 3)})
    best = curve.iloc[int(np.argmax(curve["f1"].to_numpy()))] if curve is not None and len(curve) else None
    print("threshold  n_pred  precision  recall  f1")
    for r in table:
        print(f"{r['threshold']:9.2f} {r['n_pred']:7d} {r['precision']:10.3f} {r['recall']:7.3f} {r['f1']:5.3f}")
    out = {
        "command": " ".join(["benchmarks/refine_pick.py", *(argv if argv is not None else sys.argv[1:])]),
        "data": {"n_tomograms": args.n_tomograms, "size_zyx": list(args.size), "species": args.species,
                 "n_true": int(len(sp)), "match_radius": radius / 2.0},
        "tile_zyx": args.tile or "store chunks (64, 256, 256)",
        "picker": {"checkpoint": "trained here" if args.model is None else args.model, "epochs": args.epochs,
                   "start_filts": args.start_filts, "train_s": None if train_s is None else round(train_s, 1)},
        "prediction": speed,
        "pr_vs_threshold": table,
        "best_f1": None if best is None else {"threshold": float(best["threshold"]), "f1": round(float(best["f1"]), 3)},
    }
    path = write_results("refine_pick", out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
