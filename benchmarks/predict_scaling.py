"""Prediction that scales with the data, not the halo (issue 12, item 3): voxels/s of tiled prediction
against a single whole-volume forward pass, in the same run, at several tomogram sizes.

For each ``--sizes`` entry a noise volume of that shape is ingested (speed does not depend on content)
and predicted by a ``unet4`` picker (``--start-filts``, default 16 as the demo; random weights):

* ``whole``   -- MiLoPYP's way: one forward pass of the model over the whole volume
  (``model(x[None])``, torch with all cores); skipped when its activations would exceed ``--whole-max-gib``;
* ``tiled_new`` -- :func:`milotile.refine.predict.predict_heatmap` with the default tile plan
  (``ops.tiling.plan_tiles``: one tile for small tomograms, else cut where the halo is thinnest) and the
  per-slice trunk computed once per tile, on dask's threaded scheduler (2 threads x 1 torch thread);
* ``tiled_old`` -- the previous default: tiles of (store chunk z = 64, 512, 512) with the full halo and
  the model run on overlapping z slabs (``Picker.predict_preprocessed`` of the old code path).

Reported: voxels/s (level-0 voxels / wall seconds of the prediction incl. reading and normalising),
halo overhead of the tile plan (fraction of computed voxels that are halo), ratios, FLOP/s and fraction
of peak of the whole pass, and the max abs difference of each heatmap to the whole-volume one.

    nice python benchmarks/predict_scaling.py --sizes 128,256,256 64,1024,1024
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
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402
from _peak import cpu_peak, model_flops  # noqa: E402

log = logging.getLogger("bench.predict_scaling")


class _Geom:
    sigma, radius = 2.0, 4.0


def make_picker(start_filts: int):
    from milotile.refine.contract import picker_contract
    from milotile.refine.model import unet4
    from milotile.refine.picker import Picker

    torch.manual_seed(0)
    model = unet4(start_filts=start_filts)
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


def run_size(shape, picker, work: Path, a, peak) -> dict:
    import milotile as mt
    from milotile.cluster import local_scheduler
    from milotile.ops.preprocess import preprocess_block
    from milotile.ops.tiling import axis_cost, plan_tiles
    from milotile.refine.predict import TILE_VOXELS, predict_heatmap
    from milotile.store.mrc import write_mrc

    name = "x".join(map(str, shape))
    rng = np.random.default_rng(0)
    vol = rng.standard_normal(shape, dtype=np.float32)
    src = work / f"{name}.mrc"
    write_mrc(src, vol, voxel_size=10.0)
    col = mt.ingest([src], work / f"{name}.zarr")
    t = col.names[0]
    stats = (float(vol.mean()), float(vol.std()))
    nvox = math.prod(shape)
    row: dict = {"shape": list(shape), "voxels": nvox}
    align = int(picker.contract["xy_alignment"])
    plan = plan_tiles(shape, picker.halo, (1, align, align), TILE_VOXELS)
    row["plan"] = {"tile": plan.tile, "counts": plan.counts, "halo_overhead": plan.halo_overhead}
    old_tile = (64, 512, 512)
    old_computed = math.prod(axis_cost(n, min(tt, n), h)[0] for n, tt, h in zip(shape, old_tile, picker.halo, strict=True))
    row["old_halo_overhead"] = 1 - nvox / old_computed
    results = {}
    # whole-volume single pass (MiLoPYP): stem/trunk activations of every slice at once
    est_gib = nvox * (picker.model.stem[0].out_channels / 4 + 2 * a.start_filts / 4) * 4 / 2**30
    if est_gib <= a.whole_max_gib:
        torch.set_num_threads(os.cpu_count() or 1)
        x = torch.from_numpy(preprocess_block(vol, mean=stats[0], std=stats[1], gauss=0.0, clip=(-3.0, 3.0),
                                              compress=False, compress_how="max"))[None]
        t0 = time.perf_counter()
        with torch.no_grad():
            whole = torch.sigmoid(picker.model(x)["hm"])[0].numpy()
        dt = time.perf_counter() - t0
        flops = model_flops(lambda: picker.model(x)) if a.flops else None
        results["whole"] = {"seconds": dt, "voxels_per_s": nvox / dt,
                            **({"gflop_per_s": flops / dt / 1e9, "fraction_of_fp32_peak": flops / dt / peak["fp32_flops"]}
                               if flops else {})}
        del x
    else:
        whole = None
        results["whole"] = {"skipped": f"needs ~{est_gib:.0f} GiB of activations (> --whole-max-gib {a.whole_max_gib})"}
    for label, pk, tile in (("tiled_new", picker, None), ("tiled_old", _SlabPicker(picker), old_tile)):
        if label == "tiled_old" and a.skip_old:
            continue
        with local_scheduler("threads"):
            t0 = time.perf_counter()
            hm = predict_heatmap(col, t, pk, stats=stats, tile=tile).compute()
            dt = time.perf_counter() - t0
        torch.set_num_threads(os.cpu_count() or 1)
        results[label] = {"seconds": dt, "voxels_per_s": nvox / dt}
        if whole is not None:
            results[label]["max_abs_diff_to_whole"] = float(np.abs(hm - whole).max())
        del hm
    base = results["whole"].get("voxels_per_s")
    for v in results.values():
        if base and "voxels_per_s" in v:
            v["ratio_to_whole"] = v["voxels_per_s"] / base
    if "tiled_old" in results:
        results["tiled_new"]["ratio_to_old_tiles"] = results["tiled_new"]["voxels_per_s"] / results["tiled_old"]["voxels_per_s"]
    row.update(results)
    log.info("%s: %s", name, json.dumps({k: v for k, v in results.items()}, default=float))
    shutil.rmtree(work / f"{name}.zarr", ignore_errors=True)
    src.unlink()
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["128,256,256", "256,1024,1024"])
    p.add_argument("--start-filts", type=int, default=16)
    p.add_argument("--whole-max-gib", type=float, default=6.0)
    p.add_argument("--skip-old", action="store_true", help="do not run the old tiling (slow at large sizes)")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    load0 = os.getloadavg()
    peak = cpu_peak()
    picker = make_picker(a.start_filts)
    work = Path(tempfile.mkdtemp(prefix="milotile-predict-"))
    t_all = time.perf_counter()
    try:
        rows = [run_size(tuple(int(v) for v in s.split(",")), picker, work, a, peak) for s in a.sizes]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = {"benchmark": "predict_scaling", "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
           "load_avg_at_start": load0, "load_avg_at_end": os.getloadavg(), "peak": peak,
           "picker": {"arch": "unet4", "start_filts": a.start_filts, "halo": list(picker.halo)},
           "sizes": rows, "total_run_s": time.perf_counter() - t_all}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "predict_scaling.json").write_text(json.dumps(out, indent=1, default=float))
    for r in rows:
        print(f"{'x'.join(map(str, r['shape']))}: plan {r['plan']['tile']} halo overhead "
              f"{100 * r['plan']['halo_overhead']:.1f} % (old tiles {100 * r['old_halo_overhead']:.1f} %)")
        for k in ("whole", "tiled_new", "tiled_old"):
            v = r.get(k)
            if v is None:
                continue
            if "skipped" in v:
                print(f"  {k:10s} skipped: {v['skipped']}")
            else:
                print(f"  {k:10s} {v['voxels_per_s'] / 1e6:7.3f} M voxels/s"
                      + (f"  x{v['ratio_to_whole']:.2f} of whole" if "ratio_to_whole" in v else "")
                      + (f"  x{v['ratio_to_old_tiles']:.2f} of old tiles" if "ratio_to_old_tiles" in v else "")
                      + (f"  {100 * v['fraction_of_fp32_peak']:.1f} % of fp32 peak" if "fraction_of_fp32_peak" in v else "")
                      + (f"  max|diff| {v['max_abs_diff_to_whole']:.1e}" if "max_abs_diff_to_whole" in v else ""))
    print(f"load average {load0} -> {out['load_avg_at_end']}; {RESULTS / 'predict_scaling.json'}")


if __name__ == "__main__":
    main()
