"""Stages on real schedulers: a single-node SLURM through dask-jobqueue, and plain `dask scheduler` +
`dask worker` processes through --scheduler. Each run must give results identical to an in-process run."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import milotile as mt

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
SIZE = (32, 64, 64)
MINE_ARGS = ["--dog", "2,4", "--min-distance", "5", "--border", "6", "--border-z", "3"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["MILOTILE_PROGRESS"] = "0"
    return env


def _milotile(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "milotile.cli", *args]
    res = subprocess.run(cmd, env=env or _env(), capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def base_store(tmp_path_factory):
    """A two-tomogram store, ingested once; tests copy it."""
    from milotile.synth import synth

    root = tmp_path_factory.mktemp("sched")
    res = synth(root / "syn", seed=3, n_tomograms=2, size=SIZE, snr=1.0, angles=(-60, 60, 6), n_particles=6)
    mt.ingest(res.manifest, root / "base.zarr", chunks=(16, 32, 32))
    return root / "base.zarr"


@pytest.fixture(scope="module")
def reference(base_store, tmp_path_factory):
    """preprocess + mine in-process (dask's synchronous scheduler): the expected results."""
    ref = tmp_path_factory.mktemp("ref") / "s.zarr"
    shutil.copytree(base_store, ref)
    _milotile("--local-scheduler", "sync", "preprocess", str(ref))
    _milotile("--local-scheduler", "sync", "mine", str(ref), *MINE_ARGS)
    return ref


def _assert_same(store: Path, ref: Path) -> None:
    col, rcol = mt.open(store), mt.open(ref)
    for name in rcol.names:
        a = np.asarray(col.zarr_group[f"derived/preprocessed/{name}/0"][:])
        b = np.asarray(rcol.zarr_group[f"derived/preprocessed/{name}/0"][:])
        np.testing.assert_array_equal(a, b)
    got, exp = col.read_table("candidates"), rcol.read_table("candidates")
    assert len(exp) > 0
    cols = ["tomogram", "x", "y", "z", "score"]
    key = ["tomogram", "z", "y", "x"]
    pd.testing.assert_frame_equal(got[cols].sort_values(key).reset_index(drop=True),
                                  exp[cols].sort_values(key).reset_index(drop=True))


# ------------------------------------------------------------------------- plain dask processes
@pytest.mark.slow
@pytest.mark.client("dask processes")
def test_dask_scheduler_and_worker_processes(base_store, reference, tmp_path):
    """`dask scheduler` + `dask worker` (2 worker processes) with --scheduler: identical results."""
    dask_bin = Path(sys.executable).with_name("dask")
    if not dask_bin.exists():
        pytest.skip(f"the dask command-line tool is not installed next to {sys.executable}")
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    sched_file = tmp_path / "scheduler.json"
    env = _env()
    procs = [subprocess.Popen([str(dask_bin), "scheduler", "--port", "0", "--dashboard-address", ":0",
                               "--scheduler-file", str(sched_file)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        for _ in range(300):
            if sched_file.exists() and sched_file.stat().st_size:
                break
            time.sleep(0.1)
        procs.append(subprocess.Popen([str(dask_bin), "worker", "--scheduler-file", str(sched_file),
                                       "--nworkers", "2", "--nthreads", "1", "--local-directory", str(tmp_path)],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        import json

        address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout=60) as c:
            c.wait_for_workers(2, timeout=120)
        out = _milotile("--scheduler", address, "preprocess", str(store))
        _milotile("--scheduler", address, "mine", str(store), *MINE_ARGS)
        assert "start-up" in out.stderr and "metadata reads" in out.stderr  # the per-stage report
        assert "distributed.scheduler" not in out.stderr  # no INFO chatter without -v
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    _assert_same(store, reference)


# ------------------------------------------------------------------------- single-node SLURM
@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A single-node SLURM (slurmctld + slurmd + munged) started by scripts/slurm_local.sh."""
    pytest.importorskip("dask_jobqueue", reason="dask-jobqueue is not installed (pip install milotile[cluster])")
    if os.environ.get("MILOTILE_SKIP_SLURM"):
        pytest.skip("MILOTILE_SKIP_SLURM is set")
    d = tmp_path_factory.mktemp("slurm")
    script = ROOT / "scripts" / "slurm_local.sh"
    res = subprocess.run(["bash", str(script), "start", str(d)], capture_output=True, text=True, timeout=300)
    if res.returncode != 0:
        pytest.skip(f"single-node SLURM could not be started: {res.stderr.strip()[-300:]}")
    conf = res.stdout.strip().split("=", 1)[1]
    yield conf
    subprocess.run(["bash", str(script), "stop", str(d)], capture_output=True, timeout=60)


@pytest.mark.slow
@pytest.mark.client("slurm")
def test_slurm_jobqueue_cluster_gives_identical_results(base_store, reference, slurm, tmp_path):
    """--cluster-config kind: slurm starts its Dask workers as SLURM batch jobs (dask-jobqueue)."""
    store = tmp_path / "s.zarr"
    shutil.copytree(base_store, store)
    logs = tmp_path / "jobs"
    cfg = tmp_path / "slurm.yaml"
    cfg.write_text(
        "cluster:\n"
        "  kind: slurm\n"
        "  jobs: 1\n"
        "  options:\n"
        "    queue: debug\n"
        "    cores: 2\n"
        "    processes: 2\n"
        "    memory: 4GB\n"
        "    walltime: '00:15:00'\n"
        f"    python: {sys.executable}\n"
        f"    local_directory: {tmp_path}\n"
        f"    log_directory: {logs}\n"
        f"    job_script_prologue: ['export PYTHONPATH={SRC}', 'export SLURM_CONF={slurm}']\n"
    )
    env = _env() | {"SLURM_CONF": slurm}
    out = _milotile("--cluster-config", str(cfg), "preprocess", str(store), env=env)
    _milotile("--cluster-config", str(cfg), "mine", str(store), *MINE_ARGS, env=env)
    assert "SLURM" in out.stderr or "slurm" in out.stderr  # the cluster kind is reported
    assert any(logs.glob("*.err")) or any(logs.glob("*.out"))  # the workers really ran as batch jobs
    _assert_same(store, reference)
