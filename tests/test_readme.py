"""The README's Python example runs as written, on tiny synthetic data (epochs shortened)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
import starfile

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    code = next(b for b in blocks if "mt.ingest(" in b and "picker.pick(" in b)
    return re.sub(r"epochs=\d+", "epochs=1", code)  # the only change: one epoch per training


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    from milotile.synth import synth

    res = synth(tmp_path / "data", seed=5, n_tomograms=2, size=(32, 96, 96), n_particles=10, filament=False)
    shutil.copy(res.manifest, tmp_path / "tomograms.txt")  # absolute paths inside
    gt = res.ground_truth
    starfile.write({"particles": pd.DataFrame({
        "rlnTomoName": gt["tomogram"], "rlnCoordinateX": gt["x"], "rlnCoordinateY": gt["y"], "rlnCoordinateZ": gt["z"],
    })}, tmp_path / "picks.star")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 - the documented example
    assert len(scope["cands"].df) > 0 and scope["bank"].n == len(scope["cands"].df)
    assert len(scope["emb"]) == scope["bank"].n
    assert (tmp_path / "particles.star").is_file()
    # no validation labels (the default recipe): pick chose its threshold from the peak scores and the
    # training labels stored in the checkpoint, and recorded it with the picks
    assert scope["picker"].contract["suggested_threshold"] is None and scope["picker"].contract["train_labels"]
    used = scope["col"].table_params("picks")["threshold"]
    assert 0.0 < used < 1.0 and (scope["picks"]["score"] >= used).all()
