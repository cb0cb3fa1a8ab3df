"""The README's main command: `milotile demo` runs every stage end to end on generated data."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from milotile.cli import main as cli_main


@pytest.mark.slow
def test_demo_runs_every_stage(tmp_path, capsys):
    out = tmp_path / "demo"
    code = cli_main(["-q", "--workers", "1", "demo", "--out", str(out), "--n-tomograms", "2",
                     "--size", "48,96,96", "--explore-epochs", "1", "--refine-epochs", "1"])
    assert code == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert list(report) == ["synth", "ingest", "preprocess", "mine", "patches", "patches2d3d", "explore",
                            "embed", "refine", "pick", "fiber", "export", "interop"]
    assert report["ingest"]["tomograms"] == 2 and report["ingest"]["with_tilt_series"] == 2
    assert report["mine"]["candidates"] > 10
    assert report["embed"]["rows"] == report["patches"]["rows"]
    from milotile.explore import Encoder

    contract = Encoder.from_checkpoint(report["explore"]["checkpoint"]).contract
    assert contract["dog"] == [3.0, 5.0] and contract["gauss"] == 0.8 and contract["bbox"] == 24
    assert report["fiber"]["fibers"] >= 1
    picks = pd.read_parquet(out / "picks.parquet")
    assert {"tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "class"} <= set(picks.columns)
    for fmt in ("milopyp", "imod", "star", "copick", "ndjson"):
        assert (out / "exports" / fmt).exists(), fmt
    assert len(pd.read_csv(out / "exports" / "picks.csv")) == len(picks)
    # copick project with the tomograms; the store root lists the images viewers open
    assert report["interop"]["copick_tomograms"] == 2
    assert report["interop"]["images"]["tomograms"] == 2 and report["interop"]["images"]["heatmaps"] == 2
    printed = capsys.readouterr().out
    assert "milotile demo finished" in printed and "f1_all" in printed
