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

Then the named cases of issue 27, each followed by ``milotile info``:

* **lost worker mid-stage**: ``preprocess`` runs while a Dask worker is ``kill -9``'d (and replaced);
* **relative store, remote workers**: ``mine`` and ``patches`` with the store given as ``S.zarr``,
  relative to the client's folder, while the workers run in another folder;
* **two writers at once**: two ``preprocess`` commands started together on the same store;
* **edited .tlt re-ingested**: one angle of a ``.tlt`` changed, ``ingest`` again without ``--overwrite``;

each reported as case -> exit code(s), first line of stderr, and the nothing-lost check (the store,
after the later steps, equals the clean run; a refused command changed no file).

Prints a tally and the case table and writes ``benchmarks/results/fault_inject.json``::

    python benchmarks/fault_inject.py --rounds 12 --seed 0
    python benchmarks/fault_inject.py --rounds 0          # only the named cases
"""

from __future__ import annotations

import argparse
import hashlib
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
    g = zarr.open_group(store, mode="r", use_consolidated=False)
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
    g = zarr.open_group(got, mode="r", use_consolidated=False)  # never a stale consolidated copy
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


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:160] if lines else "(nothing on stderr)"


def _info(work: Path, address: str) -> dict:
    """``milotile info S.zarr``: exit code and whether it lists anything incomplete or stale."""
    r = run_step(["info", "S.zarr"], work, address)
    flags = sorted({f for f in ("incomplete", "stale") if f"({f})" in r.stdout})
    return {"info_exit": r.returncode, "info_flags": flags or ["all complete"]}


def _fresh(work: Path, k: int) -> None:
    """``S.zarr`` as it was before step ``k`` of the clean run (``len(STEPS)``: the finished clean store)."""
    shutil.rmtree(work / "S.zarr", ignore_errors=True)
    src = work / "clean.zarr" if k == len(STEPS) else work / f"before_{k}.zarr"
    shutil.copytree(src, work / "S.zarr")


def _finish_and_compare(work: Path, address: str, k: int) -> list[str]:
    """Run steps ``k..`` again (each must exit 0 without a traceback), then compare with the clean run."""
    failures = []
    for rname, rstep in STEPS[k:]:
        r = run_step(rstep, work, address)
        if r.returncode or "Traceback" in r.stderr:
            failures.append(f"rerun {rname} exited {r.returncode}: {_first_line(r.stderr)}")
    return failures + (compare(work / "clean.zarr", work / "S.zarr") if not failures else [])


def case_lost_worker(work: Path, cluster: Cluster, durations: dict, rng: random.Random) -> dict:
    _fresh(work, 1)
    name, step = STEPS[1]
    proc = subprocess.Popen([PY, "-m", "milotile.cli", "-q", "--scheduler", cluster.address, *step], cwd=work,
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(max(0.5, 0.4 * durations[name]))
    alive = proc.poll() is None
    cluster.kill_worker(rng)
    _, err = proc.communicate(timeout=900)
    cluster.wait(len(cluster.workers))
    problems = _finish_and_compare(work, cluster.address, 2)
    return {"case": f"lost Dask worker mid-{name}", "exit": str(proc.returncode), "first_line": _first_line(err),
            "nothing_lost": not problems, "problems": problems, "worker_killed_while_running": alive,
            **_info(work, cluster.address)}


def case_relative_store(work: Path, cluster: Cluster, durations: dict, rng: random.Random) -> dict:
    _fresh(work, 2)
    codes, first = [], "(nothing on stderr)"
    for _rname, rstep in STEPS[2:]:
        r = run_step(rstep, work, cluster.address)  # "S.zarr": relative to work/, the workers run in elsewhere/
        codes.append(str(r.returncode))
        if r.stderr.strip() and first == "(nothing on stderr)":
            first = _first_line(r.stderr)
    problems = compare(work / "clean.zarr", work / "S.zarr")
    return {"case": "relative store path, workers in another folder (mine, patches)", "exit": ",".join(codes),
            "first_line": first, "nothing_lost": not problems and set(codes) == {"0"}, "problems": problems,
            **_info(work, cluster.address)}


def case_two_writers(work: Path, cluster: Cluster, durations: dict, rng: random.Random) -> dict:
    _fresh(work, 1)
    name, step = STEPS[1]
    procs = [subprocess.Popen([PY, "-m", "milotile.cli", "-q", "--scheduler", cluster.address, *step], cwd=work,
                              env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[1] for p in procs]
    codes = [p.returncode for p in procs]
    refused = [o for c, o in zip(codes, outs, strict=True) if c]
    problems = _finish_and_compare(work, cluster.address, 2)
    ok = not problems and 0 in codes and all(c in (0, 2) for c in codes)
    return {"case": f"two {name} writers at once", "exit": ",".join(map(str, codes)),
            "first_line": _first_line(refused[0]) if refused else "both exited 0 (the later one reused the output)",
            "nothing_lost": ok, "problems": problems, **_info(work, cluster.address)}


def case_edited_tlt(work: Path, cluster: Cluster, durations: dict, rng: random.Random) -> dict:
    _fresh(work, len(STEPS))
    tlt = work / "data" / "tomo_000.tlt"
    original = tlt.read_text()
    angles = original.split()
    angles[0] = str(float(angles[0]) + 1.5)
    tlt.write_text("\n".join(angles) + "\n")
    before = _digest(work / "S.zarr")
    try:
        r = run_step(STEPS[0][1], work, cluster.address)
    finally:
        tlt.write_text(original)
    unchanged = _digest(work / "S.zarr") == before
    return {"case": "edited .tlt re-ingested (no --overwrite)", "exit": str(r.returncode),
            "first_line": _first_line(r.stderr), "nothing_lost": unchanged and r.returncode == 2,
            "problems": [] if unchanged else ["the refused ingest changed files of the store"],
            **_info(work, cluster.address)}


CASES = [case_edited_tlt, case_relative_store, case_lost_worker, case_two_writers]  # cheapest first


def print_table(cases: list[dict]) -> None:
    print("| case | exit code | first line of stderr | nothing lost | info after |")
    print("|---|---|---|---|---|")
    for c in cases:
        print(f"| {c['case']} | {c['exit']} | {c['first_line']} | {'yes' if c['nothing_lost'] else 'NO: ' + '; '.join(c['problems'])[:120]} "
              f"| exit {c['info_exit']}, {', '.join(c['info_flags'])} |")


def _terminate(signum: int, frame: object) -> None:
    raise SystemExit(f"stopped by signal {signum}")


def _result(args: argparse.Namespace, rounds: list[dict], durations: dict, t_start: float, load0: tuple,
            *, finished: bool, cases: list[dict] | None = None) -> dict:
    """The JSON record: tally (rounds, kills, mismatches), per-round detail, timing and load."""
    return {
        "benchmark": "fault_inject", "finished": finished, "pipeline": [s for s, _ in STEPS], "size_zyx": args.size,
        "tomograms": 2, "seed": args.seed, "workers": 2, "clean_step_seconds": durations,
        "rounds": len(rounds), "main_kills": sum(r["main_killed"] for r in rounds),
        "worker_kills": sum(r["worker_killed"] for r in rounds),
        "mismatches": sum(bool(r["problems"]) for r in rounds), "rounds_detail": rounds,
        "cases": cases or [], "case_failures": sum(not c["nothing_lost"] for c in cases or []),
        "wall_s": round(time.perf_counter() - t_start, 1), "loadavg_start": load0, "loadavg_end": os.getloadavg(),
    }


def _write(out: str, result: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=2))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker-kill-fraction", type=float, default=0.4, help="rounds that also kill a worker")
    ap.add_argument("--size", default="48,128,128")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "fault_inject.json"))
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, _terminate)  # `timeout` or Ctrl-C: still stop the cluster and keep the JSON
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="milotile-fault-"))
    shutil.rmtree(work, ignore_errors=True)
    (work / "elsewhere").mkdir(parents=True)
    t_start = time.perf_counter()
    load0 = os.getloadavg()
    subprocess.run([PY, "-m", "milotile.cli", "-q", "synth", str(work / "data"), "--n-tomograms", "2", "--size",
                    args.size, "--seed", str(args.seed)], env=ENV, check=True, capture_output=True)
    cluster = Cluster(work / "elsewhere")
    rounds, durations, cases = [], {}, []
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
            _write(args.out, _result(args, rounds, durations, t_start, load0, finished=False))
            print(f"round {rnd:2d}: {name:10s} kill at {delay:5.1f}s main={'killed' if main_killed else 'done  '} "
                  f"worker={'killed' if worker_killed else '-'} -> {'OK' if not problems else problems}", flush=True)
        for fn in CASES:
            t0 = time.perf_counter()
            rec = fn(work, cluster, durations, rng)
            rec["seconds"] = round(time.perf_counter() - t0, 1)
            cases.append(rec)
            print(f"case {rec['case']}: exit {rec['exit']}, nothing lost: {rec['nothing_lost']}", flush=True)
            _write(args.out, _result(args, rounds, durations, t_start, load0, finished=False, cases=cases))
    finally:
        cluster.close()
    result = _result(args, rounds, durations, t_start, load0, finished=True, cases=cases)
    print("tally:", {k: result[k] for k in ("rounds", "main_kills", "worker_kills", "mismatches", "case_failures")})
    if rounds:
        cases_all = [{"case": f"kill -9 at a random moment ({len(rounds)} rounds, {result['worker_kills']} with a "
                      "worker killed too), then rerun", "exit": "137 then 0", "first_line": "-",
                      "nothing_lost": not result["mismatches"], "problems": [f"{result['mismatches']} mismatches"],
                      "info_exit": "-", "info_flags": ["-"]}, *cases]
    else:
        cases_all = cases
    print_table(cases_all)
    _write(args.out, result)
    shutil.rmtree(work, ignore_errors=True)
    return 1 if result["mismatches"] or result["case_failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
