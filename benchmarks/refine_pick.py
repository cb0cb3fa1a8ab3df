"""Benchmark: tiled picking on Dask vs a single whole-volume forward pass (issue "Refinement at scale", Measure).

Steps, all in one run:

1. Data: ``milotile.synth`` tomograms (default 3 x 64 x 256 x 256, SNR 0.5, 60 particles each)
   -> ingest (store chunks 64 x 256 x 256). Reused from ``--workdir`` when it already holds them.
2. A real picker: :func:`milotile.refine.train` on a random 30 % of one species' particles in the
   FIRST tomogram only (the recipe of ``benchmarks/refine_train.py``: unet4, start_filts 16, tau 0.01,
   3 crops per label and epoch). Trained once and reused by every variant (``--model`` skips it).
3. Prediction, every variant in its **own fresh subprocess**; wall time of the prediction inside the
   process and peak RSS of the process tree (driver + Dask workers, sampled every 50 ms):

   * ``whole_1thread`` / ``whole_2threads``: MiLoPYP's way -- each tomogram read into RAM, its
     global statistics, one :meth:`Picker.predict_block` call on the whole volume (torch 1 or 2
     threads), then the heatmap decoded with :func:`milotile.refine.decode.decode_heatmap`;
   * ``tiled_<tile>_1worker`` / ``_2workers``: :func:`milotile.refine.predict.pick` (tiled
     ``predict_heatmap`` with the full receptive-field halo = exact, heatmap written to the store,
     decoded) on a ``LocalCluster`` of 1 / 2 single-threaded worker processes. ``--tile`` (default
     32 x 256 x 256: two z-tiles per tomogram) cuts only along z, where the halo is small; ``--xy-tile``
     (default 64 x 128 x 128: four tiles) also cuts in y/x, where the exact halo (half the ~243-voxel
     receptive field of unet4) makes every tile read most of the plane;
   * ``..._halo<cap>``: the xy tiles with ``halo=--halo-cap`` (each axis at most the full halo):
     less context read, not exact near tile seams.

   "voxels/s" = level-0 voxels of all tomograms / seconds from the first byte read to the last pick
   (statistics, network, decoding; cluster start and model import excluded, first model load
   included). Decoding is the same function with the same parameters in every variant.
4. Accuracy: precision / recall / F1 against the threshold (:func:`milotile.metrics.pr_curve`,
   Hungarian matching within half the particle radius) of every variant's picks against ALL
   particles of the species in all tomograms (the 30 % training labels included -- they are a
   minority of one tomogram; F1 on the two unseen tomograms is reported separately), plus the max
   abs difference of each heatmap to the whole-volume one.

Example::

    nice .venv/bin/python benchmarks/refine_pick.py --quick
    nice .venv/bin/python benchmarks/refine_pick.py --workdir /tmp/pick_bench

``--speed STORE CKPT`` (issue 26) measures only the pick speed of an existing store and picker: ``milotile
refine pick`` as a whole command and the library's ``pick`` in-process, per TTA / bf16 variant, wall and
CPU seconds and the load average (``refine_pick_speed.json``)::

    nice .venv/bin/python benchmarks/refine_pick.py --speed /tmp/refine_hard/hard_s0/store.zarr RUN/last.pt

Writes ``benchmarks/results/refine_pick.json`` (``--quick``: ``refine_pick_quick.json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_measured, write_results  # noqa: E402

DECODE = {"threshold": 0.02, "max_picks": 2000}  # low threshold: the PR curve is swept afterwards


# --------------------------------------------------------------------------- child processes
def _decode_kw(picker, radius: float) -> dict:
    return {"grid": picker.grid, "classes": picker.classes, "threshold": DECODE["threshold"],
            "nms_distance": radius, "max_picks": DECODE["max_picks"], "border": int(np.floor(2 * radius / 4.0))}


def child_whole(a: argparse.Namespace) -> dict:
    """Each tomogram in RAM and through ``Picker.predict_block`` at once (MiLoPYP's way)."""
    import torch

    torch.set_num_threads(a.threads)
    import dask
    import pandas as pd

    import milotile as mt
    from milotile.refine.decode import decode_heatmap
    from milotile.refine.picker import Picker
    from milotile.refine.predict import picker_stats

    dask.config.set(scheduler="synchronous")  # one process, one thread reads the volume
    col = mt.open(a.store, mode="r")
    out = Path(a.out)
    t0 = time.perf_counter()
    picker = Picker.load(a.model, device=a.device)
    nvox, picks, t_net, t_dec = 0, [], 0.0, 0.0
    for n in col.names:
        t = col[n]
        src = t.data(0)
        vol = np.asarray(src, dtype=np.float32)  # the whole tomogram in RAM
        stats = picker_stats(col, n, picker)  # same numbers as the tiled path
        t1 = time.perf_counter()
        hm = picker.predict_block(vol, stats)
        t2 = time.perf_counter()
        picks.append(decode_heatmap(hm, tomogram=n, shape=t.shape, voxel_size=t.voxel_size,
                                    **_decode_kw(picker, a.radius)))
        t3 = time.perf_counter()
        t_net += t2 - t1
        t_dec += t3 - t2
        nvox += vol.size
        del vol
        np.save(out / f"hm_{n}.npy", hm)
    dt = time.perf_counter() - t0
    pd.concat(picks, ignore_index=True).to_parquet(out / "picks.parquet")
    return {"seconds": dt, "network_s": t_net, "decode_s": t_dec, "voxels": nvox,
            "torch_threads": torch.get_num_threads()}


def child_tiled(a: argparse.Namespace) -> dict:
    """``milotile.refine.predict.pick`` on a LocalCluster of ``--workers`` single-threaded processes."""
    import dask.array as da

    import milotile as mt
    from milotile.refine.picker import Picker
    from milotile.refine.predict import pick

    out = Path(a.out)
    run = f"bench_{out.name}"
    with mt.cluster(workers=a.workers, threads_per_worker=1, dashboard_address=None) as client:
        col = mt.open(a.store)
        stale = Path(a.store) / "derived" / "heatmaps" / run
        if stale.exists():  # never time a heatmap reused from an earlier run
            shutil.rmtree(stale)
        t0 = time.perf_counter()
        picker = Picker.load(a.model, device=a.device)
        kw = _decode_kw(picker, a.radius)
        picks = pick(col, picker, threshold=kw["threshold"], max_picks=kw["max_picks"],
                     nms_distance=kw["nms_distance"], border=kw["border"], tile=a.tile, halo=a.halo,
                     run=run, table=None, write_heatmaps=True)
        dt = time.perf_counter() - t0

        def probe() -> dict:
            import sys as _s

            th = _s.modules["torch"].get_num_threads() if "torch" in _s.modules else None
            return {"torch_threads": th, "omp": os.environ.get("OMP_NUM_THREADS")}

        workers = list(client.run(probe).values())
        nvox, ntiles = 0, 0
        for n in col.names:
            nvox += int(np.prod(col[n].shape))
            hm = da.from_zarr(col.zarr_group[f"derived/heatmaps/{run}/{n}/0"])
            np.save(out / f"hm_{n}.npy", hm.compute(scheduler="synchronous"))
            ntiles += int(np.prod(col[n].data(0).rechunk(a.tile).numblocks)) if a.tile else 0
    picks.to_parquet(out / "picks.parquet")
    return {"seconds": dt, "voxels": nvox, "n_tiles": ntiles, "halo_used": list(a.halo or picker.halo),
            "workers": workers}


def child_train(a: argparse.Namespace) -> dict:
    """Train the picker (its own process, so the parent stays small)."""
    import pandas as pd
    import torch

    torch.set_num_threads(a.threads)
    import milotile as mt

    col = mt.open(a.store)
    labels = pd.read_parquet(a.labels)
    run = Path(a.out)
    if run.exists():
        shutil.rmtree(run)
    t0 = time.perf_counter()
    mt.refine.train(col, labels[["tomogram", "x", "y", "z"]], bbox=2 * a.radius, epochs=a.epochs, arch="unet4",
                    arch_config={"start_filts": a.start_filts}, batch_size=4, crop=(8, 64, 64), lr=1e-3,
                    tau=0.01, random_fraction=0.5, repeats=3, val_fraction=0.0, out=run, seed=a.seed,
                    device=a.device)
    recs = mt.nn.RunLog(run).records()
    return {"train_s": time.perf_counter() - t0, "seconds_per_epoch": float(np.median([r["seconds"] for r in recs])),
            "final_loss": recs[-1].get("loss")}


CHILDREN = {"whole": child_whole, "tiled": child_tiled, "train": child_train}


# --------------------------------------------------------------------------- parent
def child_cmd(a: argparse.Namespace, mode: str, out: Path, **extra) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--store", str(a.store),
           "--out", str(out), "--radius", str(a.radius), "--device", a.device, "--seed", str(a.seed)]
    if a.model:
        cmd += ["--model", str(a.model)]
    for k, v in extra.items():
        if v is None:
            continue
        vals = [str(x) for x in v] if isinstance(v, (list, tuple)) else [str(v)]
        cmd += [f"--{k.replace('_', '-')}", *vals]
    return cmd


def measured(a: argparse.Namespace, mode: str, out: Path, **extra) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()[0]
    wall, peak, stdout = run_measured(child_cmd(a, mode, out, **extra))
    res = json.loads(stdout.strip().splitlines()[-1])
    res.update(process_wall_s=wall, peak_rss_mb=peak / 2**20, load_avg_1m_before=load,
               load_avg_1m_after=os.getloadavg()[0])
    return res


def prepare(a: argparse.Namespace, work: Path):
    """Synthetic data + store, reused when ``work`` already holds the same parameters."""
    import pandas as pd

    import milotile as mt
    from milotile.synth import synth

    params = {"seed": a.seed, "n_tomograms": a.n_tomograms, "size": list(a.size), "snr": a.snr,
              "n_particles": a.n_particles}
    stamp = work / "data.json"
    if stamp.exists() and json.loads(stamp.read_text()) == params and (work / "gt.parquet").exists():
        return pd.read_parquet(work / "gt.parquet"), 0.0
    for p in ("synth", "store.zarr", "run"):
        shutil.rmtree(work / p, ignore_errors=True)
    t0 = time.perf_counter()
    res = synth(work / "synth", seed=a.seed, n_tomograms=a.n_tomograms, size=tuple(a.size), snr=a.snr,
                n_particles=a.n_particles)
    with mt.cluster(workers=2, threads_per_worker=1, dashboard_address=None):
        mt.ingest(res.manifest, work / "store.zarr", overwrite=True)
    res.ground_truth.to_parquet(work / "gt.parquet")
    stamp.write_text(json.dumps(params))
    return res.ground_truth, time.perf_counter() - t0


def accuracy(picks, true, first: str, match_r: float) -> dict:
    from milotile.metrics import evaluate, pr_curve

    if len(picks) == 0:
        return {"best_f1": 0.0, "curve": []}
    curve = pr_curve(picks, true, match_r, by="tomogram", max_thresholds=200)
    i = int(np.argmax(curve["f1"].to_numpy()))
    best_thr = float(curve["threshold"].iloc[i])
    table = []
    for thr in (0.05, 0.1, 0.25, 0.5, 0.75, 0.9):
        r = evaluate(picks, true, match_r, by="tomogram", threshold=thr).iloc[-1]
        table.append({"threshold": thr, "n_pred": int(r["n_pred"]), "tp": int(r["tp"]),
                      "precision": round(float(r["precision"]), 4), "recall": round(float(r["recall"]), 4),
                      "f1": round(float(r["f1"]), 4)})
    unseen_p, unseen_t = picks[picks["tomogram"] != first], true[true["tomogram"] != first]
    f_unseen = evaluate(unseen_p, unseen_t, match_r, by="tomogram", threshold=0.5).iloc[-1]["f1"] if len(unseen_t) else None
    return {"best_f1": round(float(curve["f1"].iloc[i]), 4), "best_threshold": round(best_thr, 4),
            "best_precision": round(float(curve["precision"].iloc[i]), 4),
            "best_recall": round(float(curve["recall"].iloc[i]), 4),
            "f1_at_0.5_unseen_tomograms": None if f_unseen is None else round(float(f_unseen), 4),
            "curve": table}


# --------------------------------------------------------------------------- pick speed (issue 26)
#: ``--speed`` variants: ``refine pick`` options (TTA views, bf16 autocast on CPUs with AMX / AVX512-BF16).
SPEED_VARIANTS = {"checkpoint": [], "tta4_fp32": ["--tta", "4", "--no-cpu-bf16"], "tta4_bf16": ["--tta", "4", "--cpu-bf16"],
                  "tta1_fp32": ["--tta", "1", "--no-cpu-bf16"], "tta1_bf16": ["--tta", "1", "--cpu-bf16"],
                  "tta2_bf16": ["--tta", "2", "--cpu-bf16"]}


def _cpu(who: int) -> float:
    import resource

    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def _pick_cli(cmd: list[str], env: dict | None, voxels: int) -> dict:
    """Run one ``refine pick`` command; wall and CPU seconds (the process tree), voxels/s, the load average."""
    import resource
    import subprocess

    load0, c0, t0 = os.getloadavg()[0], _cpu(resource.RUSAGE_CHILDREN), time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall, cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_CHILDREN) - c0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "mvoxels_per_s": round(voxels / wall / 1e6, 3),
            "mvoxels_per_cpu_s": round(voxels / cpu / 1e6, 3),
            "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def pick_speed(store: str, model: str, variants: list[str], workdir: Path, in_process: bool = True,
               baseline_src: str | None = None, baseline_variants: list[str] | None = None, rounds: int = 1) -> dict:
    """Voxels per second of ``milotile refine pick`` as the whole CLI command (a fresh process: start-up,
    cluster, model load, statistics, network, decoding, shape check, writing the picks) and of the library's
    ``pick`` in this process (dask's threads, no cluster), each with its CPU time (user + sys of the process
    tree) and the load average: the machine may be shared, CPU seconds per voxel are the steadier figure.

    ``baseline_src``: a ``src`` folder of earlier code (``git archive REV src | tar -x``); its CLI runs with
    ``baseline_variants`` at the start of each of ``rounds`` rounds, then this code's variants (paired and
    interleaved: ``paired`` holds baseline / variant seconds, wall and CPU, per round)."""
    import resource

    import milotile as mt
    from milotile.refine.picker import Picker
    from milotile.refine.predict import pick

    col = mt.open(store)
    voxels = sum(int(np.prod(col[n].shape)) for n in col.names)
    exe = str(Path(sys.executable).with_name("milotile"))
    out: dict = {"store": store, "model": model, "voxels": voxels, "cli": {}, "in_process": {},
                 "baseline_src": baseline_src, "rounds": rounds}
    base_env = None
    if baseline_src:
        base_env = {**os.environ, "PYTHONPATH": str(Path(baseline_src).resolve())}
        out["baseline"], out["paired"] = {}, []
    for r in range(rounds):
        base: dict = {}
        for bname in (baseline_variants or []) if baseline_src else []:
            bcmd = [sys.executable, "-c", "import sys; from milotile.cli import main; sys.exit(main())", "refine",
                    "pick", store, "--model", model, "--no-heatmaps", "--out",
                    str(workdir / f"speed_base_{bname}.parquet"), *SPEED_VARIANTS[bname]]
            base[bname] = _pick_cli(bcmd, base_env, voxels)
            out["baseline"].setdefault(bname, []).append(base[bname])
            print("baseline", bname, base[bname], flush=True)
        for name in variants:
            cmd = [exe, "refine", "pick", store, "--model", model, "--no-heatmaps", "--out",
                   str(workdir / f"speed_{name}.parquet"), *SPEED_VARIANTS[name]]
            res = {**_pick_cli(cmd, None, voxels), "command": " ".join(cmd)}
            out["cli"].setdefault(name, []).append(res)
            print("cli", name, res, flush=True)
            for bname, bres in base.items():
                out["paired"].append({"round": r, "variant": name, "baseline": bname,
                                      "speed_up_wall": round(bres["wall_s"] / res["wall_s"], 3),
                                      "speed_up_cpu": round(bres["cpu_s"] / res["cpu_s"], 3)})
                print("paired", out["paired"][-1], flush=True)
            if not in_process or r:
                continue
            opts = SPEED_VARIANTS[name]
            picker = Picker.load(model, device="cpu")
            if "--tta" in opts:
                picker.contract["tta"] = int(opts[opts.index("--tta") + 1])
            if "--cpu-bf16" in opts or "--no-cpu-bf16" in opts:
                picker.contract["cpu_bf16"] = "--cpu-bf16" in opts
            load0, c0, t0 = os.getloadavg()[0], _cpu(resource.RUSAGE_SELF), time.perf_counter()
            picks = pick(col, picker, write_heatmaps=False, table=None)
            wall, cpu = time.perf_counter() - t0, _cpu(resource.RUSAGE_SELF) - c0
            out["in_process"][name] = {"wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "picks": int(len(picks)),
                                       "mvoxels_per_s": round(voxels / wall / 1e6, 3),
                                       "mvoxels_per_cpu_s": round(voxels / cpu / 1e6, 3),
                                       "load_avg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
            print("in-process", name, out["in_process"][name], flush=True)
    return out


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2 x 48 x 128 x 128, 3 epochs (smoke run, ~2 min)")
    ap.add_argument("--size", type=int, nargs=3, default=(64, 256, 256), metavar=("Z", "Y", "X"))
    ap.add_argument("--n-tomograms", type=int, default=3)
    ap.add_argument("--n-particles", type=int, default=60, help="particles per tomogram (all species)")
    ap.add_argument("--snr", type=float, default=0.5)
    ap.add_argument("--species", default="ribosome")
    ap.add_argument("--fraction", type=float, default=0.3, help="labelled fraction of the species in tomogram 0")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--start-filts", type=int, default=16)
    ap.add_argument("--tile", type=int, nargs=3, default=(32, 256, 256), metavar=("Z", "Y", "X"),
                    help="tile of the tiled runs (the predictor's default, 64 x 512 x 512, would be one tile "
                         "per tomogram here)")
    ap.add_argument("--xy-tile", type=int, nargs=3, default=(64, 128, 128), metavar=("Z", "Y", "X"),
                    help="tile of the xy-tiled runs (exact and halo-capped)")
    ap.add_argument("--halo-cap", type=int, nargs=3, default=(8, 32, 32), metavar=("Z", "Y", "X"),
                    help="halo of the capped variant in level-0 voxels (each axis at most the full halo)")
    ap.add_argument("--variants", default="whole1,whole2,tiled1,tiled2,xy2,xy2cap",
                    help="subset of whole1,whole2,tiled1,tiled2,xy1,xy2,xy2cap")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="keep (and reuse) data, picker and heatmaps here")
    ap.add_argument("--model", default=None, help="skip training and use this picker checkpoint")
    ap.add_argument("--json", default=None, help="output JSON name (default refine_pick[_quick])")
    ap.add_argument("--speed", nargs=2, default=None, metavar=("STORE", "CKPT"),
                    help="only the pick speed of this store and picker: `milotile refine pick` as a whole command "
                         "and in-process, per --speed-variants (writes refine_pick_speed.json)")
    ap.add_argument("--speed-variants", default="checkpoint,tta4_fp32,tta1_bf16",
                    help=f"subset of {','.join(SPEED_VARIANTS)}")
    ap.add_argument("--no-in-process", action="store_true", help="with --speed: the CLI only")
    ap.add_argument("--baseline-src", default=None, metavar="DIR",
                    help="with --speed: also run the CLI of this src folder of earlier code (git archive REV src | tar -x) "
                         "after each command, paired and interleaved")
    ap.add_argument("--baseline-variants", default="tta4_fp32", help="with --baseline-src: its variants")
    ap.add_argument("--rounds", type=int, default=1, help="with --speed: interleaved rounds")
    # child mode (internal)
    ap.add_argument("--child", choices=sorted(CHILDREN), default=None, help=argparse.SUPPRESS)
    ap.add_argument("--store", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--labels", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--radius", type=float, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workers", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--halo", type=int, nargs=3, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.quick and not a.child:
        a.size, a.n_tomograms, a.n_particles, a.epochs, a.start_filts = (48, 128, 128), 2, 30, 3, 8
        a.tile, a.xy_tile = (24, 128, 128), (48, 64, 64)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if a.child:
        print(json.dumps(CHILDREN[a.child](a), default=float))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    if a.speed:
        work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="pick_speed_"))
        work.mkdir(parents=True, exist_ok=True)
        res = pick_speed(a.speed[0], a.speed[1], a.speed_variants.split(","), work, not a.no_in_process,
                         a.baseline_src, a.baseline_variants.split(","), a.rounds)
        cmd = " ".join(["python benchmarks/refine_pick.py", *(argv if argv is not None else sys.argv[1:])])
        print("results:", write_results(a.json or "refine_pick_speed", {"command": cmd, **res}))
        return 0
    import pandas as pd

    t_all = time.perf_counter()
    work = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="pick_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    gt, t_data = prepare(a, work)
    a.store = work / "store.zarr"
    names = sorted(gt["tomogram"].unique())
    sp = gt[gt["species"] == a.species]
    if sp.empty:
        raise SystemExit(f"no {a.species} particles in the synthetic data")
    a.radius = float(sp["radius"].iloc[0])
    match_r = a.radius / 2.0
    print(f"data: {a.n_tomograms} x {tuple(a.size)}, {len(sp)} {a.species} (radius {a.radius}); "
          f"synth+ingest {t_data:.1f} s (0 = reused)", flush=True)

    training = None
    if a.model is None:
        rng = np.random.default_rng(a.seed)
        first = sp[sp["tomogram"] == names[0]]
        n_lab = max(2, int(round(a.fraction * len(first))))
        labels = first.iloc[np.sort(rng.choice(len(first), n_lab, replace=False))]
        labels.to_parquet(work / "labels.parquet")
        run = work / "run"
        stamp = {"epochs": a.epochs, "start_filts": a.start_filts, "labels": labels[["x", "y", "z"]].values.tolist()}
        if (run / "last.pt").exists() and (work / "run.json").exists() \
                and json.loads((work / "run.json").read_text())["stamp"] == stamp:
            training = json.loads((work / "run.json").read_text())["training"]
            training["reused"] = True
        else:
            training = measured(a, "train", run, labels=work / "labels.parquet", epochs=a.epochs,
                                start_filts=a.start_filts, threads=2)
            training.update(n_labelled=int(n_lab), n_in_first_tomogram=int(len(first)), epochs=a.epochs,
                            start_filts=a.start_filts)
            (work / "run.json").write_text(json.dumps({"stamp": stamp, "training": training}))
        a.model = str(run / "last.pt")
        print(f"picker: {n_lab} of {len(first)} {a.species} labelled in {names[0]}; train "
              f"{training['train_s']:.0f} s ({training['seconds_per_epoch']:.2f} s/epoch)", flush=True)

    from milotile.refine.picker import Picker

    picker = Picker.load(a.model, device="cpu")
    full_halo = list(picker.halo)
    cap = [min(c, f) for c, f in zip(a.halo_cap, full_halo, strict=True)]
    tz, xyz = "x".join(map(str, a.tile)), "x".join(map(str, a.xy_tile))
    variants = {
        "whole1": ("whole_1thread", "whole", {"threads": 1}),
        "whole2": ("whole_2threads", "whole", {"threads": 2}),
        "tiled1": (f"tiled_{tz}_1worker", "tiled", {"workers": 1, "tile": a.tile}),
        "tiled2": (f"tiled_{tz}_2workers", "tiled", {"workers": 2, "tile": a.tile}),
        "xy1": (f"tiled_{xyz}_1worker", "tiled", {"workers": 1, "tile": a.xy_tile}),
        "xy2": (f"tiled_{xyz}_2workers", "tiled", {"workers": 2, "tile": a.xy_tile}),
        "xy2cap": (f"tiled_{xyz}_2workers_halo{'x'.join(map(str, cap))}", "tiled",
                   {"workers": 2, "tile": a.xy_tile, "halo": cap}),
    }
    speed, outs = {}, {}
    for key in a.variants.split(","):
        label, mode, extra = variants[key]
        out = work / "out" / label
        shutil.rmtree(out, ignore_errors=True)
        r = measured(a, mode, out, **extra)
        r["voxels_per_s"] = r["voxels"] / r["seconds"]
        speed[label] = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}
        outs[label] = out
        print(f"{label:40s} {r['voxels_per_s']:>10,.0f} vox/s  {r['seconds']:6.1f} s  "
              f"peak RSS {r['peak_rss_mb']:6.0f} MB  (load {r['load_avg_1m_before']:.2f})", flush=True)

    # accuracy and heatmap agreement
    true = sp[["tomogram", "x", "y", "z"]]
    acc, diff = {}, {}
    ref = next((lb for lb in outs if lb.startswith("whole")), None)
    for label, out in outs.items():
        picks = pd.read_parquet(out / "picks.parquet")
        acc[label] = accuracy(picks, true, names[0], match_r)
        if ref is not None and label != ref:
            d = [float(np.abs(np.load(out / f"hm_{n}.npy") - np.load(outs[ref] / f"hm_{n}.npy")).max()) for n in names]
            diff[f"{label}_vs_{ref}"] = max(d)
    print("\nvariant                                  best F1 (thr)      F1@0.5   P@0.5   R@0.5")
    for label, r in acc.items():
        c5 = next((c for c in r["curve"] if c["threshold"] == 0.5), None)
        if c5:
            print(f"{label:40s} {r['best_f1']:.3f} ({r['best_threshold']:.2f})    "
                  f"{c5['f1']:.3f}   {c5['precision']:.3f}   {c5['recall']:.3f}")
    for k, v in diff.items():
        print(f"max |heatmap difference| {k}: {v:.2e}")

    out = {
        "command": " ".join(["python benchmarks/refine_pick.py", *(argv if argv is not None else sys.argv[1:])]),
        "data": {"n_tomograms": a.n_tomograms, "size_zyx": list(a.size), "n_particles_per_tomogram": a.n_particles,
                 "snr": a.snr, "species": a.species, "n_true": int(len(sp)), "radius": a.radius,
                 "match_radius": match_r, "store_chunks": [min(64, a.size[0]), min(256, a.size[1]), min(256, a.size[2])]},
        "picker": {"checkpoint": a.model, "training": training, "full_halo_zyx": full_halo,
                   "receptive_field_zyx": picker.contract.get("receptive_field")},
        "tile_zyx": list(a.tile),
        "xy_tile_zyx": list(a.xy_tile),
        "halo_cap_zyx": {"asked": list(a.halo_cap), "used": cap, "full": full_halo},
        "decode": {**DECODE, "nms_distance": a.radius, "border": int(np.floor(a.radius / 2.0))},
        "prediction": speed,
        "accuracy": acc,
        "max_abs_heatmap_difference": diff,
        "total_run_s": round(time.perf_counter() - t_all, 1),
    }
    path = write_results(a.json or ("refine_pick_quick" if a.quick else "refine_pick"), out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
