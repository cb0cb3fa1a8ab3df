"""The attack list (issue 27): every bad input gives one sentence, its exit code, and changes nothing.

Each case runs ``milotile`` (in process, like the console script) on its own copy of a small store
(ingested, preprocessed, mined) and checks: the exit code; that stderr is one line
``milotile <command>: error: <sentence>`` matching the expected text, with no traceback; and that
every file of the store is byte-for-byte what it was before (SHA-1 of each file). File-system errors
during a write (full disk, quota, read-only, permissions) are injected with a monkeypatched store
write; the output being written is then left marked incomplete and the rest is unchanged.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

import milotile as mt
from milotile.cli import main as cli_main
from milotile.store import write_mrc


def digest(root: Path) -> dict[str, str]:
    """SHA-1 of every file under ``root`` (relative path -> hex)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict[str, Path]:
    """Synthetic data, and a store ingested, preprocessed and mined from it."""
    from milotile.synth import synth

    root = tmp_path_factory.mktemp("attack")
    res = synth(root / "syn", seed=1, n_tomograms=2, size=(24, 64, 64), snr=1.0, angles=(-60, 60, 12),
                n_particles=6)
    col = mt.ingest(res.manifest, root / "s.zarr")
    col.preprocess(gauss=1.0)
    col.mine(border=4, border_z=2)
    return {"root": root, "store": root / "s.zarr", "syn": root / "syn", "manifest": Path(res.manifest)}


@dataclass
class Case:
    """One attack: ``argv(tmp, store, syn)`` builds the command line (and any bad file), ``code`` and
    ``match`` (a regular expression searched in the error sentence) are what must come back."""

    id: str
    argv: Callable[[Path, Path, Path], list[str]]
    code: int
    match: str


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def _labels(tmp: Path, rows: str, header: str = "image_name\tx\ty\tz") -> str:
    return _write(tmp / "labels.tsv", header + "\n" + rows + "\n")


def _version_99(tmp: Path, store: Path, syn: Path) -> list[str]:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["milotile"]["version"] = 99
    (store / "zarr.json").write_text(json.dumps(doc))
    return ["preprocess", str(store)]


def _nan_volume(tmp: Path, store: Path, syn: Path) -> list[str]:
    v = np.ones((16, 32, 32), np.float32)
    v[3, 4, 5] = np.nan
    write_mrc(tmp / "nan.rec", v, voxel_size=10.0)
    return ["ingest", str(tmp / "nan.rec"), "--store", str(store)]


def _edited_tlt(tmp: Path, store: Path, syn: Path) -> list[str]:
    """The .tlt of an ingested tomogram edited (one angle changed), then ingest again without --overwrite."""
    tlt = syn / "tomo_000.tlt"
    angles = tlt.read_text().split()
    angles[0] = str(float(angles[0]) + 1.5)
    tlt.write_text("\n".join(angles) + "\n")
    return ["ingest", str(syn / "tomograms.txt"), "--store", str(store)]


def _old_store_serve(tmp: Path, store: Path, syn: Path) -> list[str]:
    """A store from before the runs/ marker, served read-only: nothing may be written (not even the marker)."""
    (store / "runs").mkdir(exist_ok=True)
    (store / "runs" / "zarr.json").unlink(missing_ok=True)
    (store / "runs" / "old-run.txt").write_text("a file of an older run\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return ["explore", "serve", str(store), "--port", str(port)]


def _file_in_the_way(tmp: Path, store: Path, syn: Path) -> list[str]:
    (tmp / "afile").write_text("x")
    return ["export", "candidates", "--format", "csv", "--store", str(store), "--out", str(tmp / "afile" / "x.csv")]


CASES = [
    Case("store-missing", lambda t, s, y: ["preprocess", str(t / "nope.zarr")], 2,
         r"is not a milotile store .*`milotile ingest`"),
    Case("store-is-a-file", lambda t, s, y: ["info", _write(t / "f.zarr", "not a store")], 2, r"not a milotile store"),
    Case("store-is-a-zarr-array", lambda t, s, y: ["info", str(s / "tomograms" / "tomo_000" / "0")], 2,
         r"Zarr array, not a milotile collection store"),
    Case("store-newer-version", _version_99, 2, r"newer milotile \(store version 99.*upgrade milotile"),
    Case("workers-zero", lambda t, s, y: ["--workers", "0", "preprocess", str(s)], 2, r"--workers"),
    Case("ingest-missing-file", lambda t, s, y: ["ingest", str(t / "ghost.rec"), "--store", str(s)], 2,
         r"ghost.rec.* (does not exist|not found)"),
    Case("ingest-not-an-mrc", lambda t, s, y: ["ingest", _write(t / "junk.rec", "hello\n" * 50), "--store", str(s)],
         2, r"junk.rec"),
    Case("ingest-nan-volume", _nan_volume, 2, r"NaN"),
    Case("ingest-negative-voxel-size", lambda t, s, y: ["ingest", str(y / "tomo_000.rec"), "--store", str(s),
                                                        "--voxel-size", "-1"], 2, r"voxel-size must be positive"),
    Case("ingest-edited-tlt", _edited_tlt, 2, r"tilt series \(stack or angles\) changed.*--overwrite"),
    Case("preprocess-bad-clip", lambda t, s, y: ["preprocess", str(s), "--clip", "3,-3"], 2, r"clip"),
    Case("mine-zero-candidates", lambda t, s, y: ["mine", str(s), "--threshold-std", "1000", "--border", "4"], 2,
         r"0 candidates.*lower --threshold-std"),
    Case("patches-bbox-larger-than-volume", lambda t, s, y: ["patches", str(s), "--bbox", "400"], 2,
         r"--bbox 400 is larger than tomogram tomo_000"),
    Case("patches-bbox-zero", lambda t, s, y: ["patches", str(s), "--bbox", "0"], 2, r"--bbox must be at least 2"),
    Case("patches-missing-table", lambda t, s, y: ["patches", str(s), "--table", "picks"], 2,
         r"no table 'picks'; run `milotile refine pick` first"),
    Case("explore-train-without-patches", lambda t, s, y: ["explore", "train", str(s)], 2,
         r"no patch bank 'patches'; run `milotile patches` first"),
    Case("atlas-without-embeddings", lambda t, s, y: ["explore", "atlas", str(s)], 2,
         r"run `milotile explore embed` first"),
    Case("segments-cluster-without-volume", lambda t, s, y: ["segments", "cluster", str(s)], 2,
         r"`milotile segments ingest`"),
    Case("serve-older-store-without-atlas", _old_store_serve, 2, r"run `milotile explore atlas` first"),
    Case("labels-missing-file", lambda t, s, y: ["refine", "train", str(s), "--labels", str(t / "none.tsv")], 2,
         r"none.tsv does not exist"),
    Case("labels-unknown-header", lambda t, s, y: ["refine", "train", str(s), "--labels",
                                                   _write(t / "l.tsv", "foo\tbar\tbaz\n1\t2\t3\n")], 2,
         r"image_name.*x y z.*rlnCoordinateX"),
    Case("labels-outside-the-volume", lambda t, s, y: ["refine", "train", str(s), "--labels",
                                                       _labels(t, "tomo_000\t9999\t10\t10")], 2, r"outside"),
    Case("labels-unknown-tomogram", lambda t, s, y: ["refine", "train", str(s), "--labels",
                                                     _labels(t, "tomo_999\t10\t10\t10")], 2, r"tomo_999"),
    Case("negatives-unknown-header", lambda t, s, y: ["refine", "train", str(s), "--labels",
                                                      _labels(t, "tomo_000\t20\t20\t10"), "--negatives",
                                                      _write(t / "n.csv", "a,b,c\n1,2,3\n")], 2,
         r"(n.csv|Table).*expected a header row"),
    Case("export-unknown-table", lambda t, s, y: ["export", "nosuch", "--format", "csv", "--store", str(s),
                                                  "--out", str(t / "o")], 2, r"neither a file nor a table"),
    Case("export-file-in-the-way", _file_in_the_way, 2, r"is a file, not a folder"),
    Case("unlock-without-lock", lambda t, s, y: ["unlock", str(s), "derived/preprocessed/tomo_000"], 2,
         r"has no writer lock"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_attack(case: Case, base, tmp_path, capsys):
    store, syn = tmp_path / "s.zarr", tmp_path / "syn"
    shutil.copytree(base["store"], store)
    shutil.copytree(base["syn"], syn)
    (syn / "tomograms.txt").write_text(base["manifest"].read_text().replace(str(base["syn"]), str(syn)))
    argv = case.argv(tmp_path, store, syn)
    before = digest(store)
    try:
        code = cli_main(argv)
    except SystemExit as exc:  # argparse refusals
        code = exc.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and " WARNING " not in ln and " INFO " not in ln]
    assert code == case.code, err
    assert "Traceback" not in err
    assert len(lines) == 1 and lines[0].startswith(f"milotile {argv[0] if argv[0] != '--workers' else argv[2]}"), err
    sentence = lines[0].split(": error: ", 1)[1]
    assert re.search(case.match, sentence), sentence
    assert not re.search(r"[.;]\s+[A-Z]", sentence), f"more than one sentence: {sentence}"
    assert digest(store) == before, "the refused command changed files of the store"
    # and `info` still reads the store afterwards (refusals leave nothing half-written)
    if (store / "zarr.json").is_file() and case.id != "store-newer-version":
        assert cli_main(["info", str(store)]) == 0
        assert "(incomplete)" not in capsys.readouterr().out


def test_newer_store_is_read_with_a_warning(base, tmp_path, capsys, caplog):
    store = tmp_path / "s.zarr"
    shutil.copytree(base["store"], store)
    _version_99(tmp_path, store, tmp_path)
    assert cli_main(["info", str(store)]) == 0
    assert "tomo_000" in capsys.readouterr().out
    assert any("newer than this milotile" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_file_system_error_during_a_write_is_one_sentence_and_leaves_the_output_incomplete(
        err, base, tmp_path, capsys, monkeypatch):
    import zarr.storage

    store = tmp_path / "s.zarr"
    shutil.copytree(base["store"], store)
    before = digest(store)
    real_set = zarr.storage.LocalStore.set

    async def failing_set(self, key, value):  # noqa: ANN001
        if key.startswith("derived/preprocessed/") and "/c/" in key:  # the first chunk of the new volume
            raise OSError(err, f"injected {errno.errorcode[err]}", str(self.root / key))
        return await real_set(self, key, value)

    monkeypatch.setattr(zarr.storage.LocalStore, "set", failing_set)
    code = cli_main(["preprocess", str(store), "--gauss", "2"])
    err_text = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err_text
    (line,) = [ln for ln in err_text.splitlines() if ": error: " in ln]
    assert "derived/preprocessed/" in line and "left marked incomplete" in line
    monkeypatch.setattr(zarr.storage.LocalStore, "set", real_set)
    after = digest(store)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed and all(k.startswith("derived/preprocessed/") for k in changed), sorted(changed)[:5]
    assert cli_main(["info", str(store)]) == 0
    assert "(incomplete)" in capsys.readouterr().out
    # the next run redoes it
    assert cli_main(["preprocess", str(store), "--gauss", "2"]) == 0
    assert cli_main(["info", str(store)]) == 0
    assert "(incomplete)" not in capsys.readouterr().out


def test_first_export_on_a_fresh_store_says_nothing_untrue(base, tmp_path, capsys, caplog):
    """A store milotile just wrote has every marker: no 'older milotile' warning; --out dir/csv is a folder."""
    out = tmp_path / "dir" / "csv"
    assert cli_main(["export", "candidates", "--format", "csv", "--store", str(base["store"]), "--out", str(out)]) == 0
    assert (out / "picks.csv").is_file() and not (tmp_path / "dir" / "csv.csv").exists()
    assert not [r for r in caplog.records if "zarr marker" in r.getMessage()]
