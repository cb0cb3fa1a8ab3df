"""Per-run options and per-epoch metrics (CSV + JSONL) with a loss plot, resume-safe."""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = ["RunLog"]


def _plain(v: Any) -> Any:
    """Convert numpy / torch scalars and paths to JSON-friendly values."""
    if hasattr(v, "item") and callable(v.item):
        try:
            return v.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(v, os.PathLike):
        return os.fspath(v)
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    return str(v)


class RunLog:
    """Options and metrics of one training run, kept as plain files in ``run_dir``.

    Files: ``options.json``, ``log.jsonl`` (one record per epoch, the source of truth),
    ``log.csv`` (the same, rewritten when new columns appear) and plots.

    Parameters
    ----------
    run_dir : path-like
        The run folder (created).

    Examples
    --------
    >>> import tempfile
    >>> rl = RunLog(tempfile.mkdtemp())
    >>> rl.log_epoch({"epoch": 1, "loss": -0.5})
    >>> rl.records()[0]["loss"]
    -0.5
    """

    def __init__(self, run_dir: str | os.PathLike[str]) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.run_dir / "log.jsonl"
        self.csv_path = self.run_dir / "log.csv"
        self.options_path = self.run_dir / "options.json"

    def save_options(self, options: dict[str, Any], name: str = "options.json") -> Path:
        """Write ``options`` as indented JSON (atomically) and return the path."""
        path = self.run_dir / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(_plain(options), indent=2, sort_keys=True) + "\n")
        os.replace(tmp, path)
        return path

    def load_options(self, name: str = "options.json") -> dict[str, Any] | None:
        """The saved options, or None if none were saved."""
        path = self.run_dir / name
        if not path.is_file():
            return None
        return json.loads(path.read_text())

    def records(self) -> list[dict[str, Any]]:
        """All epoch records logged so far, in order."""
        if not self.jsonl_path.is_file():
            return []
        out = []
        with self.jsonl_path.open() as fh:
            for line in fh:
                line = line.strip()
                if line:
                    try:
                        out.append(json.loads(line))
                    except json.JSONDecodeError:
                        log.warning("skipping a truncated line in %s", self.jsonl_path)
        return out

    def truncate(self, last_epoch: int, key: str = "epoch") -> None:
        """Drop records with ``record[key] > last_epoch`` (used on resume from an older checkpoint)."""
        recs = [r for r in self.records() if r.get(key, -math.inf) <= last_epoch]
        tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
        os.replace(tmp, self.jsonl_path)
        self._write_csv(recs)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Append one record to ``log.jsonl`` and ``log.csv`` (existing rows are kept)."""
        rec = _plain(dict(record))
        with self.jsonl_path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        fields = self._csv_fields()
        if fields is not None and set(rec) <= set(fields):
            with self.csv_path.open("a", newline="") as fh:
                csv.DictWriter(fh, fieldnames=fields).writerow(rec)
        else:
            self._write_csv(self.records())

    def _csv_fields(self) -> list[str] | None:
        if not self.csv_path.is_file():
            return None
        with self.csv_path.open(newline="") as fh:
            header = next(csv.reader(fh), None)
        return header or None

    def _write_csv(self, recs: Sequence[dict[str, Any]]) -> None:
        fields: list[str] = []
        for r in recs:
            for k in r:
                if k not in fields:
                    fields.append(k)
        tmp = self.csv_path.with_suffix(".csv.tmp")
        with tmp.open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=fields)
            w.writeheader()
            for r in recs:
                w.writerow(r)
        os.replace(tmp, self.csv_path)

    def plot(
        self,
        keys: Sequence[str] | str = ("loss",),
        png_path: str | os.PathLike[str] | None = None,
        x: str = "epoch",
    ) -> Path:
        """Plot the logged ``keys`` against ``x`` into a PNG (one panel per key).

        Parameters
        ----------
        keys : str or sequence of str
            Record keys to plot; keys never logged are skipped.
        png_path : path-like, optional
            Output file; default ``<run_dir>/<first key>.png``.
        x : str
            The x-axis key (falls back to the record index).

        Returns
        -------
        pathlib.Path
        """
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if isinstance(keys, str):
            keys = [keys]
        recs = self.records()
        keys = [k for k in keys if any(k in r for r in recs)] or list(keys)[:1]
        path = Path(png_path) if png_path is not None else self.run_dir / f"{keys[0]}.png"
        fig = Figure(figsize=(6, 2.4 * len(keys)))
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(keys), 1, squeeze=False)
        for ax, k in zip(axes[:, 0], keys, strict=True):
            pts = [(r.get(x, i + 1), r[k]) for i, r in enumerate(recs) if r.get(k) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker="o", ms=3)
            ax.set_ylabel(k)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel(x)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=100)
        return path
