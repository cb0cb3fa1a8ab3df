"""Start-up and small jobs: in-process scheduling below a size threshold, the per-stage report, store
I/O counters, memory-bounded batch sizes, CPU defaults of the exploration trunk."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import zarr

import milotile as mt
import milotile.iostats as iostats
from milotile import cli


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    from milotile.synth import synth

    root = tmp_path_factory.mktemp("rt")
    res = synth(root / "syn", seed=1, n_tomograms=2, size=(24, 48, 48), snr=1.0, angles=(-60, 60, 12), n_particles=4)
    mt.ingest(res.manifest, root / "s.zarr")
    return root / "s.zarr"


def test_iostats_counts_metadata_chunks_and_writes(tmp_path):
    iostats.enable()
    iostats.reset()
    z = zarr.create_array(tmp_path / "a.zarr", shape=(8, 8), chunks=(4, 4), dtype="float32")
    z[:] = np.ones((8, 8), np.float32)
    w = iostats.snapshot()
    assert w["writes"] >= 4 and w["bytes_written"] >= 4 * 4 * 4 * 4 - 1
    iostats.reset()
    z2 = zarr.open_array(tmp_path / "a.zarr", mode="r")
    np.testing.assert_array_equal(z2[:], 1)
    r = iostats.snapshot()
    assert r["meta_reads"] >= 1 and r["chunk_reads"] == 4 and r["bytes_read"] > 0 and r["io_seconds"] > 0
    assert iostats.merge([r, r])["chunk_reads"] == 8


def test_small_stage_runs_in_process_and_reports_its_time(small_store, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MILOTILE_REPORT_JSON", str(tmp_path / "rep.jsonl"))
    monkeypatch.setenv("MILOTILE_PROGRESS", "0")
    with caplog.at_level(logging.INFO):
        assert cli.main(["preprocess", str(small_store)]) == 0
    text = caplog.text
    assert "no process cluster needed" in text and "Dask cluster ready" not in text
    rep = json.loads((tmp_path / "rep.jsonl").read_text().splitlines()[-1])
    assert rep["command"] == "preprocess" and rep["startup_s"] > 0 and rep["compute_s"] >= 0
    assert rep["chunk_reads"] > 0 and rep["writes"] > 0 and rep["meta_reads"] > 0
    assert rep["wall_s"] == pytest.approx(rep["startup_s"] + rep["io_s"] + rep["compute_s"], rel=1e-6)
    assert "start-up" in text and "metadata reads" in text


def test_large_input_would_start_a_cluster(small_store, monkeypatch):
    args = cli.build_parser().parse_args(["preprocess", str(small_store)])
    size = cli._work_bytes(args)
    assert size == 2 * 4 * 24 * 48 * 48  # two float32 level-0 volumes
    seen = {}

    import contextlib

    @contextlib.contextmanager
    def fake_cluster(**kw):
        seen.update(kw)
        yield "client"

    import importlib

    cmod = importlib.import_module("milotile.cluster")  # the package attribute is the function
    monkeypatch.setattr(cmod, "cluster", fake_cluster)
    monkeypatch.setattr(cmod, "SMALL_JOB_BYTES", size)  # now the input is not "small"
    with cli.cluster_from_args(args) as client:
        assert client == "client"
    args = cli.build_parser().parse_args(["--local-scheduler", "sync", "preprocess", str(small_store)])
    with cli.cluster_from_args(args) as client:
        import dask

        assert client is None and dask.config.get("scheduler") == "synchronous"


def test_cpu_model_stages_run_in_process_whatever_the_input_size(small_store, monkeypatch):
    # refine pick / explore embed on the CPU: a network threads itself and releases the GIL, so worker
    # processes only add start-up and transfers; with a GPU (or --local-scheduler cluster) a cluster starts
    import contextlib
    import importlib

    import dask

    cmod = importlib.import_module("milotile.cluster")
    seen = []

    @contextlib.contextmanager
    def fake_cluster(**kw):
        seen.append(kw)
        yield "client"

    monkeypatch.setattr(cmod, "cluster", fake_cluster)
    monkeypatch.setattr(cmod, "SMALL_JOB_BYTES", 1)  # every input is "large"
    monkeypatch.setattr(cmod, "cuda_devices", lambda: 0)
    for argv in (["refine", "pick", str(small_store), "--model", "m.pt"], ["explore", "embed", str(small_store),
                                                                            "--model", "m.pt"]):
        args = cli.build_parser().parse_args(argv)
        with cli.cluster_from_args(args) as client:
            assert client is None and dask.config.get("scheduler") == "threads"
    with cli.cluster_from_args(cli.build_parser().parse_args(["preprocess", str(small_store)])) as client:
        assert client == "client"  # not a model stage: the size rule
    monkeypatch.setattr(cmod, "cuda_devices", lambda: 1)
    with cli.cluster_from_args(cli.build_parser().parse_args(["refine", "pick", str(small_store), "--model",
                                                              "m.pt"])) as client:
        assert client == "client"  # GPU workers
    monkeypatch.setattr(cmod, "cuda_devices", lambda: 0)
    args = cli.build_parser().parse_args(["--local-scheduler", "cluster", "refine", "pick", str(small_store),
                                          "--model", "m.pt"])
    with cli.cluster_from_args(args) as client:
        assert client == "client" and len(seen) == 3


def test_auto_batch_size_fits_the_budget():
    from milotile.nn.device import auto_batch_size

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 16 * 16, 2))

    def step(n):
        return model(torch.zeros(n, 1, 16, 16)).sum()

    bs, per = auto_batch_size(step, 256, budget_bytes=10**9)
    assert bs == 256  # fits: the requested batch
    bs, per2 = auto_batch_size(step, 256, budget_bytes=20 * per)
    assert per2 == per and bs == 16 and bs * per <= 20 * per  # largest power of two under the budget
    assert per >= 8 * 16 * 16 * 4  # at least the ReLU output (float32) is saved per sample


def test_cpu_defaults_of_explore_train(tmp_path, monkeypatch):
    monkeypatch.delenv("MILOTILE_CPU_BF16", raising=False)
    from test_explore import write_bank

    from milotile.explore import train
    from milotile.nn.device import amp_dtype, cpu_has_bf16

    col, _, _ = write_bank(tmp_path / "s.zarr", n=32)
    enc = train(col, epochs=1, device="cpu", out=tmp_path / "run")
    opts = json.loads((tmp_path / "run" / "options.json").read_text())
    assert opts["config"]["widths"] == [32, 64, 128]  # CPU trunk
    assert opts["batch_size"] == 32  # auto batch (<= 256), clipped to the bank
    assert enc.transform(np.zeros((2, 1, 1, 16, 16), np.float32)).shape == (2, 256)  # centre + ring of 128
    assert amp_dtype(torch.device("cpu")) is None  # CPU autocast only when asked for
    native = torch.bfloat16 if cpu_has_bf16() else None
    assert amp_dtype(torch.device("cpu"), cpu=True) == native  # exploration asks: bf16 where the CPU has it
    assert opts["autocast"] == (None if native is None else "bfloat16")
    monkeypatch.setenv("MILOTILE_CPU_BF16", "0")
    assert amp_dtype(torch.device("cpu"), cpu=True) is None  # the switch back to fp32


def test_cli_widths_flag(tmp_path):
    from milotile.commands.recipe_options import recipe_from_args
    from milotile.explore.recipe import ExploreRecipe

    args = cli.build_parser().parse_args(["explore", "train", "s.zarr", "--widths", "16,32,64"])
    recipe = recipe_from_args(ExploreRecipe, args)
    assert recipe.widths == (16, 32, 64) and recipe.batch_size is None and args.nproc == 1
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["explore", "train", "s.zarr", "--widths", "16,32"])


def test_set_threads_sets_torch_and_env(monkeypatch):
    from milotile.runtime import set_threads

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    try:
        set_threads(1)
        assert torch.get_num_threads() == 1
        import os

        assert os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)


# -- collection scale: store traffic per tomogram -------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    from milotile.synth import synth

    root = tmp_path_factory.mktemp("scale")
    res = synth(root / "syn", seed=2, n_tomograms=2, size=(24, 48, 48), snr=1.0, angles=(-60, 60, 20), n_particles=2)
    return res.manifest


def _manifest(src, n: int, dest):
    """A manifest of ``n`` tomograms cycling through the source files (as benchmarks/collection.py)."""
    rows = src.read_text().splitlines()
    body = [r.split("\t") for r in rows[1:] if r.strip()]
    dest.write_text("\n".join([rows[0], *("\t".join([f"t{i:03d}", *body[i % len(body)][1:]]) for i in range(n))]) + "\n")
    return dest


def _counted(fn):
    import dask

    iostats.enable()
    iostats.reset()
    with dask.config.set(scheduler="sync"):
        out = fn()
    return out, iostats.snapshot()


@pytest.fixture(scope="module")
def scale_runs(tiny_sources, tmp_path_factory):
    """Ingest, preprocess (twice), mine and patches of 6 and 12 tomograms with their store counters."""
    from milotile.stages.patches import extract_patches

    root = tmp_path_factory.mktemp("scale_runs")
    runs = {}
    for n in (6, 12):
        man = _manifest(tiny_sources, n, root / f"m{n}.txt")
        col, ing = _counted(lambda man=man, n=n: mt.ingest(man, root / f"s{n}.zarr"))
        _, pre = _counted(lambda n=n: mt.open(root / f"s{n}.zarr").preprocess(gauss=0.8))
        _, again = _counted(lambda n=n: mt.open(root / f"s{n}.zarr").preprocess(gauss=0.8))  # all reused
        c = mt.open(root / f"s{n}.zarr")
        _, mine = _counted(lambda c=c: c.mine(dog=(2, 3), threshold_std=0.5, nms_distance=4, border=4, border_z=2))
        _, pat = _counted(lambda c=c: extract_patches(c, table="candidates", bbox=16, modes=("slab",)))
        runs[n] = {"store": root / f"s{n}.zarr", "ingest": ing, "preprocess": pre, "again": again, "mine": mine,
                   "patches": pat}
    return runs


def test_ingest_lists_the_store_a_constant_number_of_times(scale_runs):
    # each ingested tomogram used to cost a listing of its group (and the consolidation walked the tree)
    assert scale_runs[6]["ingest"]["listings"] == scale_runs[12]["ingest"]["listings"] <= 2
    # a second ingest into the grown store: the new tomograms are not listed either
    assert scale_runs[12]["ingest"]["writes"] > scale_runs[6]["ingest"]["writes"]


def test_incremental_consolidation_equals_a_full_walk(scale_runs):
    store = scale_runs[12]["store"]
    # every stage updated only what it wrote: the same entries as zarr's own walk of the whole store
    col = mt.open(store, mode="r+")
    col.consolidate([], drop=[])  # no node changed: the update keeps every entry
    upd = zarr.open_group(str(store), mode="r", use_consolidated=True).metadata.consolidated_metadata
    col.consolidate()
    full = zarr.open_group(str(store), mode="r", use_consolidated=True).metadata.consolidated_metadata
    assert set(upd.flattened_metadata) == set(full.flattened_metadata)
    assert "tomograms/t011/2" in full.flattened_metadata and not any(k.startswith("staging") for k in full.flattened_metadata)
    for k, v in full.flattened_metadata.items():
        assert upd.flattened_metadata[k].to_dict()["attributes"] == v.to_dict()["attributes"], k
    assert upd.flattened_metadata["patches/candidates-slab-b16"].to_dict()["attributes"]["milotile"]["complete"]
    assert "tables" in upd.flattened_metadata
    imgs = dict(zarr.open_group(str(store), mode="r").attrs["milotile"])["images"]
    assert imgs["tomograms"] == [f"tomograms/t{i:03d}" for i in range(12)] and len(imgs["preprocessed"]) == 12


def test_ingest_into_an_existing_store_updates_the_consolidated_metadata(scale_runs, tiny_sources, tmp_path):
    import shutil

    store = tmp_path / "grow.zarr"
    shutil.copytree(scale_runs[6]["store"], store)
    man = _manifest(tiny_sources, 8, tmp_path / "m8.txt")  # t000..t005 unchanged (skipped), t006, t007 new
    _, st = _counted(lambda: mt.ingest(man, store))
    assert st["listings"] <= 2
    cons = zarr.open_group(str(store), mode="r", use_consolidated=True)
    flat = cons.metadata.consolidated_metadata.flattened_metadata
    assert {"tomograms/t007", "tomograms/t007/0", "tilts/t007/0", "derived/preprocessed/t005"} <= set(flat)
    assert "tomograms/t007" in cons.attrs["milotile"]["images"]["tomograms"]
    assert mt.open(store).names == [f"t{i:03d}" for i in range(8)]


def test_preprocess_metadata_reads_per_tomogram_are_bounded(scale_runs):
    per = {n: scale_runs[n]["preprocess"]["meta_reads"] / n for n in (6, 12)}
    # measured 69 per tomogram (12 tomograms) before: the consolidation walked the tree twice, every
    # lookup of derived/<stage>/<name> read the zarr.json of each level, each tomogram and its level-0
    # array were opened again per use; 36 after. Most of what is left is zarr's own check of every
    # parent's zarr.json when it creates a node (5 nodes per tomogram at depth 3-4: ~20 reads).
    assert per[12] < 42 and per[6] < 44
    assert per[12] <= per[6]  # flat: nothing per tomogram walks the store


def test_mine_and_patches_do_not_list_per_tomogram(scale_runs):
    for stage in ("mine", "patches"):
        assert scale_runs[6][stage]["listings"] == scale_runs[12][stage]["listings"] <= 3, stage
    assert scale_runs[12]["mine"]["meta_reads"] / 12 < 8 and scale_runs[12]["patches"]["meta_reads"] / 12 < 14


def test_preprocess_lists_only_what_it_wrote(scale_runs):
    # the stage end updates the consolidated metadata from the outputs it wrote (a listing of each new
    # output group, plus zarr's listing when it deletes the temporary array), not from a walk of the store
    for n in (6, 12):
        assert scale_runs[n]["preprocess"]["listings"] <= 3 * n + 2
    # a rerun reuses every output: its listings do not grow with the collection
    assert scale_runs[6]["again"]["listings"] == scale_runs[12]["again"]["listings"] <= 2
    assert scale_runs[6]["again"]["writes"] == scale_runs[12]["again"]["writes"]


def test_concurrent_consolidations_keep_every_entry(scale_runs, tmp_path):
    import shutil
    import threading

    store = tmp_path / "conc.zarr"
    shutil.copytree(scale_runs[6]["store"], store)
    cols = [mt.open(store), mt.open(store)]

    def writer(k: int) -> None:
        for i in range(8):  # each update reads the root, adds its node and writes the root back
            path = f"derived/extra{k}/n{i}"
            cols[k].group(path, create=True).attrs["milotile"] = {"complete": True}
            cols[k].consolidate([f"derived/extra{k}", path])

    threads = [threading.Thread(target=writer, args=(k,)) for k in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    flat = zarr.open_group(str(store), mode="r", use_consolidated=True).metadata.consolidated_metadata
    assert {f"derived/extra{k}/n{i}" for k in (0, 1) for i in range(8)} <= set(flat.flattened_metadata)
    assert not list((store / ".locks").glob("*.lock"))


def test_progress_in_a_log_file_is_periodic_lines_not_bars(monkeypatch, caplog, capfd):
    """stderr not a terminal: progress arrives as log lines, never as carriage-return bar runs."""
    import dask.array as da

    import milotile.runtime as rt

    monkeypatch.setattr(rt, "_interactive", lambda: False)
    monkeypatch.setenv("MILOTILE_PROGRESS_INTERVAL", "0")
    x = da.ones((8, 8), chunks=(2, 8))
    with caplog.at_level(logging.INFO, logger="milotile.runtime"):
        (total,) = rt.compute_with_progress([x.sum()], desc="unit")
    assert total == 64
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unit: ")]
    assert lines and lines[-1].startswith("unit: ") and "tasks (100 %)" in lines[-1]
    err = capfd.readouterr().err
    assert "\r" not in err and "[####" not in err


def test_cuda_devices_asks_nvidia_smi_once(tmp_path, monkeypatch):
    """Without torch loaded the GPU count comes from ``nvidia-smi -L``, run once per process."""
    import importlib
    import os
    import sys

    cmod = importlib.import_module("milotile.cluster")  # the package attribute is the function

    calls = tmp_path / "calls"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho x >> {calls}\necho 'GPU 0: A (UUID: a)'\necho 'GPU 1: B (UUID: b)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(cmod, "_SMI_GPUS", [])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert cmod.cuda_devices() == 2 and cmod.cuda_devices() == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert cmod.cuda_devices() == 1
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")
    assert cmod.cuda_devices() == 0
    assert calls.read_text().count("x") == 1
