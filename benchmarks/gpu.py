"""The pipeline's GPU paths on one GPU, with figures: run by ``benchmarks/gpu.sh`` (issue 26, item 5).

Phases (each with AMP on and off where the path has mixed precision):

* ``explore_train`` -- SimSiam training on a slab patch bank (patches/s, peak GPU memory);
* ``explore_embed`` -- embedding every patch of the bank (patches/s);
* ``refine_train``  -- PU picker training (labelled crops/s, s/epoch);
* ``refine_pick``   -- picking every tomogram of the collection (voxels/s);
* ``predict_big``   -- tiled heatmap prediction of one 256×1024×1024 noise volume (voxels/s, FLOP/s and
  fraction of the card's datasheet peak, peak GPU memory);
* ``dask_two_gpus`` -- the same picking on a LocalCluster with one worker per GPU (only with ≥ 2 GPUs).

Peak GPU memory is ``torch.cuda.max_memory_allocated`` of the phase (reset before each). Without CUDA
(or with ``--cpu-smoke``) the same phases run on the CPU at small sizes, which proves the script works.
The JSON goes to ``$OUT/gpu.json`` when ``OUT`` is set (the device tool's output folder), else to
``benchmarks/results/gpu.json`` (``gpu_cpu_smoke.json`` for a CPU run).

    python benchmarks/gpu.py                # on a GPU machine, < 8 min
    python benchmarks/gpu.py --cpu-smoke    # tiny sizes on the CPU, a few minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, exit_on_sigterm, machine  # noqa: E402
from _peak import gpu_peak, model_flops  # noqa: E402

log = logging.getLogger("bench.gpu")

#: sizes of a GPU run and of the CPU smoke run
SIZES = {
    "gpu": {"tomograms": 3, "size": (96, 256, 256), "explore_epochs": 3, "refine_epochs": 3,
            "big": (256, 1024, 1024), "bbox": 24},
    "cpu": {"tomograms": 2, "size": (32, 96, 96), "explore_epochs": 1, "refine_epochs": 1,
            "big": (32, 128, 128), "bbox": 16},
}


class Phase:
    """Time one phase on ``device``; record wall seconds and peak GPU memory."""

    def __init__(self, name: str, device: torch.device, rows: list[dict], **facts):
        self.row = {"phase": name, "device": str(device), **facts}
        self.device, self.rows = device, rows

    def __enter__(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.t0 = time.perf_counter()
        return self.row

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        self.row["wall_s"] = round(time.perf_counter() - self.t0, 2)
        if exc is not None:  # one failing phase must not lose the others' figures
            self.row["error"] = "".join(traceback.format_exception_only(exc_type, exc)).strip()[-800:]
            log.error("%s failed: %s", self.row["phase"], self.row["error"])
        log.info("%s", json.dumps(self.row))
        self.rows.append(self.row)
        return exc is not None and issubclass(exc_type, Exception)


def build_collection(work: Path, sz: dict) -> tuple:
    """Synthetic tomograms -> store -> preprocess -> candidates -> slab patches; labels of one species."""
    import pandas as pd

    import milotile as mt
    from milotile.synth import synth

    synth(work / "src", n_tomograms=sz["tomograms"], size=sz["size"], seed=0)
    col = mt.ingest(work / "src" / "tomograms.txt", work / "s.zarr")
    col.preprocess()
    col.mine()
    bank = col.patches(bbox=sz["bbox"])
    gt = pd.read_parquet(work / "src" / "ground_truth.parquet")
    species = gt.species.value_counts().index[0]
    labels = gt.loc[gt.species == species, ["tomogram", "x", "y", "z", "radius"]].reset_index(drop=True)
    return col, bank, labels


def explore_phases(col, bank, sz: dict, dev: torch.device, amps: list[bool], work: Path, rows: list) -> None:
    from milotile.explore import embed, train
    from milotile.explore.recipe import ExploreRecipe

    for amp in amps:
        with Phase("explore_train", dev, rows, amp=amp, patches=int(bank.n), epochs=sz["explore_epochs"]) as r:
            recipe = ExploreRecipe().replace(epochs=sz["explore_epochs"], amp=amp, save_every=1000)
            enc = train(col, bank, recipe=recipe, device=str(dev), out=work / f"e_{amp}")
        if "error" not in r:
            r["patches_per_s"] = round(bank.n * sz["explore_epochs"] / r["wall_s"], 1)
        else:
            continue
        enc.amp = amp
        with Phase("explore_embed", dev, rows, amp=amp, patches=int(bank.n)) as r:
            embed(col, model=enc, out_key=f"emb-{amp}", device=str(dev), overwrite=True)
        if "error" not in r:
            r["patches_per_s"] = round(bank.n / r["wall_s"], 1)


def refine_phases(col, labels, sz: dict, dev: torch.device, amps: list[bool], work: Path, rows: list):
    from milotile.refine import pick, train

    picker = None
    for amp in amps:
        radius = float(labels["radius"].iloc[0]) if "radius" in labels else 6.0
        with Phase("refine_train", dev, rows, amp=amp, labels=len(labels), epochs=sz["refine_epochs"]) as r:
            p = train(col, labels[["tomogram", "x", "y", "z"]], bbox=int(2 * radius), epochs=sz["refine_epochs"], amp=amp, device=str(dev),
                      out=work / f"r_{amp}")
        if "error" in r:
            continue
        repeats = int(p.contract.get("recipe", {}).get("repeats", 5))
        r["labelled_crops_per_s"] = round(len(labels) * repeats * sz["refine_epochs"] / r["wall_s"], 2)
        p.amp = amp
        voxels = sum(math.prod(t.shape) for t in col)
        with Phase("refine_pick", dev, rows, amp=amp, voxels=voxels) as r:
            pick(col, p, write_heatmaps=False, table=None)
        if "error" not in r:
            r["voxels_per_s"] = round(voxels / r["wall_s"])
        picker = picker or p
    return picker


def predict_big(picker, shape: tuple, dev: torch.device, amps: list[bool], work: Path, rows: list) -> None:
    """Tiled prediction of a noise volume of ``shape`` (speed does not depend on content)."""
    import milotile as mt
    from milotile.cluster import local_scheduler
    from milotile.refine.predict import predict_heatmap
    from milotile.store.mrc import write_mrc

    t0 = time.perf_counter()
    vol = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    write_mrc(work / "big.mrc", vol, voxel_size=10.0)
    del vol
    col = mt.ingest([work / "big.mrc"], work / "big.zarr")
    (work / "big.mrc").unlink()
    prepare_s = time.perf_counter() - t0
    nvox = math.prod(shape)
    probe = torch.zeros((1, 32, 64, 64), device=dev)  # (B, D, H, W)
    model = picker.model
    try:
        with torch.no_grad():
            fpv = model_flops(lambda: model(probe)) / probe.numel()  # forward FLOPs per input voxel
    except Exception as exc:  # noqa: BLE001 - the rate is still worth having
        log.warning("FLOP count failed (%s); no fraction of peak", exc)
        fpv = float("nan")
    peak = gpu_peak() if dev.type == "cuda" else None
    for amp in amps:
        picker.amp = amp
        with Phase("predict_big", dev, rows, amp=amp, shape=list(shape), voxels=nvox,
                   prepare_s=round(prepare_s, 1)) as r, local_scheduler("threads"):
            predict_heatmap(col, col.names[0], picker, stats=(0.0, 1.0)).compute()
        if "error" in r:
            continue
        r["voxels_per_s"] = round(nvox / r["wall_s"])
        r["flops_per_s"] = fpv * nvox / r["wall_s"]
        if peak is not None and fpv == fpv:
            r["fraction_of_peak"] = round(r["flops_per_s"] / peak["bf16_flops" if amp else "fp32_flops"], 4)
            r["peak_assumed"] = peak
    picker.amp = True


def dask_two_gpus(col, picker, dev: torch.device, rows: list) -> None:
    """Picking with one Dask worker per GPU (LocalCluster advertises ``GPU=1`` per worker)."""
    import milotile as mt
    from milotile.refine import pick

    voxels = sum(math.prod(t.shape) for t in col)
    with Phase("dask_two_gpus", dev, rows, workers=2, voxels=voxels) as r, \
            mt.cluster(workers=2, dashboard_address=None):
        pick(col, picker, write_heatmaps=False, table=None)
    if "error" not in r:
        r["voxels_per_s"] = round(voxels / r["wall_s"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="run on the CPU at small sizes (no CUDA needed)")
    p.add_argument("--phases", default="explore,refine,big,dask", help="comma-separated subset")
    p.add_argument("--big", default=None, help="shape Z,Y,X of the tiled-prediction volume (default per device)")
    p.add_argument("--out", default=None, help="JSON path (default $OUT/gpu.json or benchmarks/results/)")
    p.add_argument("--work", default=None, help="working folder (default a temporary one, removed)")
    a = p.parse_args()
    exit_on_sigterm()  # gpu.sh's time limit still writes the figures measured so far
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    cuda = torch.cuda.is_available() and not a.cpu_smoke
    dev = torch.device("cuda" if cuda else "cpu")
    sz = dict(SIZES["gpu" if cuda else "cpu"])
    if a.big:
        sz["big"] = tuple(int(v) for v in a.big.split(","))
    amps = [True, False]
    phases = set(a.phases.split(","))
    if a.out:
        out = Path(a.out)
    elif os.environ.get("OUT"):
        out = Path(os.environ["OUT"]) / "gpu.json"
    else:
        out = RESULTS / ("gpu.json" if cuda else "gpu_cpu_smoke.json")
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="milotile-gpu-"))
    work.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if cuda else 0
    result: dict = {"benchmark": "gpu", "device": torch.cuda.get_device_name(0) if cuda else "cpu (smoke run)",
                    "gpus": gpus, "torch": torch.__version__, "cuda": torch.version.cuda, "sizes": sz,
                    "machine": machine(), "phases": []}
    rows = result["phases"]
    t_all = time.perf_counter()
    try:
        t0 = time.perf_counter()
        col, bank, labels = build_collection(work, sz)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        if "explore" in phases:
            explore_phases(col, bank, sz, dev, amps, work, rows)
        picker = None
        if phases & {"refine", "big", "dask"}:
            picker = refine_phases(col, labels, sz, dev, amps if "refine" in phases else [True], work, rows)
        if picker is not None and "big" in phases:
            predict_big(picker, tuple(sz["big"]), dev, amps, work, rows)
        if picker is not None and "dask" in phases and gpus >= 2:
            dask_two_gpus(col, picker, dev, rows)
        elif "dask" in phases:
            result["dask_two_gpus"] = f"skipped: {gpus} GPU(s)"
    finally:
        result["total_s"] = round(time.perf_counter() - t_all, 1)
        result["errors"] = [r["phase"] for r in rows if "error" in r]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=float))
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    log.info("%d phases (%d failed) in %.0f s -> %s", len(rows), len(result["errors"]), result["total_s"], out)
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
