"""Fault injection: kill the pipeline (and Dask workers) at random moments, rerun, compare with a clean run.

The pipeline ``synth -> ingest -> preprocess -> mine -> patches`` runs through the ``milotile`` CLI
against a ``dask scheduler`` with two ``dask worker`` processes started in another folder (so the
store path given on the command line is relative to the client only). A clean run records the store
after every step. Each round then:

1. copies the store as it was before a randomly chosen step,
2. starts that step and ``kill -9``'s the command at a random moment within its clean duration
   (in some rounds one Dask worker is killed too, then restarted),
3. reruns the step and every later one, and
4. compares every array (tomogram pyramids, tilt series, preprocessed volumes and tilts, patch bank)
   and every table with the clean run, and checks that all outputs are complete, no temporary array
   is left behind and no writer lock remains.

Prints a tally and writes ``benchmarks/results/fault_inject.json``::

    python benchmarks/fault_inject.py --rounds 12 --seed 0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import zarr

warnings.filterwarnings("ignore", message="Object at .* is not recognized")  # tables/, .locks/ beside zarr nodes
PY = sys.executable
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "MILOTILE_PROGRESS": "0", "PYTHONPATH": str(ROOT / "src")}
STEPS = [
    ("ingest", ["ingest", "data/tomograms.txt", "--store", "S.zarr"]),
    ("preprocess", ["preprocess", "S.zarr", "--gauss", "1"]),
    ("mine", ["mine", "S.zarr", "--border", "8", "--border-z", "4"]),
    ("patches", ["patches", "S.zarr", "--bbox", "16"]),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A dask scheduler and worker processes started in their own folder."""

    def __init__(self, folder: Path, n_workers: int = 2) -> None:
        self.folder = folder
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.scheduler = self._spawn(["distributed.cli.dask_scheduler", "--port", str(self.port), "--no-dashboard"])
        time.sleep(2)
        self.workers = [self._worker() for _ in range(n_workers)]
        self.wait(n_workers)

    def _spawn(self, args: list[str]) -> subprocess.Popen:
        return subprocess.Popen([PY, "-m", *args], cwd=self.folder, env=ENV,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def _worker(self) -> subprocess.Popen:
        return self._spawn(["distributed.cli.dask_worker", self.address, "--nthreads", "1", "--no-dashboard",
                            "--no-nanny"])

    def wait(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=60) as c:
            c.wait_for_workers(n, timeout=120)

    def kill_worker(self, rng: random.Random) -> None:
        i = rng.randrange(len(self.workers))
        self.workers[i].send_signal(signal.SIGKILL)
        self.workers[i].wait()
        self.workers[i] = self._worker()

    def close(self) -> None:
        for p in [*self.workers, self.scheduler]:
            p.terminate()
        for p in [*self.workers, self.scheduler]:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def run_step(args: list[str], cwd: Path, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "milotile.cli", "-q", "--scheduler", address, *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=900)


def arrays(store: Path) -> dict[str, zarr.Array]:
    g = zarr.open_group(store, mode="r")
    return {k: v for k, v in g.members(max_depth=None) if isinstance(v, zarr.Array)}


def compare(clean: Path, got: Path) -> list[str]:
    """Differences between two stores (arrays, tables, completeness, leftovers, locks)."""
    problems: list[str] = []
    a, b = arrays(clean), arrays(got)
    for key in sorted(set(a) | set(b)):
        if key not in b:
            problems.append(f"missing array {key}")
        elif key not in a:
            problems.append(f"extra array {key}")
        elif a[key].shape != b[key].shape or not np.array_equal(a[key][...], b[key][...], equal_nan=True):
            problems.append(f"array {key} differs")
    for t in sorted({p.name for p in (clean / "tables").glob("*.parquet")} | {p.name for p in (got / "tables").glob("*.parquet")}):
        pa, pb = clean / "tables" / t, got / "tables" / t
        if not pb.exists() or not pa.exists():
            problems.append(f"table {t} only in one store")
        elif not pd.read_parquet(pa).equals(pd.read_parquet(pb)):
            problems.append(f"table {t} differs")
    g = zarr.open_group(got, mode="r")
    for key, node in g.members(max_depth=None):
        meta = dict(node.attrs.get("milotile", {}))
        if meta.get("complete") is False:
            problems.append(f"{key} is incomplete")
    locks = list((got / ".locks").glob("*.lock")) if (got / ".locks").exists() else []
    if locks:
        problems.append(f"writer locks left: {[p.name for p in locks]}")
    if any(p.name.endswith(".tmp") for p in (got / "tables").glob("*")):
        problems.append("temporary table files left")
    return problems


def _self_check(work: Path) -> None:
    """The comparison must see a one-voxel change and an incomplete flag (else the tally means nothing)."""
    probe = work / "probe.zarr"
    shutil.copytree(work / "clean.zarr", probe)
    arr = zarr.open_array(probe / "derived" / "preprocessed" / "tomo_000" / "0", mode="r+")
    arr[0, 0, 0] = arr[0, 0, 0] + 1
    g = zarr.open_group(probe / "derived" / "preprocessed" / "tomo_001", mode="r+")
    g.attrs["milotile"] = {**dict(g.attrs["milotile"]), "complete": False}
    found = compare(work / "clean.zarr", probe)
    assert any("differs" in p for p in found) and any("incomplete" in p for p in found), found
    shutil.rmtree(probe)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker-kill-fraction", type=float, default=0.4, help="rounds that also kill a worker")
    ap.add_argument("--size", default="48,128,128")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_inject.json"))
    args = ap.parse_args()
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="milotile-fault-"))
    shutil.rmtree(work, ignore_errors=True)
    (work / "elsewhere").mkdir(parents=True)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    subprocess.run([PY, "-m", "milotile.cli", "-q", "synth", str(work / "data"), "--n-tomograms", "2", "--size",
                    args.size, "--seed", str(args.seed)], env=ENV, check=True, capture_output=True)
    cluster = Cluster(work / "elsewhere")
    rounds, durations = [], {}
    try:
        # clean run, with a snapshot of the store before every step
        for i, (name, step) in enumerate(STEPS):
            if (work / "S.zarr").exists():
                shutil.copytree(work / "S.zarr", work / f"before_{i}.zarr")
            t0 = time.perf_counter()
            r = run_step(step, work, cluster.address)
            durations[name] = time.perf_counter() - t0
            if r.returncode:
                raise SystemExit(f"clean {name} failed:\n{r.stderr[-3000:]}")
        shutil.move(work / "S.zarr", work / "clean.zarr")
        print("clean run:", {k: round(v, 1) for k, v in durations.items()}, flush=True)
        _self_check(work)

        for rnd in range(args.rounds):
            k = rng.randrange(len(STEPS))
            name, step = STEPS[k]
            shutil.rmtree(work / "S.zarr", ignore_errors=True)
            if k:
                shutil.copytree(work / f"before_{k}.zarr", work / "S.zarr")
            delay = rng.uniform(0.3, durations[name])
            kill_worker = rng.random() < args.worker_kill_fraction
            worker_at = rng.uniform(0.0, delay) if kill_worker else None
            proc = subprocess.Popen([PY, "-m", "milotile.cli", "-q", "--scheduler", cluster.address, *step], cwd=work,
                                    env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            t0 = time.perf_counter()
            worker_killed = False
            while time.perf_counter() - t0 < delay and proc.poll() is None:
                if worker_at is not None and not worker_killed and time.perf_counter() - t0 >= worker_at:
                    cluster.kill_worker(rng)
                    worker_killed = True
                time.sleep(0.05)
            main_killed = proc.poll() is None
            if main_killed:
                proc.send_signal(signal.SIGKILL)
            proc.wait()
            if worker_killed:
                cluster.wait(len(cluster.workers))
            failures = []
            for rname, rstep in STEPS[k:]:
                r = run_step(rstep, work, cluster.address)
                if r.returncode:
                    failures.append(f"rerun {rname} exited {r.returncode}: {r.stderr.strip().splitlines()[-1:]}")
                elif "Traceback" in r.stderr:
                    failures.append(f"rerun {rname} printed a traceback")
            problems = failures + (compare(work / "clean.zarr", work / "S.zarr") if not failures else [])
            rec = {"round": rnd, "step": name, "delay_s": round(delay, 2), "main_killed": main_killed,
                   "worker_killed": worker_killed, "problems": problems}
            rounds.append(rec)
            print(f"round {rnd:2d}: {name:10s} kill at {delay:5.1f}s main={'killed' if main_killed else 'done  '} "
                  f"worker={'killed' if worker_killed else '-'} -> {'OK' if not problems else problems}", flush=True)
    finally:
        cluster.close()
    tally = {
        "rounds": len(rounds),
        "main_kills": sum(r["main_killed"] for r in rounds),
        "worker_kills": sum(r["worker_killed"] for r in rounds),
        "mismatches": sum(bool(r["problems"]) for r in rounds),
    }
    print("tally:", tally)
    result = {
        "benchmark": "fault_inject", "pipeline": [s for s, _ in STEPS], "size_zyx": args.size, "tomograms": 2,
        "seed": args.seed, "workers": 2, "clean_step_seconds": durations, **tally, "rounds_detail": rounds,
        "wall_s": round(time.perf_counter() - t_start, 1), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 1 if tally["mismatches"] else 0


if __name__ == "__main__":
    sys.exit(main())
