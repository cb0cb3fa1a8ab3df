"""Benchmark: picker training steps alone and two processes side by side (issue 26, :func:`milotile.runtime.adapt_threads`).

The default picker network (``PickerRecipe(bbox=24)``, bf16 autocast where the CPU has it) trains ``--steps`` steps
on random crops in a plain loop that calls ``adapt_threads`` as the training loop does. Timed: one process alone,
then two started at once with the governor on, off (``MILOTILE_ADAPT_THREADS=0``) and with one thread each. Two
OpenMP processes whose threads outnumber the cores stall at every barrier; the fair share of a pair is 2x alone.

    python benchmarks/contention_steps.py            # -> benchmarks/results/contention_steps.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, machine  # noqa: E402

_CHILD = """
import json, os, sys, time
import torch
import milotile.refine.model  # noqa: F401  (registers the pickers)
from milotile.nn import registry
from milotile.nn.device import autocast
from milotile.refine.recipe import PickerRecipe
from milotile.runtime import adapt_threads, init_threads
init_threads(int(sys.argv[2]))
r = PickerRecipe(bbox=24).resolved(6)
model = registry.create(r.arch, **r.network_config(1))
opt = torch.optim.Adam(model.parameters(), 1e-3)
x = torch.randn(2 * r.batch_size, *r.crop)
t0 = time.perf_counter()
for _ in range(int(sys.argv[1])):
    adapt_threads()
    with autocast("cpu", cpu=True):
        loss = model(x)["hm"].float().mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
print(json.dumps({"wall_s": round(time.perf_counter() - t0, 1), "threads_end": torch.get_num_threads()}))
"""


def run(n: int, steps: int, threads: int, adapt: bool) -> list[dict]:
    """``n`` processes started at once; each one's wall time and final thread count."""
    env = {**os.environ, "MILOTILE_ADAPT_THREADS": "1" if adapt else "0", "MILOTILE_THREADS": str(threads)}
    procs = [subprocess.Popen([sys.executable, "-c", _CHILD, str(steps), str(threads)], env=env,
                              stdout=subprocess.PIPE, text=True) for _ in range(n)]
    return [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2, help="threads of each process (the budget)")
    ap.add_argument("--out", default=str(RESULTS / "contention_steps.json"))
    a = ap.parse_args()
    t0 = time.perf_counter()
    res = {"benchmark": "contention_steps", "steps": a.steps, "threads": a.threads, "machine": machine()}
    for name, (n, threads, adapt) in {"alone": (1, a.threads, True), "pair_governor_on": (2, a.threads, True),
                                      "pair_governor_off": (2, a.threads, False), "pair_one_thread_each": (2, 1, False)}.items():
        res[name] = run(n, a.steps, threads, adapt)
        print(name, res[name], flush=True)
    alone = res["alone"][0]["wall_s"]
    res["ratio_to_alone"] = {k: round(max(r["wall_s"] for r in res[k]) / alone, 2)
                             for k in ("pair_governor_on", "pair_governor_off", "pair_one_thread_each")}
    res["total_s"] = round(time.perf_counter() - t0, 1)
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res["ratio_to_alone"]), "(fair share of a pair: 2.0) ->", a.out)


if __name__ == "__main__":
    main()
