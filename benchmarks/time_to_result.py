"""Benchmark: time to result of ``milotile demo`` -- wall and CPU time per stage, start-up, load average (issue 26).

What a new user waits for: ``milotile demo`` run as the whole CLI command (a fresh process, start-up
included), its stage times read back from ``demo_report.json``, the process tree's CPU time
(user + sys of the children, from ``resource.getrusage``) and the 1-minute load average before and
after, plus the start-up of ``milotile --help`` and ``milotile demo --help`` (best of three).

The machine may be shared: the CPU time is the figure other work disturbs least, and
``quiet_estimate_s = cpu_s / cores`` is a lower bound of the wall time on quiet cores (stretches that
use one core only, and start-up, take longer than that; spin-waiting threads under contention inflate
``cpu_s``).

``--compare DIR`` also runs the demo of another checkout (``DIR/.venv/bin/milotile``, e.g. the main
branch with the previous defaults) in the same run, one after the other, so both figures share the
machine's state; ``--order`` decides which runs first.

Example::

    nice -n 10 .venv/bin/python benchmarks/time_to_result.py --compare /work/main
    nice -n 10 .venv/bin/python benchmarks/time_to_result.py --demo-args "--no-hard"

Writes ``benchmarks/results/time_to_result.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import write_results  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], log: Path | None = None, env: dict | None = None) -> dict:
    """Run ``cmd`` to completion; wall, CPU (user + sys of the process tree) and load average before/after."""
    load0 = os.getloadavg()[0]
    cpu0 = _children_cpu()
    t0 = time.perf_counter()
    with open(log or os.devnull, "w") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:] if log else ""
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{tail}")
    return {"wall_s": round(wall, 2), "cpu_s": round(_children_cpu() - cpu0, 2), "load_avg_1m_before": round(load0, 2),
            "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def startup(milotile: str, args: list[str], repeat: int = 3) -> dict:
    """Best-of-``repeat`` wall (and its CPU) of ``milotile ARGS`` (a help text: start-up only)."""
    runs = [timed([milotile, *args]) for _ in range(repeat)]
    best = min(runs, key=lambda r: r["wall_s"])
    return {**best, "runs_wall_s": [r["wall_s"] for r in runs]}


def demo(milotile: str, out: Path, demo_args: list[str], cores: int) -> dict:
    """One ``milotile demo`` run: totals, per-stage seconds and the demo's own facts (F1, picks...)."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    res = timed([milotile, "demo", "--out", str(out), *demo_args], log=out.parent / f"{out.name}.log")
    report = json.loads((out / "demo_report.json").read_text())
    stage_rows = {k: v for k, v in report.items() if isinstance(v, dict) and "seconds" in v}
    stages = {k: v["seconds"] for k, v in stage_rows.items()}
    facts = {k: {f: v[f] for f in ("f1_all", "f1_manual", "labels", "epochs", "picks", "mean_recall", "accuracy")
                 if f in v} for k, v in stage_rows.items()}
    if any("cpu_seconds" in v for v in stage_rows.values()):  # the demo's own per-stage CPU seconds
        res["stages_cpu_s"] = {k: v.get("cpu_seconds") for k, v in stage_rows.items()}
    if "total" in report:
        res["demo_total"] = report["total"]
    res.update(quiet_estimate_s=round(res["cpu_s"] / max(cores, 1), 1), stages_s=stages,
               stage_sum_s=round(sum(stages.values()), 1), facts={k: v for k, v in facts.items() if v},
               command=" ".join(shlex.quote(a) for a in [milotile, "demo", "--out", str(out), *demo_args]))
    return res


def measure(label: str, checkout: Path, work: Path, demo_args: list[str], cores: int, skip_demo: bool) -> dict:
    milotile = str(checkout / ".venv" / "bin" / "milotile")
    if not Path(milotile).exists():
        raise SystemExit(f"{milotile} does not exist; run scripts/setup_env.sh in {checkout} first.")
    rev = subprocess.run(["git", "-C", str(checkout), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    out: dict = {"checkout": str(checkout), "commit": rev.stdout.strip(),
                 "startup": {"milotile --help": startup(milotile, ["--help"]),
                             "milotile demo --help": startup(milotile, ["demo", "--help"])}}
    print(label, "start-up", json.dumps(out["startup"]), flush=True)
    if not skip_demo:
        out["demo"] = demo(milotile, work / f"demo_{label}", demo_args, cores)
        print(label, "demo", json.dumps(out["demo"]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compare", type=Path, default=None, help="another checkout (with .venv) to run next to this one")
    ap.add_argument("--order", choices=("this-first", "compare-first"), default="compare-first")
    ap.add_argument("--demo-args", default="", help="extra options of `milotile demo` (quoted)")
    ap.add_argument("--no-demo", action="store_true", help="start-up figures only")
    ap.add_argument("--workdir", type=Path, default=None, help="where the demos write (default a temporary folder)")
    ap.add_argument("--name", default="time_to_result", help="result name: benchmarks/results/NAME.json")
    args = ap.parse_args(argv)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="time_to_result_"))
    work.mkdir(parents=True, exist_ok=True)
    cores = len(os.sched_getaffinity(0))
    demo_args = shlex.split(args.demo_args)
    runs = [("this", ROOT)]
    if args.compare is not None:
        runs = [("compare", args.compare.resolve())] + runs if args.order == "compare-first" else runs + [
            ("compare", args.compare.resolve())]
    t0 = time.perf_counter()
    results = {label: measure(label, path, work, demo_args, cores, args.no_demo) for label, path in runs}
    payload = {"cores": cores, "demo_args": demo_args,
               "wall_s": round(time.perf_counter() - t0, 1), "results": results,
               "command": " ".join(["python benchmarks/time_to_result.py", *(argv if argv is not None else sys.argv[1:])])}
    print("wrote", write_results(args.name, payload), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
