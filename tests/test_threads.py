"""The thread budget (milotile.runtime) and a CLI that starts without the heavy libraries."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from milotile import runtime
from milotile.errors import InputError


def _cgroup_tree(root, v2=None, v1=None):
    """A fake /sys/fs/cgroup with a v2 ``cpu.max`` in ``/job`` and/or a v1 quota; returns /proc/self/cgroup."""
    (root / "job").mkdir(parents=True)
    if v2 is not None:
        (root / "cpu.max").write_text("max 100000\n")
        (root / "job" / "cpu.max").write_text(v2)
    if v1 is not None:
        d = root / "cpu" / "job"
        d.mkdir(parents=True)
        (d / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (d / "cpu.cfs_period_us").write_text(str(v1[1]))
    proc = root / "proc_cgroup"
    proc.write_text("0::/job\n" if v1 is None else "4:cpu,cpuacct:/job\n0::/\n")
    return proc


def test_cgroup_v2_quota_is_rounded_up(tmp_path):
    proc = _cgroup_tree(tmp_path, v2="150000 100000\n")
    assert runtime._cgroup_cpus(tmp_path, proc) == 2
    proc.write_text("0::/\n")  # the root's "max": no limit
    assert runtime._cgroup_cpus(tmp_path, proc) is None


def test_cgroup_v1_quota(tmp_path):
    proc = _cgroup_tree(tmp_path, v1=(300000, 100000))
    assert runtime._cgroup_cpus(tmp_path, proc) == 3
    (tmp_path / "cpu" / "job" / "cpu.cfs_quota_us").write_text("-1")
    assert runtime._cgroup_cpus(tmp_path, proc) is None


def test_slurm_allocation():
    assert runtime._slurm_cpus({"SLURM_CPUS_PER_TASK": "3", "SLURM_CPUS_ON_NODE": "64", "SLURM_JOB_ID": "1"}) == 3
    assert runtime._slurm_cpus({"SLURM_CPUS_ON_NODE": "4(x2)", "SLURM_JOB_ID": "1"}) == 4
    assert runtime._slurm_cpus({"SLURM_CPUS_ON_NODE": "4"}) is None  # not inside a job
    assert runtime._slurm_cpus({}) is None


def test_budget_is_the_smallest_limit(monkeypatch):
    monkeypatch.delenv("MILOTILE_THREADS", raising=False)
    monkeypatch.setattr(runtime, "_affinity_cpus", lambda: 8)
    monkeypatch.setattr(runtime, "_cgroup_cpus", lambda: 3)
    monkeypatch.setattr(runtime, "_slurm_cpus", lambda: 4)
    b = runtime.cpu_budget()
    assert (b.count, b.source, b.limits) == (3, "cgroup", {"affinity": 8, "cgroup": 3, "slurm": 4})
    monkeypatch.setenv("MILOTILE_THREADS", "5")
    assert runtime.cpu_budget().count == 5  # the explicit override wins
    monkeypatch.setenv("MILOTILE_THREADS", "0")
    with pytest.raises(InputError, match="MILOTILE_THREADS"):
        runtime.cpu_budget()


def test_tasks_share_the_budget():
    assert runtime.threads_per_task(2, budget=8) == 4
    assert runtime.threads_per_task(3, budget=8) == 2
    assert runtime.threads_per_task(16, budget=8) == 1  # never zero


def test_passive_waits_only_on_a_busy_machine():
    assert runtime.wait_policy(2, load=0.3, cpus=2) == {}
    assert runtime.wait_policy(2, load=2.0, cpus=2)["OMP_WAIT_POLICY"] == "PASSIVE"
    assert runtime.wait_policy(2, load=3.0, cpus=16) == {}  # 14 CPUs left for the others


_CHILD = """
import json, os, sys
from milotile.runtime import init_threads
n = init_threads()
import torch
init_threads()
print(json.dumps({"n": n, "torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads(),
                  "omp": os.environ.get("OMP_NUM_THREADS")}))
"""


@pytest.mark.parametrize("policy", ["on", "off"])
def test_init_threads_owns_torch_pools(policy):
    env = {**os.environ, "MILOTILE_THREADS": "1", "MILOTILE_THREAD_BUDGET": policy}
    for var in runtime.THREAD_VARS:
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    if policy == "on":
        assert got == {"n": 1, "torch": 1, "interop": 1, "omp": "1"}
    else:  # the libraries' defaults: every core, nothing in the environment
        assert got["n"] == (os.cpu_count() or 1) and got["omp"] is None


_HELP = """
import contextlib, io, json, sys
from milotile.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    try:
        main(sys.argv[1:])
    except SystemExit:
        pass
print(json.dumps(sorted(m for m in ("torch", "dask", "distributed", "zarr", "pandas", "sklearn", "numpy")
                        if m in sys.modules)))
"""


@pytest.mark.parametrize("argv", [["--help"], ["refine", "train", "--help"], ["explore", "embed", "--help"],
                                  ["explore", "train", "--help"]])
def test_help_imports_no_heavy_library(argv):
    out = subprocess.run([sys.executable, "-c", _HELP, *argv], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_refine_train_stays_the_function():
    import importlib

    import milotile as mt

    importlib.import_module("milotile.refine.train")  # the submodule of the same name
    assert callable(mt.refine.train) and mt.refine.train.__module__ == "milotile.refine.train"
    from milotile.refine import train

    assert train is mt.refine.train


_ADAPT_CHILD = """
import json, os, subprocess, sys, time
from milotile import runtime
import torch
runtime.init_threads()
ncpu = len(os.sched_getaffinity(0))
out = {"start": torch.get_num_threads()}
out["burst"] = runtime.adapt_threads(0.0, others=ncpu - 1.0)  # one look: a burst, ridden out
out["background"] = runtime.adapt_threads(0.5, others=0.6)  # a quiet machine's background takes no CPU away
out["busy_first"] = runtime.adapt_threads(1.0, others=ncpu - 1.0)
out["busy"] = runtime.adapt_threads(2.0, others=ncpu - 1.0)  # two looks agree: other work leaves one CPU
out["busy_threads"] = torch.get_num_threads()
out["again"] = runtime.adapt_threads(3.0, others=ncpu - 1.0)  # nothing to change
out["quiet"] = runtime.adapt_threads(4.0, others=0.0)  # back to the budget at once, never above it
out["quiet_threads"] = torch.get_num_threads()
state = {}
runtime.others_cpu_use(state, time.monotonic())
spin = subprocess.Popen([sys.executable, "-c", "import time\\nt = time.time()\\nwhile time.time() - t < 1.5: pass"])
spin.wait()
out["measured"] = runtime.others_cpu_use(state, time.monotonic())
os.environ["MILOTILE_ADAPT_THREADS"] = "0"
out["off"] = runtime.adapt_threads(10.0, others=ncpu - 1.0)
print(json.dumps(out))
"""


def test_adapt_threads_shrinks_to_the_free_cpus_and_grows_back():
    """Two 2-thread OpenMP processes on 2 cores stall at every barrier (14x their time alone, measured); the
    training and prediction loops call adapt_threads, which fits torch's pool to the CPUs other work leaves."""
    env = {**os.environ, "MILOTILE_THREADS": "2", "MILOTILE_THREAD_BUDGET": "on"}
    for var in (*runtime.THREAD_VARS, "MILOTILE_ADAPT_THREADS"):
        env.pop(var, None)
    out = subprocess.run([sys.executable, "-c", _ADAPT_CHILD], env=env, capture_output=True, text=True, check=True)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["start"] == 2
    assert got["burst"] is None and got["background"] is None and got["busy_first"] is None
    assert got["busy"] == 1 and got["busy_threads"] == 1
    assert got["again"] is None
    assert got["quiet"] == 2 and got["quiet_threads"] == 2
    # a child spinning one CPU for 1.5 s is measured as other work (upper bound: whatever else runs here)
    assert got["measured"] is not None and got["measured"] >= 0.5
    assert got["off"] is None
