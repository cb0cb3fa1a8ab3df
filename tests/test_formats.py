"""Coordinate import/export: every layout read, every export read back by its own library and by
:func:`milotile.formats.read_labels`, and label validation against a collection."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import pytest

from milotile.errors import InputError
from milotile.formats import (
    EXPORT_FORMATS,
    detect_format,
    export,
    read_labels,
    validate_labels,
    validate_picks_json,
)


@dataclass
class _Tomo:
    shape: tuple[int, int, int]
    voxel_size: float


class FakeCollection:
    """The part of the Collection interface the formats use: names, shape (z, y, x), voxel size."""

    def __init__(self, tomos: dict[str, _Tomo]):
        self._t = tomos

    @property
    def names(self) -> list[str]:
        return sorted(self._t)

    def __getitem__(self, name: str) -> _Tomo:
        return self._t[name]


@pytest.fixture
def col() -> FakeCollection:
    return FakeCollection({"tomo_a": _Tomo((40, 64, 80), 10.0), "tomo_b": _Tomo((30, 50, 50), 7.5)})


@pytest.fixture
def picks(col: FakeCollection) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for name in col.names:
        z, y, x = col[name].shape
        n = 7
        pts = rng.uniform([0, 0, 0], [x - 1, y - 1, z - 1], size=(n, 3))
        for i, p in enumerate(pts):
            rows.append(
                {"tomogram": name, "x": p[0], "y": p[1], "z": p[2], "score": rng.uniform(0.3, 1.0),
                 "class": "ribosome" if i % 2 else "proteasome"}
            )
    return pd.DataFrame(rows)


def _sorted(df: pd.DataFrame) -> pd.DataFrame:
    return df.sort_values(["tomogram", "x", "y", "z"]).reset_index(drop=True)


def _assert_same_points(a: pd.DataFrame, b: pd.DataFrame, atol: float = 1e-3, classes: bool = True) -> None:
    a, b = _sorted(a), _sorted(b)
    assert len(a) == len(b)
    assert list(a["tomogram"]) == list(b["tomogram"])
    np.testing.assert_allclose(a[["x", "y", "z"]].to_numpy(), b[["x", "y", "z"]].to_numpy(), atol=atol)
    if classes:
        assert list(a["class"]) == list(b["class"])


# --------------------------------------------------------------------------------------------- readers
def test_read_milopyp_tsv_tabs_and_spaces(tmp_path):
    p = tmp_path / "train_coords.txt"
    p.write_text("image_name\tz_coord\tx_coord\ty_coord\ntomo_a\t3\t10\t20\ntomo_b  4  11  21\n")
    assert detect_format(p) == "tsv"
    df = read_labels(p)
    assert list(df.columns) == ["tomogram", "x", "y", "z", "class"]
    assert df["tomogram"].tolist() == ["tomo_a", "tomo_b"]
    np.testing.assert_array_equal(df[["x", "y", "z"]].to_numpy(), [[10, 20, 3], [11, 21, 4]])
    assert set(df["class"]) == {"particle"}


def test_read_tsv_bad_value_names_line(tmp_path):
    p = tmp_path / "c.tsv"
    p.write_text("image_name x_coord y_coord z_coord\ntomo_a 1 2 3\ntomo_a 1 oops 3\n")
    with pytest.raises(InputError, match="line 3"):
        read_labels(p)


@pytest.mark.parametrize("order", ["xyz", "xzy", "zxy"])
def test_read_txt_folder_orders_and_skips_non_coordinate_files(tmp_path, col, order):
    pts = np.array([[10.0, 20.0, 3.0], [11.5, 21.0, 4.0]])  # x, y, z
    cols = pts[:, ["xyz".index(a) for a in order]]
    np.savetxt(tmp_path / "tomo_a.txt", cols, delimiter="\t")
    np.savetxt(tmp_path / "tomo_b.txt", cols[:1], delimiter=" ")
    # MiLoPYP's generate_train_file would parse all of these as coordinates:
    (tmp_path / "tomo_train_imgs.txt").write_text("image_name\trec_path\ntomo_a\t/x/a.rec\n")
    (tmp_path / "out_train_coords.txt").write_text("image_name\tx_coord\ty_coord\tz_coord\ntomo_a\t1\t2\t3\n")
    np.savetxt(tmp_path / "unrelated.txt", cols)  # numeric but not a tomogram of the collection
    df = read_labels(tmp_path, col, order=order)
    assert sorted(df["tomogram"].unique()) == ["tomo_a", "tomo_b"]
    a = df[df["tomogram"] == "tomo_a"][["x", "y", "z"]].to_numpy()
    np.testing.assert_allclose(a, pts)
    # without a collection the numeric file is read but the manifest / TSV still are not
    df2 = read_labels(tmp_path, order=order)
    assert sorted(df2["tomogram"].unique()) == ["tomo_a", "tomo_b", "unrelated"]


def test_txt_needs_order(tmp_path):
    p = tmp_path / "tomo_a.txt"
    np.savetxt(p, [[1, 2, 3]])
    with pytest.raises(InputError, match="order"):
        read_labels(p)
    df = read_labels(p, order="xzy", tomogram="other")
    assert df["tomogram"].tolist() == ["other"]
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[1, 3, 2]])


def test_txt_wrong_column_count(tmp_path):
    p = tmp_path / "tomo_a.txt"
    p.write_text("1 2 3\n1 2\n")
    with pytest.raises(InputError, match="line 2"):
        read_labels(p, order="xyz")


def test_read_phoenix_selection_parquet(tmp_path):
    df = pd.DataFrame({"name": ["tomo_a", "tomo_b"], "coord": [["1", "2", "3"], ["4", "5", "6"]], "label": [3, 7]})
    p = tmp_path / "selection.parquet"
    df.to_parquet(p)
    out = read_labels(p)
    np.testing.assert_array_equal(out[["x", "y", "z"]].to_numpy(), [[1, 2, 3], [4, 5, 6]])
    assert out["class"].tolist() == ["3", "7"]


def test_voxel_size_rescales_to_collection(tmp_path, col):
    p = tmp_path / "c.csv"
    pd.DataFrame({"tomogram": ["tomo_a"], "x": [10.0], "y": [20.0], "z": [4.0]}).to_csv(p, index=False)
    df = read_labels(p, col, voxel_size=20.0)  # coordinates on a 2x binned grid
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[20, 40, 8]])


def test_imod_xzy_order(tmp_path):
    import imodmodel

    p = tmp_path / "tomo_a.mod"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        imodmodel.write(pd.DataFrame({"x": [5.0, 6.0], "y": [7.0, 8.0], "z": [1.0, 2.0]}), p)
    # IMOD's pixel convention: image X/Y pixel i spans [i, i+1) (centre i + 0.5), Z sections are
    # centred on integers; milotile voxel centres are integers on every axis
    df = read_labels(p)
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[4.5, 6.5, 1], [5.5, 7.5, 2]])
    df = read_labels(p, order="xzy")  # unrotated IMOD tomogram: model y is the thickness
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[4.5, 1, 6.5], [5.5, 2, 7.5]])
    assert df["tomogram"].iloc[0] == "tomo_a"
    from milotile.formats.imod import read_imod

    legacy = read_imod(p, pixel_centre=False)  # MiLoPYP-era files with plain voxel indices
    np.testing.assert_allclose(legacy[["x", "y", "z"]].to_numpy(), [[5, 7, 1], [6, 8, 2]])


def test_relion5_star_needs_collection(tmp_path, col):
    import starfile

    p = tmp_path / "p.star"
    starfile.write(
        {"particles": pd.DataFrame({"rlnTomoName": ["tomo_a"], "rlnCenteredCoordinateXAngst": [0.0],
                                    "rlnCenteredCoordinateYAngst": [-10.0], "rlnCenteredCoordinateZAngst": [25.0]})},
        p,
    )
    with pytest.raises(InputError, match="collection"):
        read_labels(p)
    df = read_labels(p, col)
    # centre at size / 2 = (40, 32, 20) voxels, 10 Å voxels
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[40.0, 31.0, 22.5]])


def test_copick_voxel_size_from_file_or_argument(tmp_path):
    doc = {"pickable_object_name": "ribosome", "user_id": "curator", "session_id": "0", "run_name": "TS-1",
           "voxel_spacing": 10.0, "unit": "angstrom",
           "points": [{"location": {"x": 100.0, "y": 50.0, "z": 20.0}}]}
    p = tmp_path / "curator_0_ribosome.json"
    p.write_text(json.dumps(doc))
    df = read_labels(p)
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[10, 5, 2]])
    assert df["class"].tolist() == ["ribosome"] and df["tomogram"].tolist() == ["TS-1"]
    df = read_labels(p, voxel_size=5.0)  # the target grid given explicitly wins over the file's spacing
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[20, 10, 4]])
    doc["voxel_spacing"] = None
    p.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="voxel"):
        read_labels(p)
    np.testing.assert_allclose(read_labels(p, voxel_size=5.0)[["x", "y", "z"]].to_numpy(), [[20, 10, 4]])


def test_missing_path_and_unknown_layout(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        read_labels(tmp_path / "nope.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no coordinate files"):
        read_labels(tmp_path / "empty")


# --------------------------------------------------------------------------------------------- exports
@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_export_round_trip_through_read_labels(tmp_path, col, picks, fmt):
    out = tmp_path / fmt
    files = export(picks, fmt, out, col=col)
    assert files and all(f.exists() for f in files)
    src = files[0] if fmt in ("star", "csv") else out
    back = read_labels(src, col, order="xzy" if fmt == "milopyp" else None)
    # milopyp txt and star carry no species; all others keep the class
    _assert_same_points(picks, back, classes=fmt not in ("milopyp", "star"))
    if fmt in ("milopyp", "copick", "csv", "star"):
        np.testing.assert_allclose(np.sort(back["score"]), np.sort(picks["score"]), atol=1e-5)


def test_milopyp_export_is_x_z_y_score(tmp_path, col, picks):
    export(picks, "milopyp", tmp_path, col=col)
    arr = np.loadtxt(tmp_path / "tomo_a.txt")
    ref = picks[picks["tomogram"] == "tomo_a"]
    np.testing.assert_allclose(arr[:, 0], ref["x"], atol=1e-3)
    np.testing.assert_allclose(arr[:, 1], ref["z"], atol=1e-3)
    np.testing.assert_allclose(arr[:, 2], ref["y"], atol=1e-3)
    np.testing.assert_allclose(arr[:, 3], ref["score"], atol=1e-5)


def test_imod_export_read_by_imodmodel(tmp_path, col, picks):
    import imodmodel
    from imodmodel.models import ImodModel

    export(picks, "imod", tmp_path, col=col)
    df = imodmodel.read(tmp_path / "tomo_b.mod")
    ref = picks[picks["tomogram"] == "tomo_b"]
    assert len(df) == len(ref)
    assert df["object_id"].nunique() == 2  # one object per class
    # model X/Y = voxel + 0.5 (IMOD pixel centres), model Z = voxel (section centres)
    np.testing.assert_allclose(np.sort(df["x"].to_numpy()), np.sort(ref["x"].to_numpy()) + 0.5, atol=1e-3)
    np.testing.assert_allclose(np.sort(df["y"].to_numpy()), np.sort(ref["y"].to_numpy()) + 0.5, atol=1e-3)
    np.testing.assert_allclose(np.sort(df["z"].to_numpy()), np.sort(ref["z"].to_numpy()), atol=1e-3)
    model = ImodModel.from_file(tmp_path / "tomo_b.mod")
    assert [o.header.name for o in model.objects] == ["proteasome", "ribosome"]
    assert [o.header.pdrawsize for o in model.objects] == [3, 3]  # default point size without radius
    export(picks.assign(radius=6.4), "imod", tmp_path / "r", col=col)
    model = ImodModel.from_file(tmp_path / "r" / "tomo_b.mod")
    assert [o.header.pdrawsize for o in model.objects] == [6, 6]  # the particle radius (voxels)
    assert (model.header.xmax, model.header.ymax, model.header.zmax) == (50, 50, 30)
    assert model.header.pixelsize == pytest.approx(7.5)


def test_star_export_read_by_starfile(tmp_path, col, picks):
    import starfile

    path, tomos = export(picks, "star", tmp_path / "particles.star", col=col)
    assert tomos == tmp_path / "tomograms.star"
    df = starfile.read(path)
    assert {"rlnTomoName", "rlnCenteredCoordinateXAngst", "rlnCoordinateX"} <= set(df.columns)
    row, ref = df.iloc[0], picks.iloc[0]
    z, y, x = col[ref["tomogram"]].shape
    vs = col[ref["tomogram"]].voxel_size
    assert row["rlnTomoName"] == ref["tomogram"]
    assert row["rlnCenteredCoordinateXAngst"] == pytest.approx((ref["x"] - x / 2) * vs, abs=1e-3)
    assert row["rlnCenteredCoordinateZAngst"] == pytest.approx((ref["z"] - z / 2) * vs, abs=1e-3)
    assert row["rlnCoordinateY"] == pytest.approx(ref["y"], abs=1e-4)


def test_copick_export_schema_and_names(tmp_path, col, picks):
    files = export(picks, "copick", tmp_path, col=col, user_id="milotile", session_id="0")
    assert sorted(f.relative_to(tmp_path).as_posix() for f in files)[0] == (
        "ExperimentRuns/tomo_a/Picks/milotile_0_proteasome.json"
    )
    doc = json.loads(files[0].read_text())
    validate_picks_json(doc)
    assert doc["unit"] == "angstrom" and doc["voxel_spacing"] == 10.0 and doc["run_name"] == "tomo_a"
    p0 = doc["points"][0]
    assert np.allclose(p0["transformation_"], np.eye(4)) and "instance_id" in p0 and "score" in p0
    ref = picks[(picks["tomogram"] == "tomo_a") & (picks["class"] == "proteasome")].iloc[0]
    assert p0["location"]["x"] == pytest.approx(ref["x"] * 10.0)
    cfg = json.loads((tmp_path / "copick_config.json").read_text())
    assert {o["name"] for o in cfg["pickable_objects"]} == {"proteasome", "ribosome"}
    with pytest.raises(InputError, match="underscores"):
        export(picks, "copick", tmp_path / "bad", col=col, user_id="my_user")
    with pytest.raises(InputError, match="underscores"):
        export(picks, "copick", tmp_path / "bad", col=col, object_name="big_ribo")
    bad = dict(doc, points=[{"location": {"x": 1, "y": 2}}])
    with pytest.raises(InputError, match="location"):
        validate_picks_json(bad)


def test_ndjson_export_lines(tmp_path, col, picks):
    files = export(picks, "ndjson", tmp_path, col=col)
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    assert all(r["type"] == "point" and set(r["location"]) == {"x", "y", "z"} for r in rows)
    ref = picks[(picks["tomogram"] == "tomo_a") & (picks["class"] == "proteasome")]
    np.testing.assert_allclose(sorted(r["location"]["x"] for r in rows), np.sort(ref["x"]))


def test_unknown_export_format(tmp_path, picks):
    with pytest.raises(InputError, match="format"):
        export(picks, "pdb", tmp_path)


# --------------------------------------------------------------------------------------------- validation
def test_validate_labels_ok_adds_angstrom(col):
    df = pd.DataFrame({"tomogram": ["tomo_a", "tomo_b"], "x": [1.0, 2.0], "y": [3.0, 4.0], "z": [5.0, 6.0],
                       "class": ["p", "p"]})
    out = validate_labels(df, col)
    np.testing.assert_allclose(out["x_A"], [10.0, 15.0])
    np.testing.assert_allclose(out["z_A"], [50.0, 45.0])


def test_validate_unknown_names(col):
    df = pd.DataFrame({"tomogram": ["tomo_a", "tomo_c", "TS_9"], "x": [1.0] * 3, "y": [1.0] * 3, "z": [1.0] * 3})
    with pytest.raises(InputError, match="'TS_9', 'tomo_c'"):
        validate_labels(df, col)


def test_validate_out_of_volume(col):
    df = pd.DataFrame({"tomogram": ["tomo_a"] * 10, "x": [5.0] * 9 + [200.0], "y": [5.0] * 10, "z": [5.0] * 10})
    with pytest.raises(InputError, match=r"1 label\(s\) of tomogram 'tomo_a' lie outside"):
        validate_labels(df, col)


def test_validate_detects_axis_mixup(col):
    # tomo_a is (z, y, x) = (40, 64, 80); labels written x z y but read as x y z
    rng = np.random.default_rng(1)
    true = rng.uniform([0, 0, 0], [79, 63, 39], size=(30, 3))
    true[:, 1] = rng.uniform(45, 63, size=30)  # many y values beyond the depth of 40
    df = pd.DataFrame({"tomogram": "tomo_a", "x": true[:, 0], "y": true[:, 2], "z": true[:, 1]})
    with pytest.raises(InputError, match="axis-order mix-up.*xzy"):
        validate_labels(df, col)


def test_validate_empty(col):
    with pytest.raises(InputError, match="no points"):
        validate_labels(pd.DataFrame({"tomogram": [], "x": [], "y": [], "z": []}), col)


def test_star_tomograms_star_round_trip_without_collection(tmp_path, col, picks):
    """RELION-5: particles + tomograms.star read back (with starfile) to the same voxels, no store needed."""
    import starfile

    path, tomos = export(picks, "star", tmp_path / "relion" / "particles.star", col=col, voltage=200.0)
    glob = starfile.read(tomos)
    assert list(glob["rlnTomoName"]) == ["tomo_a", "tomo_b"]
    row = glob.set_index("rlnTomoName").loc["tomo_b"]
    assert (row["rlnTomoSizeX"], row["rlnTomoSizeY"], row["rlnTomoSizeZ"]) == (50, 50, 30)
    assert row["rlnTomoTiltSeriesPixelSize"] == pytest.approx(7.5) and row["rlnVoltage"] == pytest.approx(200.0)
    assert row["rlnTomoTomogramBinning"] == pytest.approx(1.0)
    back = read_labels(path)  # sizes and pixel size from tomograms.star beside the particles
    ref = picks.sort_values(["tomogram", "x"]).reset_index(drop=True)
    got = back.sort_values(["tomogram", "x"]).reset_index(drop=True)
    np.testing.assert_allclose(got[["x", "y", "z"]].to_numpy(), ref[["x", "y", "z"]].to_numpy(), atol=1e-4)
    (tmp_path / "relion" / "tomograms.star").unlink()
    with pytest.raises(InputError, match="tomograms.star"):
        read_labels(path)
    with pytest.raises(InputError, match="unknown STAR export option"):
        export(picks, "star", tmp_path / "x.star", col=col, kv=300)


# ------------------------------------------------------------------------------------ headed tables (issue 27)
HEADED = {
    "image_name\tx\ty\tz": "\t",  # the file a new user has: MiLoPYP's name column with plain x y z
    "tomogram,x,y,z": ",",
    "tomo x y z": " ",
    "name;X;Y;Z": ";",
    "rlnTomoName\trlnCoordinateX\trlnCoordinateY\trlnCoordinateZ": "\t",
    "image_name x_coord y_coord z_coord": " ",
}


@pytest.mark.parametrize("header", list(HEADED))
@pytest.mark.parametrize("suffix", [".tsv", ".txt", ".csv"])
def test_headed_tables_with_usual_column_names_just_work(tmp_path, col, header, suffix):
    sep = HEADED[header]
    p = tmp_path / f"labels{suffix}"
    p.write_text("\n".join([header, sep.join(["tomo_a", "10", "20", "5"]), sep.join(["tomo_b", "11.5", "21", "6"])]) + "\n")
    df = read_labels(p, col)
    assert df["tomogram"].tolist() == ["tomo_a", "tomo_b"]
    np.testing.assert_allclose(df[["x", "y", "z"]].to_numpy(), [[10, 20, 5], [11.5, 21, 6]])
    # an --order given for it (the user tried) does not turn it into a bare-column file
    np.testing.assert_allclose(read_labels(p, col, order="xyz")[["x", "y", "z"]].to_numpy(), df[["x", "y", "z"]].to_numpy())


def test_headed_table_without_tomogram_column_uses_the_file_name(tmp_path):
    p = tmp_path / "tomo_a.txt"
    p.write_text("x y z score\n1 2 3 0.5\n")
    df = read_labels(p)
    assert df["tomogram"].tolist() == ["tomo_a"] and df["score"].tolist() == [0.5]


def test_header_with_unknown_columns_names_the_accepted_forms(tmp_path):
    p = tmp_path / "l.tsv"
    p.write_text("foo\tbar\tbaz\n1\t2\t3\n")
    with pytest.raises(InputError, match=r"image_name.*x y z.*rlnCoordinateX.*coord") as exc:
        read_labels(p, order="xyz")
    assert "non-numeric" not in str(exc.value)


def test_training_labels_and_negatives_read_headed_tsv(tmp_path, col):
    from milotile.refine.labels import load_label_table

    p = tmp_path / "neg.tsv"
    p.write_text("image_name\tx\ty\tz\ntomo_a\t10\t20\t5\n")
    df = load_label_table(p, col, "negatives")
    assert df[["tomogram", "x", "y", "z"]].values.tolist() == [["tomo_a", 10.0, 20.0, 5.0]]


@pytest.mark.parametrize("out, expected", [("dir/csv", "dir/csv/picks.csv"), ("dir/", "dir/picks.csv"),
                                           ("dir/p.csv", "dir/p.csv"), ("existing", "existing/picks.csv")])
def test_csv_out_folder_or_file(tmp_path, picks, out, expected):
    (tmp_path / "existing").mkdir()
    files = export(picks, "csv", str(tmp_path / out) + ("/" if out.endswith("/") else ""))
    assert files == [tmp_path / expected] and files[0].is_file()
    assert not list(tmp_path.rglob("csv.csv"))
