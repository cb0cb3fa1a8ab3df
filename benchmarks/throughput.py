"""Throughput against the hardware limit (issue 12, items 1 and 2): FLOP/s and fraction of peak of every
model step, the speed options side by side, training memory at the CLI defaults, and the I/O-bound
stages against a plain sequential read of the same store.

(a) peak: the machine's fp32 and bf16 peak FLOP/s (``_peak.cpu_peak`` / ``gpu_peak``, assumptions printed).
(b) model steps, each in the same run and process, FLOPs counted by ``torch.utils.flop_counter``:
    * explore train step (SimSiam, two views, fwd+bwd+SGD): MiLoPYP's widths (64,128,256) in fp32
      (the old CLI default, naive) vs the CPU default widths (32,64,128), both at the automatic batch size,
      each in fp32 / bf16 autocast / channels-last (+ ``torch.compile`` with ``--compile``);
    * explore embed (no_grad vs inference_mode, fp32 vs bf16);
    * refine: U-Net picker training step and prediction on one slab, fp32 vs bf16.
    Reported: samples/s, achieved FLOP/s, fraction of the fp32 peak (and of the bf16 peak for bf16).
(c) memory: peak RSS of the whole ``milotile explore train`` command (1 epoch) at the new defaults vs
    the old ones (``--widths 64,128,256 --batch-size 256``) on a generated bank of 36-px patches.
(d) I/O: ``preprocess`` and ``mine`` on a generated tomogram, input bytes/s vs a sequential read of
    the same store's level-0 chunk files (both with a warm page cache).

    python benchmarks/throughput.py            # ~6 min on 2 idle cores (estimate)
    python benchmarks/throughput.py --quick    # tiny sizes: checks the script
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import exit_on_sigterm, machine, result_path, run_measured, threads  # noqa: E402
from _peak import cpu_peak, gpu_peak, model_flops  # noqa: E402

log = logging.getLogger("bench.throughput")
SRC = Path(__file__).resolve().parents[1] / "src"


def _time(fn, min_s: float, min_steps: int = 1, warm: bool = True) -> float:
    """Seconds per call of ``fn``: one warm-up call (allocations, oneDNN primitive cache; skipped with
    ``warm=False`` when the caller made one), then calls until ``min_s`` seconds and ``min_steps`` calls."""
    if warm:
        fn()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < min_s:
        fn()
        n += 1
    return (time.perf_counter() - t0) / n


def _flops_per_sample(make_step, probe: int = 2) -> float:
    """Model FLOPs per sample, counted on a ``probe``-sample batch (convolutions and matmuls grow linearly
    with the batch, so counting a small batch avoids one more slow step at the timed batch)."""
    return model_flops(make_step(probe)) / probe


def _row(name: str, samples: int, flops: int, dt: float, peak: dict, dtype: str, **extra) -> dict:
    fps = flops / dt
    row = {"name": name, "samples_per_s": samples / dt, "flops_per_sample": flops / samples,
           "gflop_per_s": fps / 1e9, "fraction_of_fp32_peak": fps / peak["fp32_flops"], "dtype": dtype, **extra}
    if dtype == "bf16":
        row["fraction_of_bf16_peak"] = fps / peak["bf16_flops"]
    log.info("%-52s %8.1f samples/s %7.1f GFLOP/s  %5.1f %% of fp32 peak%s", name, row["samples_per_s"],
             row["gflop_per_s"], 100 * row["fraction_of_fp32_peak"],
             f" ({100 * row['fraction_of_bf16_peak']:.1f} % of bf16 peak)" if dtype == "bf16" else "")
    return row


def _ctx(dev: torch.device, bf16: bool):
    return torch.autocast(dev.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


# ----------------------------------------------------------------------------------- explore
def explore_train_rows(a, dev, peak) -> list[dict]:
    from milotile.explore.model import SimSiam, simsiam_loss

    sb = a.train_batch
    narrow = (32, 64, 128)
    # (name, widths, batch, bf16, channels-last, compile); the naive row is MiLoPYP's trunk (the old default)
    variants = [(f"naive: widths 64,128,256 batch {sb} fp32", (64, 128, 256), sb, False, False, False),
                (f"widths 32,64,128 batch {a.auto_batch} (CLI auto batch) fp32", narrow, a.auto_batch, False, False, False),
                (f"widths 32,64,128 batch {sb} fp32", narrow, sb, False, False, False),
                (f"widths 32,64,128 batch {sb} fp32 channels-last", narrow, sb, False, True, False),
                (f"widths 32,64,128 batch {sb} bf16", narrow, sb, True, False, False),
                (f"widths 32,64,128 batch {sb} bf16 channels-last", narrow, sb, True, True, False)]
    if a.compile:
        variants.append((f"widths 32,64,128 batch {sb} bf16 torch.compile", narrow, sb, True, False, True))
    rows = []
    for name, widths, bs, bf16, cl, comp in variants:
        torch.manual_seed(0)
        m = SimSiam("3d", widths=widths).to(dev)
        if cl:
            m = m.to(memory_format=torch.channels_last)
        net = torch.compile(m) if comp else m
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)

        def make_step(n, net=net, opt=opt, bf16=bf16, cl=cl):
            x1, x2 = (torch.randn(n, 1, a.bbox, a.bbox, device=dev) for _ in range(2))
            if cl:
                x1, x2 = (x.contiguous(memory_format=torch.channels_last) for x in (x1, x2))

            def step():
                with _ctx(dev, bf16):
                    p1, p2, z1, z2 = net(x1, x2)
                    loss = simsiam_loss(p1, p2, z1, z2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return step

        fps = _flops_per_sample(make_step)
        timed = make_step(bs)
        t0 = time.perf_counter()
        timed()  # the warm-up call (torch.compile compiles here)
        first = time.perf_counter() - t0
        rows.append(_row("explore train: " + name, bs, int(fps * bs), _time(timed, a.min_seconds, warm=False), peak,
                         "bf16" if bf16 else "fp32", first_step_s=first, batch=bs))
    return rows


def explore_embed_rows(a, dev, peak) -> list[dict]:
    from milotile.explore.model import SimSiam

    torch.manual_seed(0)
    m = SimSiam("3d", widths=(32, 64, 128)).to(dev).eval()
    x = torch.randn(a.embed_batch, 1, a.bbox, a.bbox, device=dev)
    flops = model_flops(lambda: m.features(x, "pred"))
    rows = []
    for name, grad_ctx, bf16 in (("no_grad fp32 (naive, default)", torch.no_grad, False),
                                 ("inference_mode fp32", torch.inference_mode, False),
                                 ("no_grad bf16 ", torch.no_grad, True),
                                 ("inference_mode bf16", torch.inference_mode, True)):
        def call(grad_ctx=grad_ctx, bf16=bf16):
            with grad_ctx(), _ctx(dev, bf16):
                m.features(x, "pred")

        rows.append(_row("explore embed: " + name, x.shape[0], flops, _time(call, a.min_seconds), peak,
                         "bf16" if bf16 else "fp32", batch=x.shape[0]))
    return rows


def refine_rows(a, dev, peak) -> list[dict]:
    from milotile.refine.model import unet4
    from milotile.refine.train import DEFAULT_UNET

    rows = []
    rb, (cz, cy, cx) = a.refine_batch, (12, 64, 64)  # crops of the CLI default 12 x 64 x 64
    for bf16, cl in ((False, False), (False, True), (True, False)):
        torch.manual_seed(0)
        m = unet4(**DEFAULT_UNET, z_dilation=2).to(dev)  # the default network for a 10-voxel box
        if cl:  # the 2D stem and trunk only (the 3D head's weights are rank 5)
            for mod in m.modules():
                if isinstance(mod, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
                    mod.to(memory_format=torch.channels_last)
        opt = torch.optim.Adam(m.parameters(), lr=1e-3)
        tag = ("bf16" if bf16 else "fp32") + (" channels-last" if cl else "")

        def make_step(n, m=m, opt=opt, bf16=bf16, cl=cl):
            xb = torch.randn(n, cz, cy, cx, device=dev)

            def tstep():  # heatmap BCE stand-in loss: the same forward and backward work
                with _ctx(dev, bf16):
                    loss = m(xb)["hm"].float().sigmoid().mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            return tstep

        fps = _flops_per_sample(make_step, probe=1)
        rows.append(_row(f"refine train step {rb}x{cz}x{cy}x{cx} {tag}", rb * cz * cy * cx, int(fps * rb),
                         _time(make_step(rb), a.min_seconds), peak, "bf16" if bf16 else "fp32", unit="input voxels",
                         start_filts=DEFAULT_UNET["start_filts"], batch=rb))
        m.eval()
        xs = torch.randn(1, 16, a.slab_xy, a.slab_xy, device=dev)
        flops = model_flops(lambda m=m, xs=xs: m(xs))

        def pstep(m=m, xs=xs, bf16=bf16):
            with torch.no_grad(), _ctx(dev, bf16):
                m(xs)

        rows.append(_row(f"refine predict 16x{a.slab_xy}x{a.slab_xy} {tag}", 16 * a.slab_xy**2, flops,
                         _time(pstep, a.min_seconds), peak, "bf16" if bf16 else "fp32", unit="input voxels",
                         start_filts=DEFAULT_UNET["start_filts"]))
    return rows


# ----------------------------------------------------------------------------------- memory
def write_bank(path: Path, n: int, b: int) -> None:
    from milotile.store import open_collection

    rng = np.random.default_rng(0)
    col = open_collection(path, mode="a")
    g = col.zarr_group.require_group("patches").require_group("bank")
    arr = g.create_array("data", shape=(n, 1, 1, b, b), chunks=(256, 1, 1, b, b), dtype="float32", overwrite=True)
    arr[:] = rng.random((n, 1, 1, b, b), dtype=np.float32)
    g.attrs["milotile"] = {"complete": True, "params": {"bbox": b, "shifts": [], "modes": ["slab"], "gauss": 0.8}}
    import pandas as pd

    x = rng.uniform(10, 50, n)
    col.write_table("patches-bank", pd.DataFrame({"tomogram": "t0", "x": x, "y": x, "z": x, "x_A": x, "y_A": x,
                                                  "z_A": x, "score": 1.0, "patch_index": np.arange(n)}))


def memory_rows(a, work: Path) -> list[dict]:
    store = work / "bank.zarr"
    write_bank(store, a.bank_n, 36)
    env = {"PYTHONPATH": str(SRC), "MILOTILE_PROGRESS": "0"}
    rows = []
    for name, extra in (("old defaults: --widths 64,128,256 --batch-size 256", ["--widths", "64,128,256",
                                                                               "--batch-size", "256"]),
                        ("new CPU defaults", [])):
        out = work / ("run-" + ("old" if extra else "new"))
        shutil.rmtree(out, ignore_errors=True)
        cmd = [sys.executable, "-m", "milotile.cli", "explore", "train", str(store), "--epochs", "1",
               "--device", "cpu", "--out", str(out), *extra]
        wall, rss, _ = run_measured(cmd, env=env)
        rec = json.loads((out / "log.jsonl").read_text().splitlines()[-1])
        opts = json.loads((out / "options.json").read_text())
        rows.append({"name": name, "wall_s": wall, "peak_rss_mib": rss / 2**20, "patches_per_s": rec["patches_per_s"],
                     "batch_size": opts["batch_size"], "widths": opts["config"].get("widths")})
        log.info("explore train CLI, %s: %.1f s, peak RSS %.0f MiB, %.1f patches/s (batch %s)", name, wall,
                 rss / 2**20, rec["patches_per_s"], opts["batch_size"])
    return rows


# ----------------------------------------------------------------------------------- I/O
def io_rows(a, work: Path) -> list[dict]:
    from _peak import sequential_read

    import milotile as mt
    from milotile.cluster import local_scheduler
    from milotile.stages.mine import mine
    from milotile.stages.preprocess import preprocess
    from milotile.synth import synth

    size = tuple(int(s) for s in a.io_size.split(","))
    res = synth(work / "syn", seed=0, n_tomograms=1, size=size, snr=0.1, angles=(-60, 60, 12), n_particles=20,
                filament=False)
    col = mt.ingest(res.manifest, work / "io.zarr")
    name = col.names[0]
    level0 = Path(col.path) / "tomograms" / name / "0"
    seq = sequential_read(level0)
    seq = sequential_read(level0)  # warm, as the stages below
    raw_bytes = 4 * int(np.prod(col[name].shape))
    rows = []
    with local_scheduler("threads"):
        t0 = time.perf_counter()
        preprocess(col, gauss=0.8, names=[name])  # the tomogram and its tilt series, as the CLI does
        t_pre = time.perf_counter() - t0
        t0 = time.perf_counter()
        mine(col, dog=(3, 5), names=[name], border=8, border_z=4)
        t_mine = time.perf_counter() - t0
    for stage, dt in (("preprocess", t_pre), ("mine", t_mine)):
        bps = seq["bytes"] / dt
        rows.append({"stage": stage, "seconds": dt, "store_bytes_per_s": bps, "voxel_bytes_per_s": raw_bytes / dt,
                     "sequential_read_bytes_per_s": seq["bytes_per_s"],
                     "fraction_of_sequential_read": bps / seq["bytes_per_s"]})
        log.info("%s: %.2f s, %.1f MiB/s of store bytes = %.3f of a sequential read (%.0f MiB/s)", stage, dt,
                 bps / 2**20, bps / seq["bytes_per_s"], seq["bytes_per_s"] / 2**20)
    return rows


def _save(out: dict, path: Path) -> None:
    """Write the JSON (after every part, so a run stopped by a time budget keeps what it measured)."""
    out["load_avg_at_end"] = os.getloadavg()
    path.write_text(json.dumps(out, indent=1, default=str))


def _print_table(out: dict, peak: dict, path: Path) -> None:
    print(f"\nfraction of peak (fp32 peak {peak['fp32_flops'] / 1e9:.0f} GFLOP/s, bf16 peak "
          f"{peak['bf16_flops'] / 1e9:.0f} GFLOP/s; {peak['assumptions']}; torch threads {out['torch_threads']}):")
    for part in ("explore_train", "explore_embed", "refine"):
        for r in out.get(part, []):
            print(f"  {r['name']:66s} {r['samples_per_s']:10.1f}/s {r['gflop_per_s']:7.1f} GFLOP/s "
                  f"{100 * r['fraction_of_fp32_peak']:5.1f} % fp32"
                  + (f" {100 * r['fraction_of_bf16_peak']:5.2f} % bf16" if "fraction_of_bf16_peak" in r else ""))
    for r in out.get("memory", []):
        print(f"  explore train CLI {r['name']:48s} peak RSS {r['peak_rss_mib']:6.0f} MiB "
              f"{r['patches_per_s']:6.1f} patches/s batch {r['batch_size']} widths {r['widths']}")
    for r in out.get("io", []):
        print(f"  {r['stage']:10s} {r['store_bytes_per_s'] / 2**20:7.1f} MiB/s = "
              f"{r['fraction_of_sequential_read']:.3f} of sequential read "
              f"({r['sequential_read_bytes_per_s'] / 2**20:.0f} MiB/s)")
    print(f"load average {out['load_avg_at_start']} -> {out['load_avg_at_end']}; {out['total_run_s']:.0f} s; {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny batches and sizes: checks the script in about a minute")
    p.add_argument("--min-seconds", type=float, default=3.0,
                   help="time each row for at least this long after one warm-up call (default 3)")
    p.add_argument("--bbox", type=int, default=36, help="explore patch side (default 36, the CLI default)")
    p.add_argument("--auto-batch", type=int, default=None, help="batch of the CPU default (default: computed)")
    p.add_argument("--train-batch", type=int, default=128,
                   help="batch of the timed explore train steps (default 128: per-op latency dominates at 16-32)")
    p.add_argument("--refine-batch", type=int, default=16, help="crops per refine train step (default 16)")
    p.add_argument("--slab-xy", type=int, default=256, help="refine predict slab 16 x N x N (default 256)")
    p.add_argument("--embed-batch", type=int, default=256)
    p.add_argument("--bank-n", type=int, default=256, help="patches of the CLI memory runs (one old-default batch)")
    p.add_argument("--io-size", default="128,256,256")
    p.add_argument("--compile", action="store_true", help="also time torch.compile (slow to compile)")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: train,embed,refine,memory,io")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    exit_on_sigterm()
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if a.quick:
        a.min_seconds, a.train_batch, a.refine_batch, a.slab_xy, a.embed_batch = 0.0, 8, 2, 64, 16
        a.bank_n, a.io_size, a.bbox = 64, "32,96,96", 24
    dev = torch.device(a.device)
    peak = gpu_peak() if dev.type == "cuda" else cpu_peak()
    peak = peak or cpu_peak()
    log.info("peak: %.1f GFLOP/s fp32, %.1f GFLOP/s bf16 (%s)", peak["fp32_flops"] / 1e9, peak["bf16_flops"] / 1e9,
             peak["assumptions"])
    if a.auto_batch is None:
        from milotile.explore.recipe import ExploreRecipe
        from milotile.explore.train import _auto_batch
        from milotile.nn.device import amp_dtype

        class _Bank:
            mode = "3d"

        amp = amp_dtype(dev, cpu=True) is not None  # as explore.train decides
        cfg = ExploreRecipe().network_config("cpu")  # the CPU recipe's network
        a.auto_batch = _auto_batch("simsiam-3d", cfg, _Bank(), a.bbox, dev, amp)
    skip = set(a.skip.split(","))
    load0 = os.getloadavg()
    t_all = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="milotile-throughput-"))
    path = result_path("throughput" if dev.type == "cpu" else "throughput_gpu")
    out = {"benchmark": "throughput", "command": " ".join([sys.executable, *sys.argv]), "machine": machine(),
           "load_avg_at_start": load0, "device": str(dev), "torch_threads": torch.get_num_threads(),
           "threads": threads(), "peak": peak, "auto_batch": a.auto_batch,
           "settings": {k: v for k, v in vars(a).items()}}
    parts = (("explore_train", "train", explore_train_rows, (a, dev, peak)),
             ("explore_embed", "embed", explore_embed_rows, (a, dev, peak)),
             ("refine", "refine", refine_rows, (a, dev, peak)),
             ("memory", "memory", memory_rows, (a, work)), ("io", "io", io_rows, (a, work)))
    try:
        for key, part, fn, args in parts:
            if part in skip:
                continue
            out[key] = fn(*args)
            out["total_run_s"] = time.perf_counter() - t_all
            _save(out, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out["total_run_s"] = time.perf_counter() - t_all
    _save(out, path)
    _print_table(out, peak, path)


if __name__ == "__main__":
    main()
