"""Tests of the synthetic data generator (``milotile.synth``) and its CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

from milotile.errors import InputError
from milotile.ops.geometry import project_points
from milotile.synth import Projector, synth, tilt_angles, wbp
from milotile.synth.phantom import SPECIES, resolve_species_counts

SIZE = (48, 96, 96)
ANGLES = (-60, 60, 6)  # 21 tilts


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("synth_small")
    return synth(out, seed=7, n_tomograms=2, size=SIZE, angles=ANGLES, n_particles=12)


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------ files & headers
def test_files_and_headers(small) -> None:
    res = small
    assert res.names == ["tomo_000", "tomo_001"]
    n_t = len(tilt_angles(ANGLES))
    assert n_t == 21
    for name, rec_p, tilt_p, tlt_p in zip(
        res.names, res.rec_paths, res.tilt_paths, res.angle_paths, strict=True
    ):
        assert (
            rec_p == res.out_dir / f"{name}.rec"
            and tilt_p.suffix == ".mrc"
            and tlt_p.suffix == ".tlt"
        )
        with mrcfile.open(rec_p, permissive=False) as m:
            assert m.data.shape == SIZE and m.data.dtype == np.float32
            assert m.is_volume()
            assert (int(m.header.nx), int(m.header.ny), int(m.header.nz)) == (96, 96, 48)
            assert m.voxel_size.x == pytest.approx(10.0) and m.voxel_size.z == pytest.approx(10.0)
            assert m.header.nlabl == 1 and bytes(m.header.label[0]).startswith(b"milotile synth")
            assert np.isfinite(m.data).all()
        with mrcfile.open(tilt_p, permissive=False) as m:
            assert m.data.shape == (n_t, 96, 96) and m.data.dtype == np.float32
            assert m.is_image_stack()
            assert m.voxel_size.x == pytest.approx(10.0)
        angles = np.loadtxt(tlt_p)
        np.testing.assert_allclose(angles, np.arange(-60, 61, 6))
    lines = res.manifest.read_text().splitlines()
    assert lines[0] == "image_name\trec_path\ttilt_path\tangle_path"
    assert len(lines) == 3
    for line, name in zip(lines[1:], res.names, strict=True):
        cols = line.split("\t")
        assert cols[0] == name
        assert all(Path(c).is_absolute() and Path(c).exists() for c in cols[1:])
    gt = pd.read_parquet(res.ground_truth_path)
    tsv = pd.read_csv(res.ground_truth_tsv, sep="\t")
    assert list(gt.columns[:4]) == ["tomogram", "x", "y", "z"]
    assert {"species", "radius", "x_A", "y_A", "z_A"} <= set(gt.columns)
    pd.testing.assert_frame_equal(gt, tsv, check_dtype=False)
    pd.testing.assert_frame_equal(gt, res.ground_truth, check_dtype=False)
    np.testing.assert_allclose(gt.x_A, gt.x * 10.0)
    fil = pd.read_parquet(res.filaments_path)
    assert list(fil.columns[:5]) == ["tomogram", "filament_id", "x", "y", "z"]
    assert set(fil.tomogram) == set(res.names)


def test_ground_truth_inside_and_not_overlapping(small) -> None:
    gt = small.ground_truth
    assert len(gt) == 2 * 12
    assert set(gt.species) == set(SPECIES)
    kinds = small.distractors.groupby("tomogram").kind.agg(set)
    assert all(
        {"vesicle", "gold", "junk"} <= k <= {"vesicle", "sheet", "gold", "junk"} for k in kinds
    )
    z, y, x = SIZE
    for name, g in gt.groupby("tomogram"):
        xyz = g[["x", "y", "z"]].to_numpy()
        r = g.radius.to_numpy()
        assert (xyz - r[:, None] >= 0).all()
        assert (xyz + r[:, None] <= np.array([x - 1, y - 1, z - 1])).all()
        d = np.linalg.norm(xyz[:, None] - xyz[None], axis=-1)
        np.fill_diagonal(d, np.inf)
        assert (d > r[:, None] + r[None, :]).all(), f"overlapping particles in {name}"


# ------------------------------------------------------------------------------ determinism
def test_same_seed_byte_identical(tmp_path: Path) -> None:
    kw = dict(seed=3, n_tomograms=1, size=SIZE, angles=(-60, 60, 10), n_particles=6)
    a, b, c = (
        synth(tmp_path / "a", **kw),
        synth(tmp_path / "b", **kw),
        synth(tmp_path / "c", **{**kw, "seed": 4}),
    )
    fa, fb, fc = _files(a.out_dir), _files(b.out_dir), _files(c.out_dir)
    assert set(fa) == set(fb)
    for name in fa:
        if name == "tomograms.txt":  # holds absolute paths
            assert fa[name].replace(b"/a/", b"/b/") == fb[name]
        else:
            assert fa[name] == fb[name], name
    assert fa["tomo_000.rec"] != fc["tomo_000.rec"]
    assert not a.ground_truth[["x", "y", "z"]].equals(c.ground_truth[["x", "y", "z"]])


def test_tomogram_independent_of_count(tmp_path: Path, small) -> None:
    one = synth(tmp_path / "one", seed=7, n_tomograms=1, size=SIZE, angles=ANGLES, n_particles=12)
    assert one.rec_paths[0].read_bytes() == small.rec_paths[0].read_bytes()
    pd.testing.assert_frame_equal(
        one.ground_truth, small.ground_truth[small.ground_truth.tomogram == "tomo_000"]
    )


# ------------------------------------------------------------------------------ content
def _ball_means(vol: np.ndarray, xyz: np.ndarray, r: int = 2) -> np.ndarray:
    zz, yy, xx = np.mgrid[-r : r + 1, -r : r + 1, -r : r + 1]
    ball = zz**2 + yy**2 + xx**2 <= r * r
    out = []
    for x, y, z in np.rint(xyz).astype(int):
        out.append(vol[z - r : z + r + 1, y - r : y + r + 1, x - r : x + r + 1][ball].mean())
    return np.array(out)


def test_ground_truth_sits_on_dark_particles(small) -> None:
    rng = np.random.default_rng(0)
    for name, rec_p in zip(small.names, small.rec_paths, strict=True):
        rec = mrcfile.read(rec_p)
        sd = float(rec.std())
        gt = small.ground_truth[small.ground_truth.tomogram == name]
        at_gt = _ball_means(rec, gt[["x", "y", "z"]].to_numpy())
        # background: random points at least 12 voxels from every object centre
        objs = pd.concat(
            [gt[["x", "y", "z"]], small.distractors.query("tomogram == @name")[["x", "y", "z"]]]
        )
        pts = rng.uniform([3, 3, 3], [SIZE[2] - 4, SIZE[1] - 4, SIZE[0] - 4], size=(400, 3))
        far = np.linalg.norm(pts[:, None] - objs.to_numpy()[None], axis=-1).min(axis=1) > 12
        background = _ball_means(rec, pts[far])
        assert far.sum() > 20
        assert at_gt.mean() < background.mean() - 0.5 * sd, (at_gt.mean(), background.mean(), sd)
        assert (at_gt < np.median(background)).mean() >= 0.8
        for species, vals in gt.assign(v=at_gt).groupby("species").v:
            assert vals.mean() < background.mean() - 0.25 * sd, species


def test_filament_along_y_and_dark(small) -> None:
    fil = small.filaments
    for name in small.names:
        f = fil[fil.tomogram == name][["x", "y", "z"]].to_numpy()
        assert len(f) > 20
        steps = np.linalg.norm(np.diff(f, axis=0), axis=1)
        assert np.allclose(steps, 2.0, atol=0.05)  # a sample every ~2 voxels
    f0 = fil[fil.tomogram == "tomo_000"][["x", "y", "z"]].to_numpy()
    direction = np.linalg.svd(f0 - f0.mean(axis=0), full_matrices=False)[2][0]
    assert abs(direction[1]) > math.cos(math.radians(25))
    assert np.ptp(f0[:, 1]) > 0.7 * SIZE[1]
    rec = mrcfile.read(small.rec_paths[0])
    on = _ball_means(rec, f0[5:-5:3], r=1)
    assert on.mean() < np.median(rec) - 0.5 * rec.std()


def test_no_filament_and_species_selection(tmp_path: Path) -> None:
    res = synth(
        tmp_path,
        n_tomograms=1,
        size=SIZE,
        angles=(-60, 60, 15),
        filament=False,
        species={"ring": 2.0, "proteasome": 1.0},
        n_particles=9,
    )
    assert res.filaments.empty and pd.read_parquet(res.filaments_path).empty
    assert res.ground_truth.species.value_counts().to_dict() == {"ring": 6, "proteasome": 3}
    assert resolve_species_counts(["ribosome"], 4) == {"ribosome": 4}
    assert sum(resolve_species_counts(None, 10).values()) == 10


# ------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("angle", [-57.0, -30.0, 0.0, 24.0, 60.0])
def test_point_projects_where_project_points_says(angle: float) -> None:
    shape = (32, 24, 64)
    vol = np.zeros(shape, dtype=np.float32)
    x, y, z = 40.0, 9.0, 25.0  # off-centre in x and z, above the centre (zc > 0)
    vol[int(z), int(y), int(x)] = 1.0
    proj = Projector(shape, [angle], workers=1)
    img = proj.forward(vol)[0]
    assert img.sum() == pytest.approx(1.0, abs=1e-5)
    rows, cols = np.nonzero(img)
    assert set(rows) == {9}
    u = float((img.sum(axis=0) * np.arange(shape[2])).sum() / img.sum())
    expected = project_points(np.array([[x, y, z]]), np.array([angle]), shape, shape[1:])[0, 0]
    assert u == pytest.approx(expected[0], abs=1e-4)
    assert expected[1] == pytest.approx(y)
    # the sign: points above the centre move towards smaller x for positive angles
    xc, zc = x - (shape[2] - 1) / 2, z - (shape[0] - 1) / 2
    assert u - (shape[2] - 1) / 2 == pytest.approx(
        xc * math.cos(math.radians(angle)) - zc * math.sin(math.radians(angle)), abs=1e-4
    )


def test_backprojection_is_adjoint_and_wbp_recovers_point() -> None:
    shape = (24, 8, 48)
    angles = tilt_angles((-60, 60, 3))
    proj = Projector(shape, angles, workers=2, block=3)
    rng = np.random.default_rng(1)
    v = rng.standard_normal(shape).astype(np.float32)
    s = rng.standard_normal((len(angles), 8, 48)).astype(np.float32)
    lhs = float((proj.forward(v).astype(np.float64) * s).sum())
    rhs = float((v.astype(np.float64) * proj.backward(s)).sum())
    assert lhs == pytest.approx(rhs, rel=1e-4)
    # threads and block size change nothing, bit for bit
    serial = Projector(shape, angles, workers=1, block=16)
    assert np.array_equal(serial.forward(v), proj.forward(v))
    assert np.array_equal(serial.backward(s), proj.backward(s))
    point = np.zeros(shape, dtype=np.float32)
    point[15, 4, 30] = 1.0
    rec = wbp(proj.forward(point), angles, shape, projector=proj)
    assert np.unravel_index(np.argmax(rec), shape) == (15, 4, 30)


def test_missing_wedge(small) -> None:
    rec = mrcfile.read(small.rec_paths[1]).astype(np.float64)
    zdim, ydim, xdim = rec.shape
    win = (
        np.hanning(zdim)[:, None, None]
        * np.hanning(ydim)[None, :, None]
        * np.hanning(xdim)[None, None, :]
    )
    power = np.abs(np.fft.fftn((rec - rec.mean()) * win)) ** 2
    kz = np.fft.fftfreq(zdim)[:, None, None]
    kx = np.fft.fftfreq(xdim)[None, None, :]
    rho = np.broadcast_to(np.hypot(kx, kz), power.shape)
    from_kx = np.broadcast_to(np.degrees(np.arctan2(np.abs(kz), np.abs(kx))), power.shape)
    band = (rho > 0.05) & (rho < 0.4)
    missing = power[band & (from_kx > 68)].mean()  # the wedge: beyond the ±60° tilt range
    sampled = power[band & (from_kx < 52)].mean()
    assert missing < 0.05 * sampled, missing / sampled


def test_snr_is_honoured(tmp_path: Path) -> None:
    kw = dict(seed=11, n_tomograms=1, size=SIZE, angles=(-60, 60, 12), n_particles=8)
    clean = mrcfile.read(synth(tmp_path / "clean", snr=math.inf, **kw).tilt_paths[0]).astype(
        np.float64
    )
    for snr in (0.5, 2.0):
        noisy = mrcfile.read(synth(tmp_path / f"s{snr}", snr=snr, **kw).tilt_paths[0]).astype(
            np.float64
        )
        noise = noisy - clean
        assert abs(noise.mean()) < 0.05 * noise.std()
        assert clean.var() / noise.var() == pytest.approx(snr, rel=0.05)


# ------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"seed": -1}, "seed"),
        ({"n_tomograms": 0}, "n_tomograms"),
        ({"size": (48, 96)}, "size"),
        ({"size": (10, 96, 96)}, "at least"),
        ({"size": (48.5, 96, 96)}, "size"),
        ({"snr": 0}, "snr"),
        ({"snr": float("nan")}, "snr"),
        ({"voxel_size": -2.0}, "voxel_size"),
        ({"angles": (60, -60, 3)}, "tilt range"),
        ({"angles": (-60, 60, 0)}, "tilt step"),
        ({"angles": (-95, 60, 3)}, "tilt range"),
        ({"angles": (-60, 60)}, "angles"),
        ({"species": ["ribosome", "banana"]}, "banana"),
        ({"species": []}, "species"),
        ({"n_particles": -3}, "n_particles"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, match: str) -> None:
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=match) as info:
        synth(out, **kwargs)
    assert isinstance(info.value, InputError)
    assert not out.exists()


# ------------------------------------------------------------------------------ CLI
def test_cli(tmp_path: Path) -> None:
    from milotile.commands import synth as cmd

    parser = argparse.ArgumentParser(prog="milotile")
    cmd.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "synth",
            str(tmp_path / "cli"),
            "--seed",
            "2",
            "--n-tomograms",
            "1",
            "--size",
            "40,64,64",
            "--snr",
            "1.5",
            "--voxel-size",
            "12.5",
            "--tilt-range",
            "-45,45,15",
            "--n-particles",
            "4",
        ]
    )
    assert args.tilt_range == (-45.0, 45.0, 15.0) and args.needs_cluster is False
    assert args.handler(args) == 0
    with mrcfile.open(tmp_path / "cli" / "tomo_000.rec") as m:
        assert m.data.shape == (40, 64, 64) and m.voxel_size.x == pytest.approx(12.5)
    np.testing.assert_allclose(
        np.loadtxt(tmp_path / "cli" / "tomo_000.tlt"), [-45, -30, -15, 0, 15, 30, 45]
    )
    bad = parser.parse_args(["synth", str(tmp_path / "bad"), "--tilt-range", "-45,45,-1"])
    with pytest.raises(InputError, match="tilt step"):
        bad.handler(bad)
    with pytest.raises(SystemExit):
        parser.parse_args(["synth", str(tmp_path / "bad"), "--size", "40,64"])
