"""Tests of the ``lookalike`` synthetic preset (many similar-sized species, randomised acquisition)."""

from __future__ import annotations

import json
import subprocess
import sys

import mrcfile
import numpy as np
import pytest

from milotile.errors import InputError
from milotile.synth import synth
from milotile.synth.lookalike import (
    LOOKALIKE_FAMILIES,
    LOOKALIKE_RADII,
    draw_setting,
    lookalike_species,
    species_families,
)


def test_settings_span_the_documented_ranges() -> None:
    settings = [draw_setting(k) for k in range(40)]
    for s in settings:
        assert 8 <= s.n_species <= 12 and 100 <= s.size <= 200
        assert 0.03 <= s.snr <= 0.3 and 40 <= s.tilt_max <= 70
        assert 6 <= s.voxel_size <= 14 and 0.5 <= s.thickness <= 1.0 and 0 <= s.crowding <= 60
        assert 15_000 <= s.defocus <= 50_000 and s.contrast in (-1, 1)
    # randomised, not constant: both contrast signs and a spread of SNRs and tilt ranges occur
    assert {s.contrast for s in settings} == {-1, 1}
    assert max(s.snr for s in settings) / min(s.snr for s in settings) > 4
    assert len({s.tilt_max for s in settings}) > 5
    assert draw_setting(3) == draw_setting(3)


def test_species_are_similar_sized_and_of_distinct_shapes() -> None:
    for k in range(6):
        table = lookalike_species(draw_setting(k))
        fams = species_families(table)
        assert len(set(fams.values())) == len(table), "every species has its own shape family"
        assert set(fams.values()) <= set(LOOKALIKE_FAMILIES)
        for sp in table.values():
            assert LOOKALIKE_RADII[0] <= sp.radius <= LOOKALIKE_RADII[1]
            r = sp.radius
            ax = np.arange(-r - 2, r + 2.01, 0.5)
            p = np.stack(np.meshgrid(ax, ax, ax, indexing="ij"))
            occ = sp.shape(p)
            centroid = (p * occ).reshape(3, -1).sum(axis=1) / occ.sum()
            assert np.abs(centroid).max() < 0.1, "the ground-truth point is the density centroid"
            assert np.sqrt((p**2).sum(axis=0))[occ > 0.01].max() <= sp.bound, "the shape lies inside its bound"
            assert sp.bound <= r + 2.0


@pytest.mark.parametrize("setting", [0, 1])
def test_collection_follows_its_setting(tmp_path, setting: int) -> None:
    s = draw_setting(setting)
    res = synth(tmp_path / "la", preset="lookalike", setting=setting, seed=2, n_tomograms=1, size=(64, 72, 72),
                n_particles=2 * s.n_species)
    info = json.loads(res.params_path.read_text())
    assert info["setting"]["setting"] == setting and info["snr"] == pytest.approx(s.snr)
    assert info["voxel_size"] == pytest.approx(s.voxel_size) and info["angles"][-1] == s.tilt_max
    assert info["contrast"] == ("bright" if s.contrast > 0 else "dark")
    assert len(info["species"]) == s.n_species
    gt = res.ground_truth
    assert set(gt["species"]) == set(info["species"]) and gt["radius"].between(5, 8).all()
    rec = mrcfile.read(res.rec_paths[0])
    # the particles' sign follows the setting: their centres against random points of the volume
    idx = np.round(gt[["z", "y", "x"]].to_numpy()).astype(int)
    at = np.array([rec[z - 1:z + 2, y - 1:y + 2, x - 1:x + 2].mean() for z, y, x in idx])
    rng = np.random.default_rng(0)
    rnd = rec[tuple(rng.integers(2, 62, 400)), tuple(rng.integers(2, 70, 400)), tuple(rng.integers(2, 70, 400))]
    diff = (np.median(at) - np.median(rnd)) / rec.std()
    assert diff * s.contrast > 0.1, (diff, s.contrast)
    # the specimen slab: particles lie within the setting's thickness around the middle of z
    half = s.thickness * 63 / 2
    assert (np.abs(gt["z"] - 31.5) <= half + 0.01).all()


def test_seed_draws_content_setting_draws_acquisition(tmp_path) -> None:
    a = synth(tmp_path / "a", preset="lookalike", setting=4, seed=0, n_tomograms=1, size=(48, 64, 64), n_particles=11)
    b = synth(tmp_path / "b", preset="lookalike", setting=4, seed=1, n_tomograms=1, size=(48, 64, 64), n_particles=11)
    c = synth(tmp_path / "c", preset="lookalike", setting=4, seed=0, n_tomograms=1, size=(48, 64, 64), n_particles=11)
    ia, ib = (json.loads(r.params_path.read_text()) for r in (a, b))
    assert ia["setting"] == ib["setting"] and ia["species"] == ib["species"]
    assert not np.allclose(a.ground_truth[["x", "y"]].to_numpy()[:5], b.ground_truth[["x", "y"]].to_numpy()[:5])
    assert a.rec_paths[0].read_bytes() == c.rec_paths[0].read_bytes()


def test_bad_setting(tmp_path) -> None:
    with pytest.raises(InputError, match="setting must be a non-negative integer"):
        synth(tmp_path / "x", preset="lookalike", setting=-1)
    with pytest.raises(InputError, match="preset must be"):
        synth(tmp_path / "x", preset="alike")


def test_cli_lookalike(tmp_path) -> None:
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "milotile.cli", "synth", str(out), "--preset", "lookalike",
                        "--setting", "2", "--n-tomograms", "1", "--size", "48,64,64", "--n-particles", "10"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    info = json.loads((out / "synth.json").read_text())
    assert info["preset"] == "lookalike" and info["size"] == [48, 64, 64]
    assert info["setting"]["n_species"] == draw_setting(2).n_species
