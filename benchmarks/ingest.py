"""Ingest benchmark: milotile (1 and 2 Dask workers) vs the naive way, on a >= 1 GB tomogram.

The naive way is ``mrcfile.read`` of the whole file followed by one ``zarr`` write of the array.
Each variant runs in its own process; peak RSS is the sum over that process and its children
(the Dask workers), sampled every 50 ms.

    python benchmarks/ingest.py                  # 256 x 1024 x 1024 float32 = 1 GiB
    python benchmarks/ingest.py --size 64,512,512 --quick
    python benchmarks/ingest.py --hash            # re-ingest check: whole-file hash of a 2 GiB file

``--hash`` times what a re-ingest costs per source file (issue 27): a plain read, the whole-file
SHA-1 that re-ingest compares by default (``milotile.store.mrc.fingerprint``), BLAKE2b for
comparison, and the sampled check (``quick_fingerprint``, ``ingest --quick-check``). The file is read
once before timing (page cache warm, as right after it was written or ingested; a cold read is
bounded by the disk instead). Results: ``benchmarks/results/ingest_hash.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_measured, write_results  # noqa: E402

NAIVE = """
import sys, mrcfile, zarr
src, dst = sys.argv[1], sys.argv[2]
data = mrcfile.read(src)
z = zarr.create_array(dst, shape=data.shape, chunks=(64, 256, 256), dtype=data.dtype, overwrite=True)
z[:] = data
"""

MILOTILE = """
import sys, time
import milotile as mt
src, dst, workers = sys.argv[1], sys.argv[2], int(sys.argv[3])
if __name__ == "__main__":
    with mt.cluster(workers=workers, threads_per_worker=1, dashboard_address=None) as client:
        if dst == "idle":  # the same process tree doing nothing: its fixed memory
            client.run(lambda: __import__("milotile.store.ingest"))
            time.sleep(2)
        else:
            mt.ingest(src, dst)
"""


def make_volume(path: Path, shape: tuple[int, int, int], seed: int = 0) -> None:
    """Write a float32 MRC slab by slab (the generator itself stays small in memory)."""
    rng = np.random.default_rng(seed)
    with mrcfile.new_mmap(path, shape=shape, mrc_mode=2, overwrite=True) as m:
        for z0 in range(0, shape[0], 16):
            z1 = min(shape[0], z0 + 16)
            m.data[z0:z1] = rng.normal(size=(z1 - z0, *shape[1:])).astype(np.float32)
        m.voxel_size = 10.0


def _stream(path: Path, update, block: int = 16 << 20) -> None:  # noqa: ANN001
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            update(chunk)


def hash_benchmark(work: Path, gib: float, repeats: int = 2) -> dict:
    """Seconds and MB/s of a read, SHA-1, BLAKE2b and the sampled check on a ``gib`` GiB file."""
    from milotile.store.mrc import fingerprint, quick_fingerprint

    src = work / "hash.bin"
    n = int(gib * (1 << 30))
    rng = np.random.default_rng(0)
    with open(src, "wb") as fh:
        for off in range(0, n, 64 << 20):
            fh.write(rng.integers(0, 255, size=min(64 << 20, n - off), dtype=np.uint8).tobytes())
    _stream(src, lambda b: None)  # warm the page cache once
    mb = n / 1e6
    cases = {
        "read_only": lambda: _stream(src, lambda b: None),
        "sha1_whole_file (default check)": lambda: fingerprint(src),
        "blake2b_whole_file": lambda: _stream(src, hashlib.blake2b().update),
        "sampled_quick_check (--quick-check)": lambda: quick_fingerprint(src),
    }
    out = {}
    for label, fn in cases.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        best = min(times)
        out[label] = {"seconds": best, "MB_per_s": mb / best, "loadavg": os.getloadavg()}
        print(f"{label:38s} {best:7.2f} s {mb / best:8.0f} MB/s   load {os.getloadavg()[0]:.1f}")
    src.unlink()
    return {"file_GiB": gib, "file_MB": mb, "results": out, "cpu_count": os.cpu_count(),
            "note": "best of the repeats, page cache warm; 'sampled' reads about 6 MiB whatever the size"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="256,1024,1024", help="Z,Y,X of the generated tomogram")
    ap.add_argument("--workdir", default=None, help="scratch folder (default: a temporary folder)")
    ap.add_argument("--quick", action="store_true", help="small volume, for a smoke run")
    ap.add_argument("--name", default="ingest", help="results file name (benchmarks/results/NAME.json)")
    ap.add_argument("--hash", action="store_true", help="only the re-ingest check: hash a --hash-gib file")
    ap.add_argument("--hash-gib", type=float, default=2.0, help="file size for --hash (GiB, default 2)")
    args = ap.parse_args()
    if args.hash:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="milotile-bench-"))
        work.mkdir(parents=True, exist_ok=True)
        print(f"write {write_results('ingest_hash', hash_benchmark(work, args.hash_gib))}")
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
        return
    shape = tuple(int(v) for v in ("64,512,512" if args.quick else args.size).split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="milotile-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "big.rec"
    make_volume(src, shape)
    nbytes = src.stat().st_size
    mb = nbytes / 1e6
    print(f"volume {shape} float32: {mb:.0f} MB")
    py = sys.executable
    results = {}
    for old in ("naive.zarr", "mt1.zarr", "mt2.zarr"):  # a reused --workdir must not hold earlier stores
        shutil.rmtree(work / old, ignore_errors=True)
    script = work / "mt_ingest.py"
    script.write_text(MILOTILE)
    idle = {}
    for workers in (1, 2):
        _, peak, _ = run_measured([py, str(script), str(src), "idle", str(workers)])
        idle[workers] = peak
    for label, cmd, workers in [
        ("naive_mrcfile_read_then_zarr", [py, "-c", NAIVE, str(src), str(work / "naive.zarr")], 0),
        ("milotile_1_worker", [py, str(script), str(src), str(work / "mt1.zarr"), "1"], 1),
        ("milotile_2_workers", [py, str(script), str(src), str(work / "mt2.zarr"), "2"], 2),
    ]:
        wall, peak, _ = run_measured(cmd)
        results[label] = {"seconds": wall, "MB_per_s": mb / wall, "peak_rss_MB": peak / 1e6,
                          "peak_rss_fraction_of_volume": peak / nbytes}
        line = (f"{label:30s} {wall:7.1f} s {mb / wall:7.1f} MB/s  peak RSS {peak / 1e6:6.0f} MB "
                f"({100 * peak / nbytes:5.1f} % of the volume)")
        if workers:
            base = idle[workers]
            results[label].update(idle_process_tree_MB=base / 1e6, working_set_MB=(peak - base) / 1e6,
                                  working_set_fraction_of_volume=(peak - base) / nbytes)
            line += f"; idle processes {base / 1e6:.0f} MB, working set {(peak - base) / 1e6:.0f} MB"
        print(line)
    # the milotile store holds all three pyramid levels; the naive store only level 0
    naive = results["naive_mrcfile_read_then_zarr"]
    for k in ("milotile_1_worker", "milotile_2_workers"):
        results[k]["speed_vs_naive"] = naive["seconds"] / results[k]["seconds"]
        results[k]["memory_vs_naive"] = results[k]["peak_rss_MB"] / naive["peak_rss_MB"]
    name = "ingest_quick" if args.quick else args.name
    path = write_results(name, {"shape_zyx": shape, "volume_MB": mb, "results": results,
                                "note": "milotile also writes the 2x and 4x pyramid levels, the per-chunk statistics "
                                        "and a SHA-1 fingerprint; the naive way only level 0. 'idle' is the same "
                                        "process tree (client, scheduler, nanny, workers) started without work."})
    print(f"wrote {path}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
