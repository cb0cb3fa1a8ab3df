"""Start-up of the ``milotile`` command: wall time of ``--help`` for every command and sub-command.

Issue 26 asks for ``milotile --help`` and every ``milotile COMMAND --help`` under 0.5 s on a quiet
machine: the CLI builds its parsers without importing torch, dask, zarr, pandas or sklearn, and a
stage is imported only when it runs. For each command line this script runs ``milotile ... --help``
``--repeats`` times in a fresh interpreter (best and median wall time), lists the heavy packages the
``--help`` process imported, and records the slowest imports of ``milotile --help`` from
``python -X importtime``. Load average is recorded next to the figures (the machine may be shared).

``--stages`` measures instead the start-up of each stage when it runs without a cluster: the wall time
until the stage's own code starts, i.e. ``python -c "import milotile.cli, <the stage's module>"`` (the
imports the command makes before its first real step; opening a store and reading its metadata take
milliseconds more), best of ``--repeats``, with the heavy packages that import pulls in. Target: 1.5 s.

Usage::

    python benchmarks/startup.py                 # -> benchmarks/results/startup.json
    python benchmarks/startup.py --stages        # -> benchmarks/results/startup_stages.json
    python benchmarks/startup.py --repeats 5 --out /tmp/startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

HEAVY = ("torch", "dask", "distributed", "zarr", "pandas", "sklearn", "scipy", "numpy", "umap", "numba")

#: runs ``milotile ARGS --help`` in-process and prints the heavy modules it imported, as JSON
_PROBE = (
    "import sys, json, contextlib, io\n"
    "from milotile.cli import main\n"
    "with contextlib.redirect_stdout(io.StringIO()):\n"
    "    try:\n"
    "        main(sys.argv[1:])\n"
    "    except SystemExit:\n"
    "        pass\n"
    f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\n"
)


def command_lines() -> list[list[str]]:
    """Every command path of the CLI: ``[]``, ``["refine"]``, ``["refine", "train"]``, ..."""
    import argparse as ap

    from milotile.cli import build_parser

    out: list[list[str]] = [[]]

    def walk(parser: ap.ArgumentParser, prefix: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, ap._SubParsersAction):
                for name, sub in action.choices.items():
                    out.append([*prefix, name])
                    walk(sub, [*prefix, name])

    walk(build_parser(), [])
    return out


def _milotile() -> list[str]:
    exe = Path(sys.executable).with_name("milotile")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "milotile.cli"]


def time_help(cmd: list[str], repeats: int) -> dict:
    """Best and median wall time of ``milotile CMD --help`` (a new process each time)."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = subprocess.run([*_milotile(), *cmd, "--help"], capture_output=True, text=True)
        walls.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"milotile {' '.join(cmd)} --help failed: {r.stderr[-500:]}")
    probe = subprocess.run([sys.executable, "-c", _PROBE, *cmd, "--help"], capture_output=True, text=True)
    heavy = json.loads(probe.stdout.strip().splitlines()[-1]) if probe.returncode == 0 else ["probe failed"]
    return {"command": " ".join(["milotile", *cmd, "--help"]), "best_s": round(min(walls), 3),
            "median_s": round(statistics.median(walls), 3), "heavy_imports": heavy,
            "load_avg_1m": os.getloadavg()[0]}


def import_profile(top: int = 12) -> list[dict]:
    """The slowest cumulative imports of ``milotile --help`` (``python -X importtime``)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-c", _PROBE, "--help"], capture_output=True, text=True)
    rows = []
    for line in r.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        self_us, cum_us, name = (p.strip() for p in line.replace("import time:", "").split("|"))
        rows.append({"module": name.strip(), "self_ms": int(self_us) / 1e3, "cumulative_ms": int(cum_us) / 1e3})
    return sorted(rows, key=lambda r: -r["cumulative_ms"])[:top]


#: the module each stage's command imports before its first real step
STAGE_MODULES = {
    "preprocess": "milotile.stages.preprocess", "mine": "milotile.stages.mine", "patches": "milotile.stages.patches",
    "explore train": "milotile.explore.train", "explore embed": "milotile.explore.embed",
    "explore atlas": "milotile.explore.atlas", "refine train": "milotile.refine.train",
    "refine pick": "milotile.refine.predict", "export": "milotile.formats", "segments features": "milotile.segments",
}


def time_stages(repeats: int) -> list[dict]:
    """Best and median wall time of ``import milotile.cli, <module>`` in a fresh interpreter, per stage."""
    rows = []
    for name, module in STAGE_MODULES.items():
        code = f"import milotile.cli, {module}, sys, json; print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
        walls = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            walls.append(time.perf_counter() - t0)
        rows.append({"stage": f"milotile {name}", "module": module, "best_s": round(min(walls), 3),
                     "median_s": round(statistics.median(walls), 3), "heavy_imports": json.loads(r.stdout),
                     "load_avg_1m": round(os.getloadavg()[0], 2)})
        print(f"{rows[-1]['stage']:<28} best {rows[-1]['best_s']:.2f} s  median {rows[-1]['median_s']:.2f} s  "
              f"(load {rows[-1]['load_avg_1m']:.1f})", flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3, help="runs per command (best and median reported)")
    p.add_argument("--stages", action="store_true", help="time each stage's start-up instead of --help")
    p.add_argument("--out", default=None, help="default: results/startup.json (startup_stages.json with --stages)")
    a = p.parse_args()
    if a.stages:
        before = machine()
        rows = time_stages(a.repeats)
        out = Path(a.out or RESULTS / "startup_stages.json")
        out.write_text(json.dumps({"benchmark": "startup_stages", "target_s": 1.5, "machine_before": before,
                                   "machine_after": machine(), "python_startup_best_s": time_help_python(a.repeats),
                                   "stages": rows, "slowest_best_s": max(r["best_s"] for r in rows)}, indent=1))
        print(f"slowest stage start-up {max(r['best_s'] for r in rows):.2f} s -> {out}")
        return
    a.out = a.out or str(RESULTS / "startup.json")
    before = machine()
    rows = []
    for cmd in command_lines():
        row = time_help(cmd, a.repeats)
        rows.append(row)
        print(f"{row['command']:<45} best {row['best_s']:.2f} s  median {row['median_s']:.2f} s  "
              f"heavy imports {row['heavy_imports'] or 'none'}  (load {row['load_avg_1m']:.1f})", flush=True)
    python_only = time_help_python(a.repeats)
    result = {
        "benchmark": "startup", "target_s": 0.5, "machine_before": before, "machine_after": machine(),
        "python_startup_best_s": python_only,
        "commands": rows, "slowest_best_s": max(r["best_s"] for r in rows),
        "all_without_heavy_imports": all(not r["heavy_imports"] for r in rows),
        "import_profile_help": import_profile(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"slowest --help {result['slowest_best_s']:.2f} s (bare python {python_only:.2f} s); "
          f"heavy imports anywhere: {not result['all_without_heavy_imports']} -> {a.out}")


def time_help_python(repeats: int) -> float:
    """Best wall time of a bare ``python -c pass``: the floor under every figure above."""
    walls = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        walls.append(time.perf_counter() - t0)
    return round(min(walls), 3)


if __name__ == "__main__":
    main()
