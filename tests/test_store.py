"""Collection store and ingest: round trips, OME-Zarr validity, resumability and bad input."""

from __future__ import annotations

import os

import mrcfile
import numpy as np
import pytest
import xarray as xr
import zarr

import milotile as mt
from milotile.cli import main as cli_main
from milotile.errors import InputError
from milotile.store import write_mrc

CHUNKS = (16, 32, 32)


def _vol(shape=(20, 40, 50), seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _store_snapshot(path):
    """Every file in a store with its size and mtime (to prove nothing was written)."""
    out = {}
    for root, _dirs, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            st = os.stat(p)
            out[p] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.mark.parametrize("order", ["zxy", "xzy", "xyz", "yxz"])
def test_round_trip_exact_for_every_order(tmp_path, order):
    v = _vol()
    rec = tmp_path / f"t_{order}.rec"
    write_mrc(rec, v, voxel_size=6.5, order=order)
    col = mt.ingest(rec, tmp_path / "s.zarr", order=order, chunks=CHUNKS)
    t = col[f"t_{order}"]
    assert t.shape == v.shape
    np.testing.assert_array_equal(t.data().compute(), v)
    assert t.voxel_size == pytest.approx(6.5)
    stats = t.meta["stats"]  # global statistics gathered in the copy pass
    assert stats["mean"] == pytest.approx(float(v.mean(dtype=np.float64)), abs=1e-9)
    assert stats["std"] == pytest.approx(float(v.std(dtype=np.float64)), rel=1e-9)
    # and back to MRC in the same order: identical bytes of data
    back = tmp_path / "back.mrc"
    write_mrc(back, t.data().compute(), voxel_size=t.voxel_size, order=order)
    with mrcfile.open(rec) as a, mrcfile.open(back) as b:
        np.testing.assert_array_equal(a.data, b.data)


def test_volume_is_lazy_xarray_with_angstrom_coords(tmp_path):
    v = _vol((20, 40, 50))
    write_mrc(tmp_path / "a.rec", v, voxel_size=10.0)
    col = mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    vol = col["a"].volume(level=0)
    assert isinstance(vol, xr.DataArray)
    assert vol.dims == ("z", "y", "x")
    assert vol.chunks is not None  # dask-backed
    assert vol.coords["x"].values[:3].tolist() == [0.0, 10.0, 20.0]
    lvl1 = col["a"].volume(level=1)
    assert lvl1.shape == (10, 20, 25)
    # level 1 voxel centres sit between level-0 voxel pairs
    assert lvl1.coords["x"].values[0] == pytest.approx(5.0)
    np.testing.assert_allclose(lvl1.values[0, 0, 0], v[:2, :2, :2].mean(), rtol=1e-5)
    assert col["a"].levels == [0, 1, 2]


def test_ome_zarr_validates_with_reference_reader(tmp_path):
    write_mrc(tmp_path / "a.rec", _vol((24, 48, 48)), voxel_size=8.0)
    mt.ingest(tmp_path / "a.rec", tmp_path / "s.zarr", chunks=CHUNKS)
    path = tmp_path / "s.zarr" / "tomograms" / "a"
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Multiscales, Reader

    nodes = list(Reader(parse_url(str(path)))())
    ms = [n for n in nodes if any(isinstance(s, Multiscales) for s in n.specs)]
    assert ms, "ome-zarr reader did not recognise the multiscale image"
    data = ms[0].data
    assert [tuple(d.shape) for d in data] == [(24, 48, 48), (12, 24, 24), (6, 12, 12)]
    meta = zarr.open_group(str(path), mode="r").attrs["ome"]
    assert meta["version"] == "0.5"
    assert [a["unit"] for a in meta["multiscales"][0]["axes"]] == ["angstrom"] * 3
    from ome_zarr_models.v05.image import Image

    Image.from_zarr(zarr.open_group(str(path), mode="r"))  # raises if invalid


def test_tilt_series_stored_with_angles(tmp_path):
    v = _vol((16, 40, 50))
    write_mrc(tmp_path / "t.rec", v, voxel_size=10.0)
    stack = _vol((5, 40, 50), seed=1)
    write_mrc(tmp_path / "t.mrc", stack, voxel_size=10.0)
    (tmp_path / "t.tlt").write_text("\n".join(str(a) for a in (-40, -20, 0, 20, 40)))
    col = mt.ingest(tmp_path, tmp_path / "s.zarr", chunks=CHUNKS)  # folder: tilt picked up by name
    assert col.names == ["t"]
    ts = col["t"].tilt_series
    assert ts is not None
    np.testing.assert_array_equal(ts.data.compute(), stack)
    np.testing.assert_array_equal(ts.angles, [-40, -20, 0, 20, 40])
    assert ts.tilt_axis_angle == 0.0 and ts.pixel_size == pytest.approx(10.0)


def test_manifest_and_reingest_is_noop_and_changed_file_needs_overwrite(tmp_path):
    write_mrc(tmp_path / "a.rec", _vol(), voxel_size=5.0)
    write_mrc(tmp_path / "b.rec", _vol(seed=2), voxel_size=5.0)
    man = tmp_path / "list.txt"
    man.write_text("image_name\trec_path\na\ta.rec\nb   b.rec\n")
    store = tmp_path / "s.zarr"
    col = mt.ingest(man, store, chunks=CHUNKS)
    assert col.names == ["a", "b"]
    snap = _store_snapshot(store)
    mt.ingest(man, store, chunks=CHUNKS)
    assert _store_snapshot(store) == snap  # unchanged files: nothing rewritten
    new = _vol(seed=3)
    write_mrc(tmp_path / "a.rec", new, voxel_size=5.0)
    with pytest.raises(InputError, match="pass --overwrite"):
        mt.ingest(man, store, chunks=CHUNKS)
    assert _store_snapshot(store) == snap
    col = mt.ingest(man, store, chunks=CHUNKS, overwrite=True)
    np.testing.assert_array_equal(col["a"].data().compute(), new)


def test_reingest_sees_an_edit_between_the_sampled_blocks(tmp_path, capsys):
    """Same size, mtime restored, edit where the sampled check never looks: the whole-file hash sees it."""
    rec = tmp_path / "a.rec"
    write_mrc(rec, _vol((32, 256, 256)), voxel_size=5.0)  # 8 MiB: above the sampled check's 6 MiB
    store = tmp_path / "s.zarr"
    mt.ingest(rec, store, chunks=CHUNKS)
    st = os.stat(rec)
    off = (1 << 20) + (64 << 10) + 1000  # after the first MiB and the first sampled block, before the next
    with open(rec, "r+b") as fh:
        fh.seek(off)
        b = fh.read(4)
        fh.seek(off)
        fh.write(bytes(x ^ 0xFF for x in b))
    os.utime(rec, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(rec).st_size == st.st_size and os.stat(rec).st_mtime_ns == st.st_mtime_ns
    snap = _store_snapshot(store)
    mt.ingest(rec, store, chunks=CHUNKS, quick_check=True)  # the opt-in sampled check misses it (documented)
    with pytest.raises(InputError, match="changed .*pass --overwrite"):
        mt.ingest(rec, store, chunks=CHUNKS)
    assert _store_snapshot(store) == snap
    assert cli_main(["info", str(store)]) == 0
    out = capsys.readouterr().out
    assert "sha1 of the whole file" in out and "whole-file fingerprint" in out


# ---- bad input: one clear sentence, exit code 2, nothing written -------------------------------
def _good(tmp_path):
    write_mrc(tmp_path / "good.rec", _vol(), voxel_size=5.0)
    return tmp_path / "good.rec"


def _bad_missing_file(tmp_path):
    man = tmp_path / "m.txt"
    man.write_text("image_name rec_path\ngood good.rec\nghost ghost.rec\n")
    _good(tmp_path)
    return [str(man)], [], "line 3: tomogram file .*ghost.rec does not exist"


def _bad_truncated(tmp_path):
    write_mrc(tmp_path / "cut.rec", _vol(), voxel_size=5.0)
    data = (tmp_path / "cut.rec").read_bytes()
    (tmp_path / "cut.rec").write_bytes(data[: len(data) - 4000])
    return [str(tmp_path / "cut.rec")], [], "cut.rec is not a readable MRC file"


def _bad_not_mrc(tmp_path):
    (tmp_path / "junk.rec").write_bytes(b"not an mrc file" * 100)
    return [str(tmp_path / "junk.rec")], [], "junk.rec is not a readable MRC file"


def _bad_tilt_size(tmp_path):
    write_mrc(tmp_path / "t.rec", _vol((20, 40, 50)), voxel_size=5.0)
    write_mrc(tmp_path / "t.mrc", _vol((3, 40, 44)), voxel_size=5.0)
    (tmp_path / "t.tlt").write_text("-10\n0\n10\n")
    return [str(tmp_path)], [], "tilt stack .*t.mrc is 44x40 pixels .* but tomogram .* is 50x40"


def _bad_angle_count(tmp_path):
    write_mrc(tmp_path / "t.rec", _vol((20, 40, 50)), voxel_size=5.0)
    write_mrc(tmp_path / "t.mrc", _vol((3, 40, 50)), voxel_size=5.0)
    (tmp_path / "t.tlt").write_text("-10\n0\n10\n20\n")
    return [str(tmp_path)], [], "lists 4 angles but the tilt stack .* has 3 tilts"


def _bad_duplicate(tmp_path):
    _good(tmp_path)
    man = tmp_path / "m.txt"
    man.write_text("image_name rec_path\ngood good.rec\ngood good.rec\n")
    return [str(man)], [], "duplicate tomogram name 'good'"


def _bad_nan(tmp_path):
    _good(tmp_path)
    v = _vol()
    v[3, 4, 5] = np.nan
    v[7, 1, 1] = np.inf
    write_mrc(tmp_path / "nan.rec", v, voxel_size=5.0)
    return [str(tmp_path / "good.rec"), str(tmp_path / "nan.rec")], [], "nan.rec contains 2 NaN or infinite values"


def _bad_2d(tmp_path):
    with mrcfile.new(tmp_path / "flat.rec") as m:
        m.set_data(np.zeros((1, 30, 30), np.float32))
    return [str(tmp_path / "flat.rec")], [], "flat.rec has shape \\(1, 30, 30\\); a 3D volume"


def _bad_empty(tmp_path):
    write_mrc(tmp_path / "zero.rec", np.zeros((10, 20, 20), np.float32), voxel_size=5.0)
    return [str(tmp_path / "zero.rec")], [], "zero.rec is constant"


def _bad_order(tmp_path):
    return [str(_good(tmp_path))], ["--order", "zyx"], "invalid choice: 'zyx'"


BAD = [_bad_missing_file, _bad_truncated, _bad_not_mrc, _bad_tilt_size, _bad_angle_count, _bad_duplicate,
       _bad_nan, _bad_2d, _bad_empty, _bad_order]


@pytest.mark.parametrize("case", BAD, ids=[f.__name__[5:] for f in BAD])
def test_bad_input_clear_error_and_nothing_written(tmp_path, capsys, case):
    store = tmp_path / "store.zarr"
    # a store that already holds a good tomogram must come out untouched
    write_mrc(tmp_path / "keep.rec", _vol(seed=9), voxel_size=5.0)
    mt.ingest(tmp_path / "keep.rec", store, chunks=CHUNKS)
    snap = _store_snapshot(store)
    sources, extra, message = case(tmp_path)
    with pytest.raises(SystemExit) if "invalid choice" in message else _nullctx():
        code = cli_main(["--workers", "1", "ingest", *sources, "--store", str(store), *extra])
        assert code == 2
    err = capsys.readouterr().err
    import re

    assert re.search(message, err), err
    assert "Traceback" not in err
    assert _store_snapshot(store) == snap
    assert mt.open(store).names == ["keep"]


class _nullctx:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_python_api_raises_input_error_for_unknown_order(tmp_path):
    with pytest.raises(InputError, match="unknown axis order 'abc'"):
        mt.ingest(_good(tmp_path), tmp_path / "s.zarr", order="abc")
    assert not (tmp_path / "s.zarr").exists()


def test_open_missing_store_is_clear(tmp_path):
    with pytest.raises(InputError, match="is not a milotile store"):
        mt.open(tmp_path / "nothing.zarr")


def test_cli_info(tmp_path, capsys):
    write_mrc(tmp_path / "a.rec", _vol(), voxel_size=5.0)
    assert cli_main(["--workers", "1", "ingest", str(tmp_path / "a.rec"), "--store", str(tmp_path / "s.zarr")]) == 0
    capsys.readouterr()
    assert cli_main(["info", str(tmp_path / "s.zarr")]) == 0
    out = capsys.readouterr().out
    assert "1 tomograms" in out and "20x40x50" in out


def test_pyramid_written_block_by_block_equals_global_downsampling(tmp_path):
    """Levels 1 and 2 are made in the copy pass, chunk by chunk; odd sizes and seams must not matter."""
    v = _vol((37, 45, 70), seed=4)
    write_mrc(tmp_path / "odd.rec", v, voxel_size=3.0)
    col = mt.ingest(tmp_path / "odd.rec", tmp_path / "s.zarr", chunks=(16, 32, 32))
    t = col["odd"]
    from milotile.store.arrays import downsample_block

    l1 = downsample_block(v)
    l2 = downsample_block(l1)
    assert t.data(1).shape == (18, 22, 35) and t.data(2).shape == (9, 11, 17)
    np.testing.assert_allclose(t.data(1).compute(), l1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(t.data(2).compute(), l2, rtol=1e-6, atol=1e-6)
    # each level's chunks are half the previous level's, so block writes never share a chunk
    assert t.group["1"].chunks == (8, 16, 16) and t.group["2"].chunks == (4, 8, 8)
