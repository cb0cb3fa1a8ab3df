"""Client x output table: every image and pick format milotile writes, opened by the real clients.

Builds a small store from a synthetic tomogram (ingest, preprocess, a 2-class heatmap on the picker's
grid, an exploration colour map through ``store.labels.write_labels``, picks), exports the picks in
every format, and runs each client on each output it reads:

* ome-zarr-py ``Reader`` and ome-zarr-models (project venv);
* napari + napari-ome-zarr, headless ``ViewerModel`` (client env ``napari``);
* copick 1.x with zarr 2 (client env ``copick``), on the exported project moved to another folder;
* starfile (STAR + tomograms.star), imodmodel (IMOD), json (ndjson), zarr-python (listing warnings).

Also measures the copick export of one tomogram (whole CLI command, subprocess, peak RSS) against
the naive way (read the volume into memory, write it with zarr in one call).

Usage: ``python benchmarks/interop.py [--size 128,512,512]``; prints the table and writes
``benchmarks/results/interop.json``. Client environments come from ``scripts/client_envs.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, run_measured, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "tests" / "clients"
OUTPUTS = ("tomogram", "preprocessed", "heatmap", "colour map (labels)")


def _client_env(name: str) -> tuple[str | None, float, str]:
    env = dict(os.environ)
    uv = env.get("UV") or next((str(p) for p in (REPO / ".tools/bin/uv", Path(sys.prefix).parent / ".tools/bin/uv")
                                if p.exists()), None)
    if uv:
        env["UV"] = uv
    env.setdefault("PYTHON", sys.executable)
    t0 = time.perf_counter()
    res = subprocess.run(["bash", str(REPO / "scripts/client_envs.sh"), name], capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    if res.returncode != 0:
        return None, dt, res.stderr[-300:]
    return res.stdout.split()[-1], dt, res.stderr.strip()


def _run(py: str, script: str, *args: str, cwd: Path | None = None) -> dict:
    res = subprocess.run([py, str(CLIENTS / script), *args], capture_output=True, text=True, cwd=cwd,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if res.returncode != 0:
        raise RuntimeError(res.stderr[-500:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def build(tmp: Path, size: tuple[int, int, int]) -> tuple[Path, dict]:
    import dask.array as da
    import pandas as pd

    import milotile as mt
    from milotile.ops.grid import Grid
    from milotile.refine.predict import heatmap_metadata
    from milotile.store import write_dask, write_mrc
    from milotile.store.labels import label_colors, write_labels

    rng = np.random.default_rng(0)
    vol = rng.normal(size=size).astype(np.float32)
    write_mrc(tmp / "tomo.rec", vol, voxel_size=10.0)
    del vol
    col = mt.ingest(tmp / "tomo.rec", tmp / "s.zarr")
    col.preprocess(gauss=0.8)
    z, y, x = size
    hm = da.random.random((2, z, y // 2, x // 2), chunks=(1, 64, 128, 128)).astype(np.float32)
    grp = col.group("derived/heatmaps/run1/tomo", create=True)
    write_dask(hm, grp, "0", chunks=(1, 64, 128, 128), dimension_names=("c", "z", "y", "x"))
    grp.attrs["ome"] = heatmap_metadata("tomo", 10.0, Grid.model_output((1, 2, 2), (0, 0, 0)), ["ribosome", "proteasome"])
    grp.attrs["milotile"] = {"complete": True}
    lab = (da.random.randint(0, 5, size=size, chunks=(64, 256, 256))).astype(np.uint16)
    write_labels(col.zarr_group["tomograms/tomo"], "clusters", lab, chunks=(64, 256, 256), scale=[10.0] * 3,
                 colors=label_colors([1, 2, 3, 4]),
                 properties=[{"label-value": v, "name": f"cluster{v}"} for v in range(1, 5)])
    n = 50
    picks = pd.DataFrame({"tomogram": "tomo", "x": rng.uniform(5, x - 6, n), "y": rng.uniform(5, y - 6, n),
                          "z": rng.uniform(5, z - 6, n), "score": rng.uniform(0.3, 1, n), "class": "ribosome",
                          "radius": 6.0})
    col.write_table("picks", picks)
    paths = {"tomogram": "tomograms/tomo", "preprocessed": "derived/preprocessed/tomo",
             "heatmap": "derived/heatmaps/run1/tomo", "colour map (labels)": "tomograms/tomo/labels/clusters"}
    return tmp / "s.zarr", paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", default="64,256,256", help="tomogram z,y,x for the client table")
    ap.add_argument("--export-size", default="128,512,512", help="tomogram z,y,x for the copick export timing")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split(","))
    table: dict[str, dict[str, str]] = {}
    versions: dict[str, str] = {}
    envs: dict[str, dict] = {}
    import importlib.metadata as md

    for pkg in ("zarr", "ome-zarr", "ome-zarr-models", "starfile", "imodmodel"):
        versions[pkg] = md.version(pkg)

    def mark(client: str, output: str, ok: bool, note: str = "") -> None:
        table.setdefault(client, {})[output] = ("PASS" if ok else "FAIL") + (f" ({note})" if note else "")

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        store, paths = build(tmp, size)
        # -- zarr-python listing
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            import zarr

            list(zarr.open_group(str(store), mode="r", use_consolidated=False).members(max_depth=None))
        mark(f"zarr-python {versions['zarr']} (list store)", "store", not w, f"{len(w)} warnings")
        # -- ome-zarr-py Reader
        from ome_zarr.io import parse_url
        from ome_zarr.reader import Reader

        for out, rel in paths.items():
            try:
                nodes = list(Reader(parse_url(str(store / rel)))())
                mark(f"ome-zarr {versions['ome-zarr']} Reader", out, bool(nodes and nodes[0].data))
            except Exception as exc:
                mark(f"ome-zarr {versions['ome-zarr']} Reader", out, False, type(exc).__name__)
        # -- ome-zarr-models
        from ome_zarr_models.v05.image import Image
        from ome_zarr_models.v05.image_label import ImageLabel

        for out, rel in paths.items():
            cls = ImageLabel if "labels" in out else Image
            try:
                cls.from_zarr(zarr.open_group(str(store / rel), mode="r"))
                mark(f"ome-zarr-models {versions['ome-zarr-models']}", out, True)
            except Exception as exc:
                mark(f"ome-zarr-models {versions['ome-zarr-models']}", out, False, str(exc)[:60])
        # -- napari
        py, dt, msg = _client_env("napari")
        envs["napari"] = {"seconds": round(dt, 1), "log": msg}
        if py:
            res = _run(py, "napari_check.py", *[str(store / p) for p in paths.values()])
            v = res["versions"]
            client = f"napari {v['napari']} + napari-ome-zarr {v['napari-ome-zarr']}"
            for out, rel in paths.items():
                r = res["results"][str(store / rel)]
                layers = r.get("layers", [])
                ok = "error" not in r and bool(layers)
                note = r.get("error", "")[:60] or ", ".join(f"{la['type']} scale {la['scale']}" for la in layers[:2])
                mark(client, out, ok, note)
        # -- picks in every format
        import milotile as mt
        from milotile.formats import export, read_labels

        col = mt.open(store)
        picks = col.read_table("picks")
        ex = tmp / "exports"
        for fmt in ("imod", "star", "copick", "ndjson", "csv", "milopyp"):
            export(picks, fmt, ex / fmt if fmt != "csv" else ex / "picks.csv", col=col)
        import imodmodel
        import starfile

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mod = imodmodel.read(ex / "imod" / "tomo.mod")
        mark(f"imodmodel {versions['imodmodel']}", "picks: IMOD .mod", len(mod) == len(picks)
             and np.allclose(np.sort(mod["x"]), np.sort(picks["x"]) + 0.5, atol=1e-3), "x,y = voxel + 0.5")
        part = starfile.read(ex / "star" / "particles.star")
        tomos = starfile.read(ex / "star" / "tomograms.star")
        back = read_labels(ex / "star" / "particles.star")
        ok = len(part) == len(picks) and int(tomos["rlnTomoSizeX"].iloc[0]) == size[2] and np.allclose(
            np.sort(back["x"]), np.sort(picks["x"]), atol=1e-3)
        mark(f"starfile {versions['starfile']}", "picks: RELION-5 STAR + tomograms.star", ok, "round trip")
        lines = [json.loads(ln) for ln in (ex / "ndjson" / "tomo" / "ribosome.ndjson").read_text().splitlines()]
        mark("json (portal ndjson)", "picks: ndjson", len(lines) == len(picks))
        # -- copick, project moved elsewhere
        py, dt, msg = _client_env("copick")
        envs["copick"] = {"seconds": round(dt, 1), "log": msg}
        if py:
            moved = tmp / "moved" / "project"
            shutil.move(str(ex / "copick"), moved)
            res = _run(py, "copick_check.py", "copick_config.json", cwd=moved)
            client = f"copick {res['versions']['copick']} (zarr {res['versions']['zarr']})"
            run = res["runs"]["tomo"]
            tomo = run["voxel_spacings"]["10.000"]["wbp"]
            mean0 = float(col["tomo"].data(0).mean(dtype=np.float64).compute())
            mark(client, "tomogram", tomo["numpy_shape"] == list(size) and abs(tomo["numpy_mean"] - mean0) < 1e-5,
                 f"NGFF {tomo['version']}, {len(tomo['levels'])} levels")
            pk = run["picks"][0]
            mark(client, "picks: copick JSON", pk["n"] == len(picks) and np.allclose(
                np.sort(np.asarray(pk["positions_A"])[:, 0]), np.sort(picks["x"] * 10.0)), "Å, scores")
            for out in ("preprocessed", "heatmap", "colour map (labels)"):
                table[client][out] = "n/a (copick project carries tomograms and picks)"
    # -- copick export: whole CLI command vs the naive in-memory write
    esize = tuple(int(v) for v in args.export_size.split(","))
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        import milotile as mt
        from milotile.store import write_mrc

        write_mrc(tmp / "big.rec", np.random.default_rng(1).normal(size=esize).astype(np.float32), voxel_size=10.0)
        col = mt.ingest(tmp / "big.rec", tmp / "b.zarr")
        import pandas as pd

        pd.DataFrame({"tomogram": ["big"], "x": [10.0], "y": [10.0], "z": [10.0]}).to_csv(tmp / "p.csv", index=False)
        cli = [sys.executable, "-m", "milotile.cli", "-q", "export", str(tmp / "p.csv"), "--format", "copick",
               "--out", str(tmp / "cp"), "--store", str(tmp / "b.zarr")]
        wall, rss, _ = run_measured(cli)
        naive_code = (
            "import numpy as np, zarr, numcodecs, milotile as mt\n"
            f"v = mt.open({str(tmp / 'b.zarr')!r})['big'].data(0).compute()\n"
            f"g = zarr.open_group({str(tmp / 'naive.zarr')!r}, mode='w', zarr_format=2)\n"
            "g.create_array('0', data=v, chunks=(256, 256, 256), compressors=numcodecs.Blosc('lz4', 5))\n"
        )
        nwall, nrss, _ = run_measured([sys.executable, "-c", naive_code])
        export_fig = {"size_zyx": list(esize), "volume_mib": int(np.prod(esize) * 4 / 2**20),
                      "cli_seconds": round(wall, 2), "cli_peak_rss_mib": round(rss / 2**20),
                      "naive_seconds_level0_only": round(nwall, 2), "naive_peak_rss_mib": round(nrss / 2**20),
                      "rss_ratio_cli_over_naive": round(rss / nrss, 2), "time_ratio_cli_over_naive": round(wall / nwall, 2)}
    print("\nclient x output (as run)\n")
    cols = list(OUTPUTS) + sorted({o for r in table.values() for o in r} - set(OUTPUTS))
    for client, row in table.items():
        for out in cols:
            if out in row:
                print(f"  {client:45s} {out:40s} {row[out]}")
    print("\nclient environments:", {k: v["seconds"] for k, v in envs.items()}, "s")
    print("copick export (whole CLI, 3 levels NGFF 0.4) vs naive level-0 in-memory write:", export_fig)
    path = write_results("interop", {"table": table, "versions": versions, "client_envs": envs,
                                     "copick_export": export_fig, "size_zyx": list(size),
                                     "load_avg_end": os.getloadavg()[0], "machine_end": machine()})
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
