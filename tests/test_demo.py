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
                     "--size", "48,96,96", "--explore-epochs", "1", "--refine-epochs", "1",
                     "--segments-epochs", "1", "--hard-epochs", "1"])
    assert code == 0
    report = json.loads((out / "demo_report.json").read_text())
    assert list(report) == ["synth", "ingest", "preprocess", "writer_lock", "mine", "patches", "patches2d3d", "explore",
                            "embed", "atlas", "refine", "pick", "explore_pick", "pick_hard", "fiber", "store_io", "export",
                            "interop", "segments", "total"]
    total = report["total"]
    assert total["wall_seconds"] >= 0.99 * sum(v["seconds"] for k, v in report.items() if k not in ("total", "store_io"))
    assert total["cpu_seconds"] > 0 and total["cores"] >= 1
    assert all(v["cpu_seconds"] >= 0 for k, v in report.items() if k != "total")
    assert report["store_io"]["metadata_reads_per_tomogram"] > 0 and report["store_io"]["chunk_reads"] > 0
    assert report["ingest"]["tomograms"] == 2 and report["ingest"]["with_tilt_series"] == 2
    assert report["mine"]["candidates"] > 10
    assert report["writer_lock"]["second_writer_refused"] is True
    assert report["embed"]["rows"] == report["patches"]["rows"]
    from milotile.explore import Encoder

    contract = Encoder.from_checkpoint(report["explore"]["checkpoint"]).contract
    assert contract["dog"] == [3.0, 5.0] and contract["gauss"] == 0.8 and contract["bbox"] == 24
    assert report["fiber"]["fibers"] >= 1
    assert report["atlas"]["clusters"] >= 2 and 0 <= report["explore_pick"]["f1_all"] <= 1
    assert report["explore_pick"]["labels"] > 0 and "f1_manual" in report["explore_pick"]
    # the atlas selection is recentred by `refine train` (never more labels than candidates selected)
    assert 0 < report["explore_pick"]["labels_after_recentring"] <= report["explore_pick"]["labels"]
    # ... unless `mine` (by default) already moved the candidates onto their centres: recentred once, not twice
    assert "recentred when mined (radius 12.0)" in report["explore_pick"]["label_recentring"]
    assert (out / "project.zarr" / "tables" / f"labels-explore-{report['refine']['species']}.parquet").exists()
    hard = report["pick_hard"]
    assert 0.0 <= hard["f1_all"] <= 1.0 and 0.0 <= hard["f1_dog_told_count"] <= 1.0 and hard["labelled"] >= 3
    assert 0.0 <= hard["f1_without_shape_check"] <= 1.0
    picks = pd.read_parquet(out / "picks.parquet")
    assert {"tomogram", "x", "y", "z", "x_A", "y_A", "z_A", "score", "class"} <= set(picks.columns)
    for fmt in ("milopyp", "imod", "star", "copick", "ndjson"):
        assert (out / "exports" / fmt).exists(), fmt
    assert len(pd.read_csv(out / "exports" / "picks.csv")) == len(picks)
    assert report["segments"]["objects"] > 20 and report["segments"]["accuracy"] > 0.4
    # copick project with the tomograms; the store root lists the images viewers open
    assert report["interop"]["copick_tomograms"] == 2
    assert report["interop"]["images"]["tomograms"] == 2 and report["interop"]["images"]["heatmaps"] == 4  # 2 pickers x 2
    printed = capsys.readouterr().out
    assert "milotile demo finished" in printed and "f1_all" in printed and "load average" in printed
    # real outcomes, not just keys: the DoG candidates find most particles (fixed seed) ...
    assert report["mine"]["mean_recall"] >= 0.6, report["mine"]
    # ... and pick used the checkpoint's validated threshold (else the automatic one), recorded with the picks
    from milotile.store import open_collection

    params = open_collection(out / "project.zarr").table_params("picks")
    validated = contract_of(out / "runs" / "refine")["suggested_threshold"]
    if validated is not None:
        assert params["threshold"] == pytest.approx(validated)
    else:  # no validation split: chosen from the peak scores and the training labels (refine.threshold)
        assert 0.0 < params["threshold"] < 1.0
    assert (picks["score"] >= params["threshold"]).all()


def contract_of(run) -> dict:
    from milotile.nn import load_checkpoint

    best = run / "best.pt"
    return load_checkpoint(best if best.exists() else run / "last.pt")["contract"]


def test_demo_report_times_every_stage_and_sums_up():
    """Each stage records wall and CPU seconds; the summary adds the total, the cores and the load average."""
    import time

    from milotile.demo import DemoReport, cpu_seconds

    report = DemoReport()
    t0, c0 = time.perf_counter(), cpu_seconds()
    while cpu_seconds() - c0 < 0.05:  # burn a little CPU in this stage
        sum(i * i for i in range(1000))
    report.add("busy", time.perf_counter() - t0, facts=1)
    report.add("idle", 0.0)
    busy, idle = report.stages["busy"], report.stages["idle"]
    assert busy["cpu_seconds"] >= 0.05 and busy["facts"] == 1 and idle["cpu_seconds"] < busy["cpu_seconds"]
    total = report.summary()
    assert total["cpu_seconds"] >= 0.05 and total["wall_seconds"] >= busy["seconds"] - 0.05
    assert total["cores"] >= 1 and list(total["stages_by_time"]) == ["busy", "idle"]
    assert total["load_avg_1m_start"] >= 0
