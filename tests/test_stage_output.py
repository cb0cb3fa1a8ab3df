"""One stage-output helper: reuse only with unchanged parameters and sources; stale data is never reused.

Also the re-ingest checks (issue 10, item 2): a changed tilt stack or angle file is detected, a .rec
rewritten with the same size and modification time is detected, ``--overwrite`` makes what depends on
the replaced input stale, and ``milotile info`` marks stale and incomplete outputs.
"""

from __future__ import annotations

import os
import shutil

import mrcfile
import numpy as np
import pytest

import milotile as mt
from milotile.cli import main as cli_main
from milotile.errors import InputError
from milotile.stages import preprocess
from milotile.store import read_manifest


@pytest.fixture()
def store(tmp_path_factory, tmp_path):
    src = tmp_path_factory.getbasetemp() / "stage_output_synth"
    if not src.exists():
        from milotile.synth import synth

        synth(src, seed=4, n_tomograms=1, size=(32, 64, 64), n_particles=6, filament=False, angles=(-30, 30, 10))
    data = tmp_path / "data"
    shutil.copytree(src, data)
    manifest = next(data.glob("*.txt"))
    col = mt.ingest(manifest, tmp_path / "s.zarr")
    return col, manifest, read_manifest(manifest)[0]


def test_reuse_needs_same_params_and_sources(store):
    col, _, _ = store
    name = col.names[0]
    sources = {f"tomograms/{name}": col.source_token(f"tomograms/{name}")}
    out = col.stage_output("derived/test/x", {"a": 1}, sources)
    assert not out.reusable
    with out:
        out.begin()
        assert col.output_status("derived/test/x") == "incomplete"
        out.finish(value=3)
    assert col.stage_output("derived/test/x", {"a": 1}, sources).reusable
    assert col.stage_output("derived/test/x", {"a": 1}, sources).meta["value"] == 3
    assert not col.stage_output("derived/test/x", {"a": 2}, sources).reusable
    assert not col.stage_output("derived/test/x", {"a": 1}, {f"tomograms/{name}": "other"}).reusable
    assert col.output_status("derived/test/x") == "complete"


def test_changed_tilt_stack_invalidates_derived_tilts(store, capsys):
    col, manifest, src = store
    name = src.name
    preprocess(col, gauss=0.5)
    assert col.output_status(f"derived/preprocessed_tilts/{name}") == "complete"
    bank = col.patches(bbox=12, modes=("tiltsum",), table=_table(col), tilt_sign=1)
    assert col.output_status(f"patches/{bank.key}") == "complete"
    with mrcfile.open(src.tilt_path, mode="r+") as m:  # another tilt stack of the same shape
        m.data[:] = m.data[::-1].copy()
    with pytest.raises(InputError, match="tilt series"):
        mt.ingest(manifest, col)
    col = mt.ingest(manifest, col.url, overwrite=True)
    assert col.output_status(f"derived/preprocessed_tilts/{name}") == "stale"
    assert col.output_status(f"derived/preprocessed/{name}") == "complete"  # the tomogram did not change
    assert col.output_status(f"patches/{bank.key}") == "stale"  # tilt-sum patches of the old tilts
    assert cli_main(["info", str(col.url)]) == 0
    assert f"{name} (stale)" in capsys.readouterr().out
    t0 = dict(col.zarr_group[f"derived/preprocessed_tilts/{name}"].attrs["milotile"])
    preprocess(col, gauss=0.5)  # recomputed from the new tilts, not reused
    t1 = dict(col.zarr_group[f"derived/preprocessed_tilts/{name}"].attrs["milotile"])
    assert t1["sources"] != t0["sources"] and col.output_status(f"derived/preprocessed_tilts/{name}") == "complete"
    new = np.asarray(col.zarr_group[f"tilts/{name}/0"][:])
    with mrcfile.open(src.tilt_path) as m:
        np.testing.assert_array_equal(new, m.data)


def _table(col) -> str:
    """A small coordinate table (the tomogram centre)."""
    import pandas as pd

    t = col[col.names[0]]
    z, y, x = (s / 2 for s in t.shape)
    col.write_table("centre", pd.DataFrame({"tomogram": [t.name], "x": [x], "y": [y], "z": [z]}))
    return "centre"


def test_stale_upstream_makes_downstream_stale(store):
    col, manifest, src = store
    preprocess(col, gauss=0.5, tilts=False)
    mt.open(col.url).mine(dog=(2, 4), border=4, border_z=2)
    assert col.output_status("tables/candidates") == "complete"
    with mrcfile.open(src.rec_path, mode="r+") as m:
        m.data[:] = m.data * 2.0 + 1.0
    col = mt.ingest(manifest, col.url, overwrite=True)
    assert col.output_status(f"derived/preprocessed/{src.name}") == "stale"
    assert col.output_status("tables/candidates") == "stale"  # mined from a stale volume


def test_changed_angles_are_detected(store):
    col, manifest, src = store
    lines = open(src.angle_path).read().split()
    lines[0] = str(float(lines[0]) + 1.0)
    with open(src.angle_path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with pytest.raises(InputError, match="tilt series"):
        mt.ingest(manifest, col)


def test_same_size_same_mtime_rewrite_is_detected(store):
    col, manifest, src = store
    st = os.stat(src.rec_path)
    with mrcfile.open(src.rec_path, mode="r+") as m:
        m.data[:] = -m.data
    os.utime(src.rec_path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(src.rec_path).st_size == st.st_size and os.stat(src.rec_path).st_mtime_ns == st.st_mtime_ns
    with pytest.raises(InputError, match="changed"):
        mt.ingest(manifest, col)
    os.utime(src.rec_path)  # a touch alone is not a change once the content is the ingested one
    with mrcfile.open(src.rec_path, mode="r+") as m:
        m.data[:] = -m.data
    assert mt.ingest(manifest, col).names == [src.name]


def test_info_never_lists_incomplete_output_as_done(store, capsys):
    col, _, src = store
    preprocess(col, gauss=0.5, tilts=False)
    g = col.zarr_group[f"derived/preprocessed/{src.name}"]
    g.attrs["milotile"] = {**dict(g.attrs["milotile"]), "complete": False}  # as after kill -9
    assert cli_main(["info", str(col.url)]) == 0
    assert f"preprocessed: {src.name} (incomplete)" in capsys.readouterr().out
    assert col.derived() == {"preprocessed": []}


def test_tomogram_listing_is_read_once(store, monkeypatch):
    col, _, _ = store
    col = mt.open(col.url)
    names = col.names
    col.tilt_series(names[0])  # tomograms and tilt series: one listing each, then cached

    def no_listing(*a, **k):
        raise AssertionError("the store was listed again")

    monkeypatch.setattr(col, "group", no_listing)
    for n in names:  # per-tomogram access must not list the store again (no N² listings)
        assert col[n].name == n and n in col
        col.tilt_series(n)
