"""Issue 10: remote workers see the same store, writers are locked, incomplete outputs are marked,
and bad inputs give one sentence with exit status 2 (nothing half-written)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import zarr
from test_store import _store_snapshot as _snapshot  # noqa: E402 - pytest puts tests/ on sys.path

import milotile as mt
from milotile.cli import main as cli_main
from milotile.errors import InputError
from milotile.store import write_mrc
from milotile.store.lock import StoreLockedError, list_locks, writer_lock

CHUNKS = (16, 32, 32)
PY = sys.executable
ENV = {**os.environ, "MILOTILE_PROGRESS": "0", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


def _blobs(shape=(32, 64, 64), n=12, seed=0):
    """Noise with dark Gaussian blobs (particles for mine)."""
    rng = np.random.default_rng(seed)
    z, y, x = np.indices(shape, dtype=np.float32)
    v = rng.normal(0, 0.3, size=shape).astype(np.float32)
    for c in rng.uniform([6, 10, 10], [shape[0] - 6, shape[1] - 10, shape[2] - 10], size=(n, 3)):
        v -= np.exp(-((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2) / (2 * 2.5**2)).astype(np.float32)
    return v


def _write_sources(folder: Path, n=2, shape=(32, 64, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["image_name rec_path"]
    for i in range(n):
        write_mrc(folder / f"t{i}.rec", _blobs(shape, seed=i), voxel_size=10.0)
        lines.append(f"t{i} t{i}.rec")
    (folder / "tomograms.txt").write_text("\n".join(lines) + "\n")
    return folder / "tomograms.txt"


def _cli(args, cwd, timeout=240, env=None):
    return subprocess.run([PY, "-m", "milotile.cli", *args], cwd=cwd, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------ remote workers
def _wait_for_workers(address: str, n: int, timeout: float = 60) -> None:
    from distributed import Client

    with Client(address, timeout=30) as c:
        c.wait_for_workers(n, timeout=timeout)


@pytest.mark.slow
def test_relative_store_with_workers_started_elsewhere_equals_local_run(tmp_path):
    """Workers started in another folder: a relative --store must still reach the client's store."""
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _write_sources(work / "data")
    port = _free_port()
    addr = f"tcp://127.0.0.1:{port}"
    procs = [subprocess.Popen([PY, "-m", "distributed.cli.dask_scheduler", "--port", str(port), "--no-dashboard"],
                              cwd=elsewhere, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        time.sleep(2)
        for _ in range(2):
            procs.append(subprocess.Popen(
                [PY, "-m", "distributed.cli.dask_worker", addr, "--nthreads", "1", "--no-dashboard", "--no-nanny"],
                cwd=elsewhere, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        _wait_for_workers(addr, 2)
        steps = [["ingest", "data/tomograms.txt", "--store", "C4.zarr"], ["preprocess", "C4.zarr", "--gauss", "1"],
                 ["mine", "C4.zarr", "--border", "6", "--border-z", "3"]]
        for step in steps:
            r = _cli(["--scheduler", addr, *step], cwd=work)
            assert r.returncode == 0, r.stderr[-2000:]
            assert "Traceback" not in r.stderr
        for step in steps:
            r = _cli(["--workers", "1", *[s.replace("C4.zarr", "local.zarr") for s in step]], cwd=work)
            assert r.returncode == 0, r.stderr[-2000:]
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:  # a loaded machine: do not let teardown mask the result
                p.kill()
                p.wait()
    assert not any(elsewhere.rglob("zarr.json")), "the workers wrote into their own folder"
    remote, local = mt.open(work / "C4.zarr", mode="r"), mt.open(work / "local.zarr", mode="r")
    assert remote.names == local.names == ["t0", "t1"]
    for name in remote.names:
        a = remote[name].data().compute()
        assert a.std() > 0.1  # not the fill value
        np.testing.assert_array_equal(a, local[name].data().compute())
        pa = remote.group(f"derived/preprocessed/{name}")["0"][...]
        np.testing.assert_array_equal(pa, local.group(f"derived/preprocessed/{name}")["0"][...])
    cr, cl = remote.read_table("candidates"), local.read_table("candidates")
    assert len(cr) > 0
    pd.testing.assert_frame_equal(cr, cl)


def test_worker_seeing_another_store_writes_nothing(tmp_path):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    col = mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    assert os.path.isabs(col.url) and col.store_id
    arr = col.zarr_group["tomograms/a/0"]
    shipped = pickle.dumps(arr)  # what a task sends to a worker
    before = arr[...]
    # a different store now lives at that path (another machine's disk, a re-created store)
    other = zarr.open_group(tmp_path / "s.zarr", mode="r+")
    meta = dict(other.attrs["milotile"])
    other.attrs["milotile"] = {**meta, "store_id": "someone-else"}
    on_worker = pickle.loads(shipped)
    with pytest.raises(InputError, match="different store .*someone-else.*nothing was written"):
        on_worker[0:16, 0:32, 0:32] = 7.0
    with pytest.raises(InputError, match="different store"):
        on_worker[0:2, 0:2, 0:2]
    other.attrs["milotile"] = meta
    np.testing.assert_array_equal(zarr.open_array(tmp_path / "s.zarr/tomograms/a/0")[...], before)
    # the same store: the shipped array works as before
    np.testing.assert_array_equal(pickle.loads(shipped)[...], before)


def test_worker_seeing_no_store(tmp_path):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    col = mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    shipped = pickle.dumps(col.zarr_group["tomograms/a/0"])
    os.rename(tmp_path / "s.zarr", tmp_path / "moved.zarr")
    with pytest.raises(InputError, match="sees no milotile store"):
        pickle.loads(shipped)[0:16, 0:32, 0:32] = 1.0
    assert not (tmp_path / "s.zarr").exists()


def test_store_url_is_absolute_and_id_persists(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    col = mt.ingest("a.rec", "rel.zarr", chunks=CHUNKS)
    assert col.url == str(tmp_path / "rel.zarr")
    assert mt.open("rel.zarr", mode="r").store_id == col.store_id


# ------------------------------------------------------------------------------ writer locks
_HOLD = textwrap.dedent("""
    import sys, time
    from milotile.store.lock import writer_lock
    with writer_lock(sys.argv[1], sys.argv[2], command="holder"):
        print("locked", flush=True)
        time.sleep(120)
""")


def _hold_lock(store, rel):
    p = subprocess.Popen([PY, "-c", _HOLD, str(store), rel], env=ENV, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_lock_refuses_live_writer_and_clears_dead_one(tmp_path, caplog, capsys):
    store = tmp_path / "s.zarr"
    mt.open(store, mode="a")
    holder = _hold_lock(store, "derived/x/t0")
    try:
        with pytest.raises(StoreLockedError, match=rf"derived/x/t0 .*`holder` \(pid {holder.pid} on .*milotile unlock"):
            with writer_lock(store, "derived/x/t0"):
                pass
        with writer_lock(store, "derived/x/t1"):  # another output is free
            pass
        [lk] = list_locks(store)
        assert lk["pid"] == holder.pid and lk["stale"] is False and lk["command"] == "holder"
        assert cli_main(["unlock", str(store), "derived/x/t0"]) == 2
        assert "which is still running" in capsys.readouterr().err
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # kill -9 left the lock behind: the next writer on this host sees the pid is gone and takes it
    assert list_locks(store)[0]["stale"] is True
    with writer_lock(store, "derived/x/t0") as info:
        assert info["pid"] == os.getpid()
    assert "stale lock" in caplog.text
    assert list_locks(store) == []


def test_lock_of_another_host_needs_unlock(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    mt.open(store, mode="a")
    lock = store / ".locks" / "tables~candidates.lock"
    lock.parent.mkdir(exist_ok=True)  # the store keeps .locks/ as an opaque zarr node (issue 11)
    lock.write_text(json.dumps({"host": "node-17", "pid": 4242, "time": time.time(), "command": "milotile mine"}))
    with pytest.raises(StoreLockedError, match="pid 4242 on node-17"):
        with writer_lock(store, "tables/candidates"):
            pass
    assert cli_main(["info", str(store)]) == 0
    assert "tables/candidates: milotile mine (pid 4242 on node-17; held)" in capsys.readouterr().out
    assert cli_main(["unlock", str(store), "tables/candidates"]) == 0
    assert not lock.exists()
    assert cli_main(["unlock", str(store), "tables/candidates"]) == 2
    assert "no writer lock" in capsys.readouterr().err


def test_preprocess_refused_while_another_writes_it(tmp_path):
    _write_sources(tmp_path / "d")
    store = tmp_path / "s.zarr"
    col = mt.ingest(tmp_path / "d" / "tomograms.txt", store, chunks=CHUNKS)
    holder = _hold_lock(store, "derived/preprocessed/t0")
    try:
        code = cli_main(["--workers", "1", "preprocess", str(store), "--gauss", "1.5"])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    g = col.group("derived/preprocessed/t0")
    assert g is None or not dict(g.attrs.get("milotile", {})).get("complete")


@pytest.mark.slow
def test_two_concurrent_preprocess_runs_never_leave_wrong_voxels(tmp_path):
    """Two preprocess runs with different --gauss on one store: each output matches its own parameters."""
    _write_sources(tmp_path / "d", n=2, shape=(48, 128, 128))
    store = tmp_path / "s.zarr"
    mt.ingest(tmp_path / "d" / "tomograms.txt", store, chunks=CHUNKS)
    runs = [subprocess.Popen([PY, "-m", "milotile.cli", "--workers", "1", "preprocess", str(store), "--gauss", g],
                             env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for g in ("1.5", "0.5")]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in runs]
    for code, err in results:
        assert code in (0, 2), err[-2000:]
        assert "Traceback" not in err
        if code == 2:
            assert "is being written by" in err and "milotile unlock" in err
    col = mt.open(store, mode="r")
    # references: each gauss computed alone on a fresh store
    refs = {}
    for g in (1.5, 0.5):
        ref = mt.ingest(tmp_path / "d" / "tomograms.txt", tmp_path / f"ref{g}.zarr", chunks=CHUNKS)
        from milotile.stages.preprocess import preprocess

        preprocess(ref, gauss=g, tilts=False)
        refs[g] = ref
    for name in col.names:
        g = col.group(f"derived/preprocessed/{name}")
        meta = dict(g.attrs["milotile"])
        assert meta["complete"] is True
        gauss = meta["params"]["gauss"]
        ref = refs[gauss].group(f"derived/preprocessed/{name}")["0"][...]
        np.testing.assert_array_equal(g["0"][...], ref)
        assert not [k for k in g.array_keys() if k.startswith("_blurred")]
    assert list_locks(store) == []


# ------------------------------------------------------------------------------ info
def test_info_marks_incomplete_outputs(tmp_path, capsys):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    write_mrc(tmp_path / "b.rec", _blobs(seed=1), voxel_size=10.0)
    col = mt.ingest([tmp_path / "a.rec", tmp_path / "b.rec"], tmp_path / "s.zarr", chunks=CHUNKS)
    from milotile.stages.preprocess import preprocess

    preprocess(col, gauss=1.0, tilts=False)
    # simulated kill -9 during preprocess of b and during pick: complete stays false
    col.group("derived/preprocessed/b").attrs["milotile"] = {"params": {}, "complete": False}
    col.group("derived/heatmaps/refine/a", create=True).attrs["milotile"] = {"complete": False}
    col.group("patches/bank1", create=True).attrs["milotile"] = {"complete": False}
    assert cli_main(["info", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "preprocessed: a, b (incomplete)" in out
    assert "heatmaps: refine/a (incomplete)" in out
    assert "patch banks: bank1 (incomplete)" in out
    assert col.derived()["preprocessed"] == ["a"]
    assert col.derived()["heatmaps"] == []


# ------------------------------------------------------------------------------ bad input, exit 2
def _err(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_non_utf8_manifest(tmp_path, capsys):
    (tmp_path / "m.txt").write_bytes(b"image_name rec_path\n\xff\xfeabc t.rec\n")
    assert cli_main(["--workers", "1", "ingest", str(tmp_path / "m.txt"), "--store", str(tmp_path / "s.zarr")]) == 2
    assert "is not UTF-8 text (byte 20, line 2)" in _err(capsys)
    assert not (tmp_path / "s.zarr").exists()


@pytest.mark.parametrize("fmt", ["milopyp", "star", "csv", "ndjson"])
def test_export_to_impossible_path(tmp_path, capsys, fmt):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    pd.DataFrame({"tomogram": ["a"], "x": [5.0], "y": [5.0], "z": [5.0]}).to_csv(tmp_path / "p.csv", index=False)
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file" / "sub", "/dev/null/x"):
        code = cli_main(["export", str(tmp_path / "p.csv"), "-f", fmt, "--store", str(tmp_path / "s.zarr"), "-o", str(out)])
        assert code == 2
        assert "is a file, not a folder" in _err(capsys)
    assert (tmp_path / "file").read_text() == "x"


def test_export_to_read_only_folder(tmp_path, capsys):
    pd.DataFrame({"tomogram": ["a"], "x": [5.0], "y": [5.0], "z": [5.0]}).to_csv(tmp_path / "p.csv", index=False)
    assert cli_main(["export", str(tmp_path / "p.csv"), "-f", "csv", "-o", "/proc/sys/picks.csv"]) == 2
    assert "not writable" in _err(capsys)


@pytest.mark.parametrize("cmd", [["info"], ["preprocess"], ["mine"], ["ingest"]])
def test_zarr_array_given_as_store(tmp_path, capsys, cmd):
    zarr.create_array(tmp_path / "arr.zarr", shape=(4, 4), dtype="f4")
    before = _snapshot(tmp_path / "arr.zarr")
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    args = ["ingest", str(tmp_path / "a.rec"), "--store", str(tmp_path / "arr.zarr")] if cmd == ["ingest"] \
        else [*cmd, str(tmp_path / "arr.zarr")]
    assert cli_main(["--workers", "1", *args]) == 2
    assert "is a Zarr array, not a milotile collection store" in _err(capsys)
    assert _snapshot(tmp_path / "arr.zarr") == before


def test_unreachable_and_malformed_scheduler(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MILOTILE_SCHEDULER_TIMEOUT", "2")
    mt.open(tmp_path / "s.zarr", mode="a")
    t0 = time.perf_counter()
    assert cli_main(["--scheduler", "tcp://127.0.0.1:1", "preprocess", str(tmp_path / "s.zarr")]) == 2
    assert time.perf_counter() - t0 < 15
    assert "no Dask scheduler answered at tcp://127.0.0.1:1 within 2 s" in _err(capsys)
    assert cli_main(["--scheduler", "notanaddress", "preprocess", str(tmp_path / "s.zarr")]) == 2
    assert "'notanaddress' is not a Dask scheduler address" in _err(capsys)


@pytest.mark.parametrize("flag", ["--workers", "--threads-per-worker"])
def test_zero_workers_or_threads_rejected(tmp_path, capsys, flag):
    mt.open(tmp_path / "s.zarr", mode="a")
    for cmd in (["info"], ["preprocess"]):
        assert cli_main([flag, "0", *cmd, str(tmp_path / "s.zarr")]) == 2
        assert f"{flag} must be a whole number of at least 1, got 0" in _err(capsys)
    with pytest.raises(InputError):
        with mt.cluster(workers=0):
            pass


def test_garbage_checkpoint(tmp_path):
    from milotile.nn.checkpoint import load_checkpoint

    (tmp_path / "garbage.pt").write_bytes(os.urandom(300))
    with pytest.raises(InputError) as exc:
        load_checkpoint(tmp_path / "garbage.pt")
    msg = str(exc.value)
    assert "is not a PyTorch checkpoint" in msg and "\n" not in msg and "weights_only" not in msg

    import torch

    torch.save({"x": pd.Timestamp("2020-01-01")}, tmp_path / "objects.pt")  # not plain data
    with pytest.raises(InputError) as exc:
        load_checkpoint(tmp_path / "objects.pt")
    msg = str(exc.value)
    assert "holds Python objects" in msg and "\n" not in msg and "weights_only" not in msg


@pytest.mark.slow
def test_garbage_checkpoint_cli(tmp_path):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04" + os.urandom(200))
    r = _cli(["--workers", "1", "refine", "pick", str(tmp_path / "s.zarr"), "--model", str(tmp_path / "garbage.pt")],
             cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "weights_only" not in r.stderr
    assert "garbage.pt" in r.stderr
    assert mt.open(tmp_path / "s.zarr", mode="r").derived(status=True).get("heatmaps") in (None, {})


def test_pick_tta_out_of_range_is_one_sentence_and_writes_nothing(tmp_path):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    r = _cli(["--workers", "1", "refine", "pick", str(tmp_path / "s.zarr"), "--model", str(tmp_path / "none.pt"),
              "--tta", "9"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "--tta must be between 1 and 8, got 9" in r.stderr and "Traceback" not in r.stderr
    col = mt.open(tmp_path / "s.zarr", mode="r")
    assert col.derived(status=True).get("heatmaps") in (None, {}) and "picks" not in col.tables()


@pytest.mark.slow
def test_successful_run_prints_no_traceback(tmp_path):
    write_mrc(tmp_path / "a.rec", _blobs(), voxel_size=10.0)
    for args in (["ingest", "a.rec", "--store", "s.zarr"], ["preprocess", "s.zarr"]):
        r = _cli(["--workers", "2", *args], cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "Traceback" not in r.stderr and "Exception" not in r.stderr


def test_axis_hint_names_order_only_where_it_applies(tmp_path):
    from milotile.formats import read_labels, validate_labels

    write_mrc(tmp_path / "a.rec", np.zeros((40, 64, 80), np.float32) + np.arange(80, dtype=np.float32), voxel_size=10.0)
    col = mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    rng = np.random.default_rng(1)
    true = rng.uniform([0, 45, 0], [79, 63, 39], size=(30, 3))  # x, y (beyond the depth), z
    csv = pd.DataFrame({"tomogram": "a", "x": true[:, 0], "y": true[:, 2], "z": true[:, 1]})
    csv.to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(InputError) as exc:
        validate_labels(read_labels(tmp_path / "labels.csv", col), col)
    assert "axis-order mix-up" in str(exc.value) and "--order" in str(exc.value)
    assert "--order xzy" not in str(exc.value) and "--order does not apply" in str(exc.value)
    np.savetxt(tmp_path / "a.txt", true[:, [0, 2, 1]])  # bare txt: --order is what fixes it
    with pytest.raises(InputError, match=r"--order xzy"):
        validate_labels(read_labels(tmp_path / "a.txt", col, order="xyz"), col)
