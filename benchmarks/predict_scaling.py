"""Prediction that scales with the data, not the halo (issue 12, item 3): voxels/s of tiled prediction
against a single whole-volume forward pass, in the same run, at several tomogram sizes.

For each ``--sizes`` entry a noise volume of that shape is ingested (speed does not depend on content)
and predicted by a ``unet4`` picker (``--start-filts``, default 16 as the demo; random weights):

* ``whole``   -- MiLoPYP's way: one forward pass of the model over the whole volume
  (``model(x[None])``, torch with all cores); where it does not fit, the largest z-slab that does (below);
* ``tiled_new`` -- :func:`milotile.refine.predict.predict_heatmap` with the default tile plan
  (``ops.tiling.plan_tiles``: one tile for small tomograms, else cut where the halo is thinnest) and the
  per-slice trunk computed once per tile, on dask's threaded scheduler (2 threads x 1 torch thread);
* ``tiled_old`` -- the previous default: tiles of (store chunk z = 64, 512, 512) with the full halo and
  the model run on overlapping z slabs (``Picker.predict_preprocessed`` of the old code path).

Reported: voxels/s (level-0 voxels / wall seconds of the prediction incl. reading and normalising),
halo overhead of the tile plan (fraction of computed voxels that are halo), ratios, FLOP/s and fraction
of peak of the whole pass, and the max abs difference of each heatmap to the whole-volume one.

    python benchmarks/predict_scaling.py                 # 128x256x256 and 256x1024x1024
    python benchmarks/predict_scaling.py --quick         # tiny sizes, seconds

Where the whole pass would not fit in RAM (its memory per voxel is measured up front on a small probe),
the JSON says ``"whole_pass": "skipped: needs N GiB"`` and the whole pass is measured on the largest
z-slab that fits; its voxels/s stands in for the whole pass's per-voxel rate.
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
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, machine, result_path, threads  # noqa: E402
from _peak import cpu_peak, model_flops  # noqa: E402

log = logging.getLogger("bench.predict_scaling")


class _Geom:
    sigma, radius = 2.0, 4.0


def make_picker(start_filts: int):
    from milotile.refine.contract import picker_contract
    from milotile.refine.model import unet4
    from milotile.refine.picker import Picker
    from milotile.refine.train import DEFAULT_UNET

    torch.manual_seed(0)
    model = unet4(**{**DEFAULT_UNET, "z_dilation": 2, "start_filts": start_filts})  # the default picker network for a 10-voxel box
    contract = picker_contract(arch="unet4", model=model, classes=["particle"], bbox=12, crop=(8, 64, 64), gauss=0.0,
                               compress=False, clip=(-3, 3), thresh=0.8, tau=0.1, geom=_Geom(), voxel_size=10.0,
                               train_stats={}, val_radius=3.0)
    return Picker(model, contract, device="cpu")


class _SlabPicker:
    """The old prediction path: the model on overlapping z slabs (trunk recomputed in the overlaps)."""

    def __init__(self, picker):
        self.p = picker
        self.contract, self.halo, self.n_classes, self.classes = picker.contract, picker.halo, 1, ["particle"]

    def predict_block(self, raw, stats):
        from milotile.ops.preprocess import preprocess_block

        c = self.contract
        x = preprocess_block(np.asarray(raw), mean=stats[0], std=stats[1], gauss=0.0, clip=tuple(c["clip"]),
                             compress=False, compress_how="max")
        slab, mz = max(int(c["crop"][0]), 2 * (int(c["receptive_field_model"][0]) // 2) + 8), \
            int(c["receptive_field_model"][0]) // 2
        d = x.shape[0]
        step = max(slab - 2 * mz, 1)
        starts = [0] if d <= slab else list(range(0, d - slab, step)) + [d - slab]
        out = None
        with torch.no_grad():
            for s in starts:
                e = min(s + slab, d)
                prob = torch.sigmoid(self.p.model(torch.from_numpy(np.ascontiguousarray(x[s:e]))[None])["hm"])[0].numpy()
                if out is None:
                    out = np.empty((prob.shape[0], d, prob.shape[2], prob.shape[3]), np.float32)
                k0, k1 = (0 if s == 0 else mz), ((e - s) if e == d else (e - s - mz))
                out[:, s + k0 : s + k1] = prob[:, k0:k1]
        return out


def _hwm() -> int:
    """Peak resident memory (VmHWM) of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def whole_pass_memory(picker, start_filts: int, probe=(16, 384, 384)) -> dict:
    """Bytes per voxel of one whole-volume forward pass, measured on a small probe volume.

    The probe's peak RSS above the RSS before the pass (VmHWM after ``clear_refs``; the model's
    activations, the output and oneDNN scratch) divided by its voxels: a conservative per-voxel figure
    (constant parts are counted as if they grew with the volume). Falls back to a formula where VmHWM
    cannot be reset: stem + two trunk levels (``stem_ch/4 + 2 * start_filts/4`` floats per voxel).
    Also counts the FLOPs per voxel (``torch.utils.flop_counter`` on the probe).
    """
    x = torch.randn(1, *probe)
    nvox = math.prod(probe)
    if _reset_hwm():
        base = psutil.Process().memory_info().rss
        _reset_hwm()
        with torch.no_grad():
            picker.model(x)
        per_voxel, method = max(_hwm() - base, 0) / nvox, f"measured: peak RSS of a {probe} forward pass / its voxels"
    else:
        per_voxel = (picker.model.stem[0].out_channels / 4 + 2 * start_filts / 4) * 4
        method = "formula (VmHWM not resettable)"
    with torch.no_grad():
        flops = model_flops(lambda: picker.model(x))
    return {"bytes_per_voxel": per_voxel, "method": method, "probe": list(probe), "flops_per_voxel": flops / nvox}


def _whole(picker, vol, stats) -> tuple[np.ndarray, float]:
    """MiLoPYP's way: one forward pass over ``vol`` (torch on all cores); (heatmap, seconds)."""
    from milotile.ops.preprocess import preprocess_block

    torch.set_num_threads(os.cpu_count() or 1)
    x = torch.from_numpy(preprocess_block(vol, mean=stats[0], std=stats[1], gauss=0.0, clip=(-3.0, 3.0),
                                          compress=False, compress_how="max"))[None]
    t0 = time.perf_counter()
    with torch.no_grad():
        hm = torch.sigmoid(picker.model(x)["hm"])[0].numpy()
    return hm, time.perf_counter() - t0


def _rate(nvox: int, dt: float, fpv: float, peak: dict) -> dict:
    """voxels/s and the useful model FLOP/s (FLOPs per output voxel x voxels/s) as a fraction of peak."""
    return {"seconds": dt, "voxels_per_s": nvox / dt, "useful_gflop_per_s": fpv * nvox / dt / 1e9,
            "fraction_of_fp32_peak": fpv * nvox / dt / peak["fp32_flops"]}


def whole_variant(picker, vol, stats, mem: dict, a, peak) -> tuple[dict, np.ndarray | None]:
    """The whole-volume pass, or (where it does not fit in RAM) the same pass on the largest z-slab that fits."""
    shape, nvox = vol.shape, vol.size
    plane = shape[1] * shape[2]

    def need(z: int) -> float:  # + the preprocessed input and the float32 volume
        return (mem["bytes_per_voxel"] + 8) * z * plane

    avail = psutil.virtual_memory().available
    budget = min(a.whole_max_gib * 2**30, 0.8 * avail) if a.whole_max_gib else 0.8 * avail
    est = {"whole_pass_needs_gib": need(shape[0]) / 2**30, "available_gib": avail / 2**30, "budget_gib": budget / 2**30}
    if need(shape[0]) <= budget:
        hm, dt = _whole(picker, vol, stats)
        return {**est, **_rate(nvox, dt, mem["flops_per_voxel"], peak), "basis": "whole volume, one pass"}, hm
    fit = int(budget // need(1))
    z = min(fit, shape[0], a.slab_max_slices or shape[0])
    res = {**est, "whole_pass": f"skipped: needs {need(shape[0]) / 2**30:.1f} GiB "
           f"(budget {budget / 2**30:.1f} GiB = min(--whole-max-gib, 80 % of available RAM))",
           "slab_slices_that_fit": fit}
    if z < 8:
        return {**res, "skipped": "not even an 8-slice slab fits"}, None
    _, dt = _whole(picker, vol[:z], stats)
    res.update(_rate(z * plane, dt, mem["flops_per_voxel"], peak))
    res["basis"] = (f"one forward pass over a {z}x{shape[1]}x{shape[2]} z-slab (largest that fits"
                    + (f", capped at --slab-max-slices {a.slab_max_slices}" if z < fit else "")
                    + "); voxels/s of that slab used as the whole pass's per-voxel rate")
    return res, None


def run_size(shape, picker, work: Path, a, peak, mem: dict) -> dict:
    import milotile as mt
    from milotile.cluster import local_scheduler
    from milotile.ops.tiling import axis_cost, plan_tiles
    from milotile.refine.predict import TILE_VOXELS, predict_heatmap
    from milotile.store.mrc import write_mrc

    name = "x".join(map(str, shape))
    rng = np.random.default_rng(0)
    vol = rng.standard_normal(shape, dtype=np.float32)
    src = work / f"{name}.mrc"
    t0 = time.perf_counter()
    write_mrc(src, vol, voxel_size=10.0)
    col = mt.ingest([src], work / f"{name}.zarr")
    src.unlink()
    t = col.names[0]
    stats = (float(vol.mean()), float(vol.std()))
    nvox = math.prod(shape)
    row: dict = {"shape": list(shape), "voxels": nvox, "prepare_s": time.perf_counter() - t0}
    align = int(picker.contract["xy_alignment"])
    plan = plan_tiles(shape, picker.halo, (1, align, align), TILE_VOXELS)
    row["plan"] = {"tile": plan.tile, "counts": plan.counts, "halo_overhead": plan.halo_overhead}
    old_tile = (64, 512, 512)
    old_computed = math.prod(axis_cost(n, min(tt, n), h)[0] for n, tt, h in zip(shape, old_tile, picker.halo, strict=True))
    row["old_halo_overhead"] = 1 - nvox / old_computed
    results = {}
    results["whole"], whole = whole_variant(picker, vol, stats, mem, a, peak)
    del vol
    for label, pk, tile in (("tiled_new", picker, None), ("tiled_old", _SlabPicker(picker), old_tile)):
        if label == "tiled_old" and (a.skip_old or nvox > a.old_max_mvox * 1e6):
            results[label] = {"skipped": f"old tiling not run above --old-max-mvox {a.old_max_mvox} M voxels"}
            continue
        with local_scheduler("threads"):
            t0 = time.perf_counter()
            hm = predict_heatmap(col, t, pk, stats=stats, tile=tile).compute()
            dt = time.perf_counter() - t0
        torch.set_num_threads(os.cpu_count() or 1)
        results[label] = {**_rate(nvox, dt, mem["flops_per_voxel"], peak),
                          "halo_overhead": plan.halo_overhead if label == "tiled_new" else row["old_halo_overhead"]}
        if whole is not None:
            results[label]["max_abs_diff_to_whole"] = float(np.abs(hm - whole).max())
        del hm
    base = results["whole"].get("voxels_per_s")
    for v in results.values():
        if base and "voxels_per_s" in v:
            v["ratio_to_whole"] = v["voxels_per_s"] / base
    if "voxels_per_s" in results.get("tiled_old", {}):
        results["tiled_new"]["ratio_to_old_tiles"] = results["tiled_new"]["voxels_per_s"] / results["tiled_old"]["voxels_per_s"]
    row.update(results)
    log.info("%s: %s", name, json.dumps(results, default=float))
    shutil.rmtree(work / f"{name}.zarr", ignore_errors=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["128,256,256", "256,1024,1024"])
    p.add_argument("--start-filts", type=int, default=16, help="unet4 width (default 16, the CLI default)")
    p.add_argument("--whole-max-gib", type=float, default=0.0,
                   help="memory the whole pass may use (default 0: 80 %% of the available RAM)")
    p.add_argument("--slab-max-slices", type=int, default=0,
                   help="where the whole pass does not fit, cap the z-slab measured instead (0: largest that fits)")
    p.add_argument("--skip-old", action="store_true", help="do not run the old tiling at all")
    p.add_argument("--old-max-mvox", type=float, default=40.0,
                   help="run the old tiling only up to this many M voxels (default 40)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (32,128,128 and 48,256,256), start_filts 8")
    exit_on_sigterm()
    a = p.parse_args()
    if a.quick:
        a.sizes, a.start_filts = ["32,128,128", "48,256,256"], 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load0 = os.getloadavg()
    peak = cpu_peak()
    picker = make_picker(a.start_filts)
    torch.set_num_threads(os.cpu_count() or 1)
    mem = whole_pass_memory(picker, a.start_filts)
    log.info("whole pass: %.0f bytes/voxel (%s), %.0f FLOPs/voxel", mem["bytes_per_voxel"], mem["method"],
             mem["flops_per_voxel"])
    work = Path(tempfile.mkdtemp(prefix="milotile-predict-"))
    t_all = time.perf_counter()
    rows: list[dict] = []
    out = {"benchmark": "predict_scaling", "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
           "load_avg_at_start": load0, "peak": peak,
           "threads": {"whole": f"torch {os.cpu_count()} threads in the main process",
                       "tiled": "dask threaded scheduler (local_scheduler('threads')): one task per core, "
                                "torch threads = cores // dask threads", **threads()},
           "picker": {"arch": "unet4", "start_filts": a.start_filts, "halo": list(picker.halo)},
           "whole_pass_memory": mem, "sizes": rows}
    path = result_path("predict_scaling")
    try:
        for s in a.sizes:  # the JSON is rewritten after every size (a run stopped by a time budget keeps them)
            rows.append(run_size(tuple(int(v) for v in s.split(",")), picker, work, a, peak, mem))
            out.update(load_avg_at_end=os.getloadavg(), total_run_s=time.perf_counter() - t_all)
            path.write_text(json.dumps(out, indent=1, default=float))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nprediction voxels/s vs one whole-volume pass (unet4 start_filts {a.start_filts}; fp32 peak "
          f"{peak['fp32_flops'] / 1e9:.0f} GFLOP/s; useful FLOPs {mem['flops_per_voxel']:.0f}/voxel)")
    print(f"  {'volume':14s} {'variant':10s} {'M vox/s':>8s} {'x whole':>8s} {'x old':>6s} {'halo':>6s} "
          f"{'% peak':>7s} {'max|diff|':>9s}  basis")
    for r in rows:
        vname = "x".join(map(str, r["shape"]))
        for k in ("whole", "tiled_new", "tiled_old"):
            v = r.get(k) or {}
            if "voxels_per_s" not in v:
                print(f"  {vname:14s} {k:10s} {v.get('skipped', '')}")
                continue

            def f(key, fmt, v=v):
                return format(v[key], fmt) if key in v else "-"
            print(f"  {vname:14s} {k:10s} {v['voxels_per_s'] / 1e6:8.3f} {f('ratio_to_whole', '8.2f'):>8s} "
                  f"{f('ratio_to_old_tiles', '6.2f'):>6s} "
                  f"{(format(100 * v['halo_overhead'], '5.1f') + '%') if 'halo_overhead' in v else '-':>6s} "
                  f"{100 * v['fraction_of_fp32_peak']:6.2f}% {f('max_abs_diff_to_whole', '9.1e'):>9s}  {v.get('basis', '')}")
            if "whole_pass" in v:
                print(f"  {'':14s} {'':10s} whole_pass {v['whole_pass']}")
    print(f"load average {load0} -> {out['load_avg_at_end']}; {path}")


if __name__ == "__main__":
    main()
