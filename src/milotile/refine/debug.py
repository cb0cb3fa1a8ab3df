"""Debug figures of training validation: a tomogram slice with labels and picks beside the heatmap."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.ops.grid import Grid
from milotile.ops.intensity import contrast_clip

__all__ = ["debug_png"]


def debug_png(debug_dir: Path, epoch: int, col: Any, name: str, stats: tuple[float, float], picker: Any,
              prob: np.ndarray, grid: Grid, reg: dict, picks: pd.DataFrame, truth: pd.DataFrame,
              slices: Sequence[int]) -> None:
    """Draw one PNG per level-0 slice ``z`` of ``slices`` that lies inside the region ``reg``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    debug_dir.mkdir(parents=True, exist_ok=True)
    thr = picker.contract.get("suggested_threshold")
    thr = 0.5 if thr is None else float(thr)
    clip = picker.contract.get("clip", (-3.0, 3.0))
    (y0, x0), (y1, x1) = reg["start"][1:], reg["stop"][1:]
    for z in slices:
        if not reg["start"][0] <= z < reg["stop"][0]:
            continue
        raw = np.asarray(col[name].data(0)[int(z), y0:y1, x0:x1].compute(), np.float32)
        img = contrast_clip(raw, stats[0], stats[1], float(clip[0]), float(clip[1]))
        k = int(np.clip(np.rint(grid.from_level0([z, y0, x0])[0]), 0, prob.shape[1] - 1))
        hm = prob[:, k].max(0)
        (_, gy, gx), (_, oy, ox) = grid.scale, grid.offset
        extent = (ox - x0 - gx / 2, ox - x0 + (hm.shape[1] - 0.5) * gx, oy - y0 + (hm.shape[0] - 0.5) * gy, oy - y0 - gy / 2)
        fig = Figure(figsize=(8, 4))
        FigureCanvasAgg(fig)
        a1, a2 = fig.subplots(1, 2)
        a1.imshow(img, cmap="gray")
        dz = picker.contract["bbox"] / 4
        t = truth[(truth["z"] - z).abs() <= dz]
        p = picks[(picks["score"] > thr) & ((picks["z"] - z).abs() <= dz)]
        a1.scatter(t["x"] - x0, t["y"] - y0, s=60, facecolors="none", edgecolors="lime", label="labels")
        a1.scatter(p["x"] - x0, p["y"] - y0, s=20, marker="x", c="red", label="picks")
        a1.set_title(f"{name} z={z}")
        a2.imshow(hm, cmap="magma", vmin=0, vmax=max(float(hm.max()), 0.05), extent=extent)
        a2.set_xlim(-0.5, x1 - x0 - 0.5)
        a2.set_ylim(y1 - y0 - 0.5, -0.5)
        a2.set_title(f"heatmap, max {float(hm.max()):.2f} (epoch {epoch})")
        for a in (a1, a2):
            a.set_axis_off()
        fig.tight_layout()
        fig.savefig(debug_dir / f"epoch{epoch:03d}_{name}_z{int(z)}.png", dpi=80)
