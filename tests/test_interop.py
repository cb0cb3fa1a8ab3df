"""Interoperability with the tools users live in, checked with the real clients.

* ome-zarr-py's ``Reader`` (project venv, ``ngff`` extra) opens every image milotile writes;
* napari with napari-ome-zarr (headless ``ViewerModel``) opens tomograms, preprocessed volumes,
  heatmaps and label images at the right scale, overlaid on the tomogram;
* copick (1.x, zarr 2) reads a whole exported project, moved to another folder; milotile ingests a
  project written by copick itself without changing a byte of it;
* the store is a clean Zarr hierarchy: no warnings when listed, consolidated metadata, no local
  absolute paths in attributes.

napari and copick run in their own environments (``scripts/client_envs.sh``), in a subprocess; the
tests that need them skip with the reason when the environment cannot be created.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import zarr

import milotile as mt
from milotile.formats import export, read_labels
from milotile.ops.grid import Grid
from milotile.refine.predict import heatmap_metadata
from milotile.store import write_dask, write_mrc
from milotile.store.labels import label_colors, write_labels

REPO = Path(__file__).resolve().parents[1]
CLIENTS = REPO / "tests" / "clients"
VS = 10.0
SHAPE = (24, 48, 40)


# ------------------------------------------------------------------------------------ client envs
def _uv() -> str | None:
    for cand in (os.environ.get("UV"), REPO / ".tools" / "bin" / "uv", Path(sys.prefix).parent / ".tools" / "bin" / "uv",
                 shutil.which("uv")):
        if cand and Path(cand).is_file() and os.access(cand, os.X_OK):
            return str(cand)
    return None


@functools.cache
def client_python(name: str) -> str:
    """Python of the client environment ``name`` (created on first use), or skip the test."""
    env = dict(os.environ)
    uv = _uv()
    if uv:
        env["UV"] = uv
    env.setdefault("PYTHON", sys.executable)
    try:
        res = subprocess.run(["bash", str(REPO / "scripts" / "client_envs.sh"), name], capture_output=True,
                             text=True, env=env, timeout=900)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{name} client environment could not be created ({exc})")
    if res.returncode != 0:
        pytest.skip(f"{name} client environment could not be created (no package index?): {res.stderr[-400:]}")
    line = [ln for ln in res.stdout.splitlines() if ln.startswith(name + " ")][-1]
    return line.split(" ", 1)[1]


def run_client(name: str, script: str, *args: str, cwd: Path | None = None) -> dict:
    """Run ``tests/clients/<script>`` in the client environment and return its JSON output."""
    py = client_python(name)
    res = subprocess.run([py, str(CLIENTS / script), *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert res.returncode == 0, f"{script} failed:\n{res.stderr[-3000:]}"
    return json.loads(res.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ a store with every output
@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """Tomogram (3 levels), preprocessed volume, 2-class heatmap (stride 1, 2, 2), colour-map labels, picks."""
    tmp = tmp_path_factory.mktemp("interop")
    rng = np.random.default_rng(0)
    vol = rng.normal(size=SHAPE).astype(np.float32)
    write_mrc(tmp / "ta.rec", vol, voxel_size=VS)
    col = mt.ingest(tmp / "ta.rec", tmp / "s.zarr", chunks=(8, 16, 16))
    col.preprocess(gauss=0.8)
    # heatmap on the picker's output grid: stride (1, 2, 2), offset 0 (what pick() writes)
    hm = da.from_array(rng.random((2, SHAPE[0], SHAPE[1] // 2, SHAPE[2] // 2)).astype(np.float32), chunks=(1, 8, 8, 8))
    grp = col.group("derived/heatmaps/run1/ta", create=True)
    write_dask(hm, grp, "0", chunks=(1, 8, 8, 8), dimension_names=("c", "z", "y", "x"))
    grp.attrs["ome"] = heatmap_metadata("ta", VS, Grid.model_output((1, 2, 2), (0.0, 0.0, 0.0)), ["ribosome", "proteasome"])
    grp.attrs["milotile"] = {"complete": True}
    # exploration colour map: cluster labels on the tomogram grid, through the one labels writer
    lab = da.from_array((np.arange(np.prod(SHAPE)).reshape(SHAPE) % 4).astype(np.uint16), chunks=(8, 16, 16))
    write_labels(col.zarr_group["tomograms/ta"], "clusters", lab, chunks=(8, 16, 16), scale=[VS] * 3,
                 colors=label_colors([1, 2, 3]),
                 properties=[{"label-value": v, "name": f"c{v}"} for v in (1, 2, 3)])
    picks = pd.DataFrame({"tomogram": "ta", "x": [5.0, 20.0, 30.5], "y": [10.0, 25.0, 40.0], "z": [3.0, 12.0, 20.0],
                          "score": [0.9, 0.8, 0.7], "class": "ribosome", "radius": 4.0})
    col.write_table("picks", picks)
    return tmp / "s.zarr"


IMAGES = {
    "tomogram": "tomograms/ta",
    "preprocessed": "derived/preprocessed/ta",
    "heatmap": "derived/heatmaps/run1/ta",
    "labels": "tomograms/ta/labels/clusters",
}


def _extent(scale, translate, shape):
    """Physical (z, y, x) interval covered by an image: voxel centres +- half a voxel."""
    s, t, n = (np.asarray(v, dtype=float)[-3:] for v in (scale, translate, shape))
    return np.stack([t - s / 2, t + (n - 0.5) * s], axis=1)


# ------------------------------------------------------------------------------------ clean hierarchy
def test_store_lists_without_warnings_and_is_consolidated(store):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        grp = zarr.open_group(str(store), mode="r", use_consolidated=False)
        members = dict(grp.members(max_depth=None))
        grp.tree()
    assert "tables" in members and isinstance(members["tables"], zarr.Array)  # opaque node: files hidden
    assert (store / "tables" / "picks.parquet").exists()
    cons = zarr.open_group(str(store), mode="r", use_consolidated=True)
    assert cons.metadata.consolidated_metadata is not None
    listed = {k for k, _ in cons.members(max_depth=None)}
    for path in IMAGES.values():
        assert path in listed, f"{path} missing from the consolidated metadata"
    images = dict(cons.attrs["milotile"])["images"]
    assert images["tomograms"] == ["tomograms/ta"] and images["labels"] == ["tomograms/ta/labels/clusters"]
    assert images["heatmaps"] == ["derived/heatmaps/run1/ta"]


def _strings(obj):
    if isinstance(obj, str):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _strings(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _strings(v)


def test_no_absolute_local_paths_in_attributes(store):
    grp = zarr.open_group(str(store), mode="r", use_consolidated=False)
    nodes = [grp] + [n for _, n in grp.members(max_depth=None)]
    bad = [(n.path, s) for n in nodes for s in _strings(dict(n.attrs)) if os.path.isabs(s) or str(store.parent) in s]
    assert not bad, bad
    meta = dict(grp["tomograms/ta"].attrs["milotile"])
    assert meta["source"] == "../ta.rec"  # relative to the store folder: survives moving both together
    col = mt.open(store, mode="r")
    assert Path(col.resolve_path(meta["source"])) == store.parent / "ta.rec"


def test_legacy_store_tables_folder_migrated(tmp_path, caplog):
    write_mrc(tmp_path / "a.rec", np.random.default_rng(1).normal(size=(8, 16, 16)).astype(np.float32), voxel_size=5.0)
    col = mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=(8, 16, 16))
    col.write_table("t", pd.DataFrame({"a": [1, 2]}))
    os.remove(tmp_path / "s.zarr" / "tables" / "zarr.json")  # a store from before the opaque nodes
    with pytest.warns(UserWarning, match="not recognized"):
        dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r", use_consolidated=False).members(max_depth=None))
    with caplog.at_level("WARNING"):
        ro = mt.open(tmp_path / "s.zarr", mode="r")
    assert "older milotile" in caplog.text and ro.read_table("t")["a"].tolist() == [1, 2]
    mt.open(tmp_path / "s.zarr")  # writable open adds the marker
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dict(zarr.open_group(str(tmp_path / "s.zarr"), mode="r", use_consolidated=False).members(max_depth=None))
    assert mt.open(tmp_path / "s.zarr", mode="r").read_table("t")["a"].tolist() == [1, 2]


# ------------------------------------------------------------------------------------ ome-zarr-py (always)
def test_ome_zarr_reader_opens_every_image(store):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Label, Multiscales, Reader

    seen, all_nodes = {}, {}
    for kind, rel in IMAGES.items():
        nodes = list(Reader(parse_url(str(store / rel)))())
        assert nodes, f"{kind}: ome-zarr found nothing at {rel}"
        node = nodes[0]
        assert any(isinstance(s, Multiscales) for s in node.specs), kind
        seen[kind], all_nodes[kind] = node, nodes
    assert [d.shape for d in seen["tomogram"].data] == [SHAPE, (12, 24, 20), (6, 12, 10)]
    assert seen["heatmap"].data[0].shape == (2, 24, 24, 20)
    chans = seen["heatmap"].metadata["channel_names"]
    assert chans == ["ribosome", "proteasome"] and len(seen["heatmap"].metadata["colormap"]) == 2
    label = [n for n in all_nodes["labels"] if any(isinstance(s, Label) for s in n.specs)]
    assert label, "image-label metadata not recognised"
    assert sorted(label[0].metadata["color"]) == [1, 2, 3]  # the colour table, one colour per cluster
    assert label[0].metadata["properties"][2] == {"name": "c2"}
    # the image lists its labels: ome-zarr finds them from the tomogram too
    labels_nodes = list(Reader(parse_url(str(store / "tomograms/ta/labels")))())
    assert any(n.data and n.data[0].shape == SHAPE for n in labels_nodes)


def test_ome_zarr_models_validate_every_image(store):
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    # (the tomogram with its labels is not validated here: ome-zarr-models 1.7 requires a label image to
    # have as many levels as its image, and store.labels writes one level; its NGFF 0.4 copy is checked
    # in test_export_ngff04_cli_zarr_v2)
    ImageLabel.from_zarr(zarr.open_group(str(store / IMAGES["labels"]), mode="r"))
    Image.from_zarr(zarr.open_group(str(store / IMAGES["preprocessed"]), mode="r"))
    heat = Image.from_zarr(zarr.open_group(str(store / IMAGES["heatmap"]), mode="r"))
    assert [a.name for a in heat.attributes.ome.multiscales[0].axes] == ["c", "z", "y", "x"]


def test_export_ngff04_cli_zarr_v2(store, tmp_path):
    from ome_zarr_models.v04.image import Image as Image04

    from milotile.cli import main as cli_main

    assert cli_main(["export-ngff", "--store", str(store), "--out", str(tmp_path / "ngff")]) in (0, None)
    grp = zarr.open_group(str(tmp_path / "ngff" / "ta.zarr"), mode="r", zarr_format=2)
    Image04.from_zarr(grp)  # valid NGFF 0.4
    assert grp.attrs["multiscales"][0]["version"] == "0.4"
    t = mt.open(store, mode="r")["ta"]
    for level in t.levels:
        np.testing.assert_array_equal(grp[str(level)][:], t.data(level).compute())


# ------------------------------------------------------------------------------------ napari
@pytest.mark.slow
@pytest.mark.client("napari")
def test_napari_opens_every_layer_overlaid(store):
    out = run_client("napari", "napari_check.py", *[str(store / p) for p in IMAGES.values()])
    res = {k: out["results"][str(store / p)] for k, p in IMAGES.items()}
    for kind, r in res.items():
        assert "error" not in r, f"napari could not open the {kind}: {r.get('error')}"
    tomo = res["tomogram"]["layers"]
    assert tomo[0]["type"] == "Image" and tomo[0]["multiscale"] and tomo[0]["levels"] == 3
    assert tomo[0]["scale"] == [VS, VS, VS] and tomo[0]["world_origin"] == [0, 0, 0]
    # opening the tomogram also overlays its label images (listed in <image>/labels)
    assert [(la["type"], la["shape"]) for la in tomo[1:]] == [("Labels", list(SHAPE))]
    # layers are named after the tomogram and the colour map (not "data", "labels/labels/clusters")
    assert [la["name"] for la in tomo] == ["ta: tomogram", "ta: clusters"]
    assert res["preprocessed"]["layers"][0]["name"] == "ta: preprocessed"
    ref = _extent(tomo[0]["scale"], tomo[0]["translate"], tomo[0]["shape"])
    heat = res["heatmap"]["layers"]
    assert [h["type"] for h in heat] == ["Image", "Image"]  # one layer per class (channel axis)
    assert {h["name"] for h in heat} == {"ta: ribosome", "ta: proteasome"}
    for h in heat:
        assert h["scale"] == [VS, 2 * VS, 2 * VS]
        assert h["contrast_limits"] == [0.0, 1.0]  # the omero window
    lab = [la for la in res["labels"]["layers"] if la["type"] == "Labels"]
    assert len(lab) == 1 and lab[0]["scale"] == [VS] * 3 and lab[0]["shape"] == list(SHAPE)
    pre = res["preprocessed"]["layers"][0]
    assert pre["scale"] == [VS, VS, VS] and pre["world_origin"] == [0, 0, 0]
    # every layer covers the tomogram's physical extent: they overlay (napari-ome-zarr 0.10 drops dataset
    # *translations*, so layers on a coarser grid with a translation would land up to half a coarse voxel
    # off; the stride-2 heatmap has none and the labels are on the tomogram grid)
    for layer in (pre, heat[0], lab[0]):
        ext = _extent(layer["scale"], layer["world_origin"], layer["shape"])
        np.testing.assert_allclose(ext, ref, atol=VS)
    np.testing.assert_allclose(_extent(lab[0]["scale"], lab[0]["world_origin"], lab[0]["shape"]), ref)
    np.testing.assert_allclose(_extent(heat[0]["scale"], heat[0]["world_origin"], heat[0]["shape"])[0], ref[0])
    print("napari versions", out["versions"])


# ------------------------------------------------------------------------------------ copick
@pytest.mark.slow
@pytest.mark.client("copick")
def test_copick_reads_exported_project_from_another_folder_and_after_moving_it(store, tmp_path):
    col = mt.open(store)
    picks = col.read_table("picks")
    files = export(picks, "copick", tmp_path / "proj", col=col, tomo_type="wbp")
    assert tmp_path / "proj" / "ExperimentRuns" / "ta" / "VoxelSpacing10.000" / "wbp.zarr" in files
    cfg = json.loads((tmp_path / "proj" / "copick_config.json").read_text())
    assert cfg["overlay_root"] == f"local://{(tmp_path / 'proj').resolve().as_posix()}"
    assert cfg["pickable_objects"][0]["radius"] == pytest.approx(4.0 * VS)
    # copick run from a folder that is not the project's (copick 1.31 resolves a relative root there)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = run_client("copick", "copick_check.py", str(tmp_path / "proj" / "copick_config.json"), cwd=elsewhere)
    run = out["runs"]["ta"]
    tomo = run["voxel_spacings"]["10.000"]["wbp"]
    assert tomo["version"] == "0.4" and tomo["numpy_shape"] == list(SHAPE)
    t = col["ta"]
    assert tomo["numpy_mean"] == pytest.approx(float(t.data(0).mean(dtype=np.float64).compute()), rel=1e-5, abs=1e-7)
    for lvl in tomo["levels"]:
        level = int(lvl["path"])
        assert lvl["shape"] == list(t.data(level).shape)
        assert lvl["scale"] == [VS * 2**level] * 3
        assert lvl["mean"] == pytest.approx(float(t.data(level).mean(dtype=np.float64).compute()), rel=1e-5, abs=1e-7)
    (p,) = run["picks"]
    assert p["object"] == "ribosome" and p["user_id"] == "milotile" and p["n"] == 3
    np.testing.assert_allclose(p["positions_A"], picks[["x", "y", "z"]].to_numpy() * VS)
    assert p["scores"] == pytest.approx(picks["score"].tolist())
    # a relative root keeps the tree movable; copick then runs from inside the project
    export(picks, "copick", tmp_path / "rel", col=col, tomo_type="wbp", overlay_root="local://.")
    moved = elsewhere / "project"
    shutil.move(str(tmp_path / "rel"), moved)
    out_moved = run_client("copick", "copick_check.py", "copick_config.json", cwd=moved)
    assert out_moved["runs"]["ta"]["picks"][0]["n"] == 3
    assert out_moved["runs"]["ta"]["voxel_spacings"]["10.000"]["wbp"]["numpy_shape"] == list(SHAPE)
    # and milotile reads the moved project back to the same voxels
    back = read_labels(moved / "copick_config.json", col)
    np.testing.assert_allclose(back[["x", "y", "z"]].to_numpy(), picks[["x", "y", "z"]].to_numpy())
    print("copick versions", out["versions"])


def test_copick_export_radius_defaults_to_the_pickers_box(store, tmp_path):
    """A picks table from `refine pick` records half the picker's box; export uses it without --radius."""
    from milotile.cli import main as cli_main

    col = mt.open(store)
    picks = col.read_table("picks").drop(columns="radius")
    col.write_table("picks-box", picks, params={"radius": 6.0, "nms_distance": 6.0})
    rc = cli_main(["export", "picks-box", "--format", "copick", "--store", str(store), "--out", str(tmp_path / "p")])
    assert rc == 0
    cfg = json.loads((tmp_path / "p" / "copick_config.json").read_text())
    assert cfg["pickable_objects"][0]["radius"] == pytest.approx(6.0 * VS)


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
@pytest.mark.client("copick")
def test_ingest_copick_project_written_by_copick_leaves_it_untouched(tmp_path):
    rng = np.random.default_rng(3)
    vol = rng.normal(size=(20, 36, 44)).astype(np.float32)
    pts_a = np.array([[100.0, 150.0, 50.0], [300.0, 200.0, 120.0]])  # x, y, z in Å
    np.save(tmp_path / "vol.npy", vol)
    np.save(tmp_path / "pts.npy", pts_a)
    made = run_client("copick", "copick_make.py", str(tmp_path / "proj"), str(tmp_path / "vol.npy"), str(tmp_path / "pts.npy"))
    before = _tree_digest(tmp_path / "proj")
    from milotile.cli import main as cli_main

    rc = cli_main(["ingest", made["config"], "--store", str(tmp_path / "s.zarr")])
    assert rc in (0, None)
    assert _tree_digest(tmp_path / "proj") == before  # not one byte written into the copick tree
    col = mt.open(tmp_path / "s.zarr", mode="r")
    assert col.names == ["TS-1"] and col["TS-1"].voxel_size == pytest.approx(10.0)
    np.testing.assert_array_equal(col["TS-1"].data().compute(), vol)
    picks = col.read_table("copick-picks")
    np.testing.assert_allclose(picks[["x", "y", "z"]].to_numpy(), pts_a / 10.0)
    assert set(picks["class"]) == {"ribosome"}
