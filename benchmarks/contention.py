"""Speed under contention: each stage quiet and beside busy processes, before and after the thread budget.

Issue 26: beside N busy processes a stage should take at most 1.3 × (quiet time × CPU-share ratio),
and the quiet time should not get worse. Each stage runs as the CLI command in a subprocess, on a
tiny synthetic collection (the whole run takes minutes):

* ``preprocess``, ``mine``;
* ``explore`` = ``explore train`` (1 epoch) + ``explore embed``;
* ``refine-train`` (1 epoch of 2 crops per label, one species labelled), ``refine-pick``.

Each stage runs with ``MILOTILE_THREAD_BUDGET=off`` ("before": the libraries' default threads and
OpenMP's spinning waits) and with the budget on ("after"), quiet and beside 1, 2 (and 4 with
``--busy 0,1,2,4``) busy processes: pure-Python spin loops (``--busy-kind numpy`` runs a numpy
matrix loop instead), started before the stage and killed after it.

The fair-share ratio: the stage used ``u`` CPUs on average when quiet (its CPU time / wall time);
beside ``N`` busy single-thread processes on ``C`` CPUs the scheduler gives it ``C·u/(u+N)`` CPUs when
``u + N > C``, so its expected time is ``quiet × max(1, (u + N) / C)``. ``ratio_to_fair`` is the
measured time over that; the target is ≤ 1.3. On a machine shared with other work the load average
(recorded before each run) adds to ``N``: figures taken at a high load understate the effect of the
busy processes, so compare before and after of the same condition, measured back to back.
With ``--busy-kind torch`` each busy process is another model training on 2 threads (two stages started at
once, the case where OpenMP barriers collapse: :func:`milotile.runtime.adapt_threads`); it counts as 2 CPUs
in the share, and ``--epochs`` lengthens the trainings so that the thread count can adapt.
``cpu_ratio_to_quiet`` (CPU seconds beside the busy processes / quiet) does not depend on the share:
CPU burnt by OpenMP threads spinning while their partners wait for a core shows up there.

Usage::

    nice -n 10 python benchmarks/contention.py                  # -> benchmarks/results/contention.json
    nice -n 10 python benchmarks/contention.py --busy 0,1,2,4 --stages preprocess,refine-train
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

STAGES = ("preprocess", "mine", "explore", "refine-train", "refine-pick")
MODES = {"before": {"MILOTILE_THREAD_BUDGET": "off"}, "after": {"MILOTILE_THREAD_BUDGET": "on"}}
_SPIN = {
    "python": "while True:\n    pass\n",
    "numpy": "import numpy as np\na = np.random.rand(300, 300)\nwhile True:\n    a = np.tanh(a @ a / 300.0)\n",
    # another model training beside the stage (two stages started at once): 2 torch threads, OpenMP barriers
    "torch": ("import torch\ntorch.set_num_threads(2)\n"
              "m = torch.nn.Sequential(*[torch.nn.Conv2d(16, 16, 3, padding=1) for _ in range(6)])\n"
              "x = torch.randn(8, 16, 64, 64)\nopt = torch.optim.SGD(m.parameters(), 0.01)\n"
              "while True:\n    m(x).square().mean().backward()\n    opt.step()\n    opt.zero_grad()\n"),
}
#: CPUs one busy process of each kind keeps busy on its own
_BUSY_CPUS = {"python": 1, "numpy": 1, "torch": 2}


def _milotile() -> list[str]:
    exe = Path(sys.executable).with_name("milotile")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "milotile.cli"]


def _run(args: list[str], env: dict, cwd: Path) -> tuple[float, float]:
    """Run ``milotile -q ARGS``; return (wall seconds, CPU seconds of the process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run([*_milotile(), "-q", *args], env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"milotile {' '.join(args)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def stage_commands(stage: str, tag: str, epochs: int = 1) -> list[list[str]]:
    """The CLI command(s) of ``stage``; ``tag`` keeps each run's outputs apart; ``epochs`` of the trainings."""
    e = str(int(epochs))
    return {
        "preprocess": [["preprocess", "s.zarr", "--overwrite"]],
        "mine": [["mine", "s.zarr", "--table", f"cand_{tag}"]],
        "explore": [["explore", "train", "s.zarr", "--epochs", e, "--out", f"runs/e_{tag}"],
                    ["explore", "embed", "s.zarr", "--model", f"runs/e_{tag}/last.pt", "--out-key", f"emb_{tag}"]],
        "refine-train": [["refine", "train", "s.zarr", "--labels", "labels.parquet", "--epochs", e, "--bbox", "12",
                          "--repeats", "2",
                          "--out", f"runs/r_{tag}"]],
        "refine-pick": [["refine", "pick", "s.zarr", "--model", "runs/r_setup/best.pt", "--out", f"picks_{tag}.parquet",
                         "--no-heatmaps"]],
    }[stage]


def setup(work: Path, size: str, env: dict, stages: list[str]) -> None:
    """What the ``stages`` need: synthetic collection and store (always), candidates and patches
    (explore), labels (refine), a trained picker (refine-pick). Steps whose output exists are skipped."""
    import pandas as pd

    steps = [("src/tomograms.txt", ["synth", "src", "--n-tomograms", "2", "--size", size]),
             ("s.zarr/tomograms", ["ingest", "--store", "s.zarr", "src/tomograms.txt"]),
             ("s.zarr/derived/preprocessed", ["preprocess", "s.zarr"])]
    if {"mine", "explore"} & set(stages):
        steps.append(("s.zarr/tables/candidates.parquet", ["mine", "s.zarr"]))
    if "explore" in stages:
        steps.append(("s.zarr/patches/candidates-slab-b16", ["patches", "s.zarr", "--bbox", "16"]))
    for done, args in steps:
        if not (work / done).exists():
            _run(args, env, work)
    gt = pd.read_parquet(work / "src" / "ground_truth.parquet")
    gt[gt.species == gt.species.value_counts().index[0]].to_parquet(work / "labels.parquet")
    if "refine-pick" in stages and not (work / "runs" / "r_setup" / "best.pt").exists():
        for args in stage_commands("refine-train", "setup"):
            _run(args, env, work)


def busy_processes(n: int, kind: str) -> list[subprocess.Popen]:
    """``n`` busy processes: single-thread spin loops (numpy ones limited to one BLAS thread), or 2-thread torch
    training loops (``kind="torch"``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", _SPIN[kind]], env=env) for _ in range(n)]


def _save(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--busy", default="0,1,2", help="numbers of busy processes (0 = quiet), comma-separated")
    p.add_argument("--busy-kind", choices=sorted(_SPIN), default="python",
                   help="python / numpy: single-thread spin loops; torch: a 2-thread torch training loop (another stage)")
    p.add_argument("--epochs", type=int, default=1, help="epochs of the explore and refine trainings")
    p.add_argument("--stages", default=",".join(STAGES))
    p.add_argument("--size", default="32,96,96", help="tomogram shape Z,Y,X of the two synthetic tomograms")
    p.add_argument("--out", default=str(RESULTS / "contention.json"))
    p.add_argument("--work", default=None, help="working folder to use and keep (set-up steps already done are reused)")
    a = p.parse_args()
    busy = [int(v) for v in a.busy.split(",")]
    if busy[0] != 0:
        busy.insert(0, 0)  # the quiet time is the reference
    stages = [s for s in a.stages.split(",") if s]
    cpus = os.cpu_count() or 1
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="contention-"))
    work.mkdir(parents=True, exist_ok=True)
    base_env = {k: v for k, v in os.environ.items()
                if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY",
                             "KMP_BLOCKTIME", "GOMP_SPINCOUNT", "MILOTILE_THREADS")}
    base_env["MILOTILE_PROGRESS"] = "0"
    result: dict = {"benchmark": "contention", "cpus": cpus, "busy_kind": a.busy_kind, "size": a.size, "epochs": a.epochs,
                    "machine_before": machine(), "runs": []}
    t_start = time.perf_counter()
    try:
        setup(work, a.size, base_env, stages)
        quiet: dict[tuple[str, str], dict] = {}
        for n in busy:
            procs = busy_processes(n, a.busy_kind)
            time.sleep(1.0 if n else 0.0)
            try:
                for stage in stages:
                    for mode, extra in MODES.items():
                        env = {**base_env, **extra}
                        load = os.getloadavg()[0]
                        wall = cpu = 0.0
                        for args in stage_commands(stage, f"{mode}{n}", a.epochs):
                            w, c = _run(args, env, work)
                            wall, cpu = wall + w, cpu + c
                        row = {"stage": stage, "mode": mode, "busy": n, "wall_s": round(wall, 2),
                               "cpu_s": round(cpu, 2), "load_avg_1m_before": round(load, 2)}
                        if n == 0:
                            quiet[stage, mode] = row
                        q = quiet[stage, mode]
                        u = min(cpus, q["cpu_s"] / max(q["wall_s"], 1e-9))
                        share = max(1.0, (u + n * _BUSY_CPUS[a.busy_kind]) / cpus)
                        row.update(quiet_cpus_used=round(u, 2), share_ratio=round(share, 2),
                                   ratio_to_quiet=round(wall / q["wall_s"], 2),
                                   ratio_to_fair=round(wall / (q["wall_s"] * share), 2),
                                   cpu_ratio_to_quiet=round(cpu / max(q["cpu_s"], 1e-9), 2))
                        result["runs"].append(row)
                        _save(result, a.out)  # partial results survive an interrupted run
                        print(f"{stage:<13} {mode:<6} busy {n}: {wall:6.1f} s (cpu {cpu:5.1f} s) "
                              f"x{row['ratio_to_quiet']:.2f} quiet, x{row['ratio_to_fair']:.2f} fair share "
                              f"(load {load:.1f})", flush=True)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()
    finally:
        if not a.work:
            shutil.rmtree(work, ignore_errors=True)
    result["machine_after"] = machine()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    summary = {}
    for stage in stages:
        for mode in MODES:
            rows = [r for r in result["runs"] if r["stage"] == stage and r["mode"] == mode and r["busy"]]
            summary[f"{stage}/{mode}"] = {"quiet_s": quiet[stage, mode]["wall_s"],
                                          "worst_ratio_to_fair": max((r["ratio_to_fair"] for r in rows), default=None)}
    result["summary"] = summary
    _save(result, a.out)
    print(json.dumps(summary, indent=1))
    print(f"{result['total_s']:.0f} s in all -> {a.out}")


if __name__ == "__main__":
    main()
