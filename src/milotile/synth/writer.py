"""Files written by :func:`milotile.synth.synth`: MRC volumes and stacks, ``.tlt``, manifest, tables.

All writers are deterministic (no time stamps), so the same inputs give byte-identical files.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

__all__ = ["write_manifest", "write_table", "write_tilt_stack", "write_tlt", "write_volume"]

MANIFEST_HEADER = ("image_name", "rec_path", "tilt_path", "angle_path")


def _fixed_label(mrc: mrcfile.mrcfile.MrcFile, text: str) -> None:
    """Replace mrcfile's time-stamped label so that identical data give identical files."""
    mrc.header.label[:] = b""
    mrc.header.label[0] = text.encode("ascii")[:80]
    mrc.header.nlabl = 1


def write_volume(path: Path, data: np.ndarray, voxel_size: float) -> None:
    """Write a float32 volume ``(z, y, x)`` as MRC (sections = z) with ``voxel_size`` Å."""
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(data, dtype=np.float32))
        mrc.set_volume()
        mrc.voxel_size = float(voxel_size)
        mrc.update_header_stats()
        _fixed_label(mrc, "milotile synth: tomogram (z, y, x)")


def write_tilt_stack(path: Path, stack: np.ndarray, pixel_size: float) -> None:
    """Write a float32 image stack ``(n_tilts, y, x)`` as MRC (ISPG 0) with ``pixel_size`` Å."""
    with mrcfile.new(str(path), overwrite=True) as mrc:
        mrc.set_data(np.ascontiguousarray(stack, dtype=np.float32))
        mrc.set_image_stack()
        mrc.voxel_size = float(pixel_size)
        mrc.update_header_stats()
        _fixed_label(mrc, "milotile synth: aligned tilt series (tilt, y, x)")


def write_tlt(path: Path, angles: Sequence[float] | np.ndarray) -> None:
    """One tilt angle (degrees) per line, IMOD ``.tlt`` style."""
    text = "".join(f"{a:.2f}\n" for a in np.asarray(angles, dtype=np.float64))
    Path(path).write_text(text)


def write_manifest(path: Path, rows: Sequence[tuple[str, Path, Path, Path]]) -> None:
    """MiLoPYP image list: tab separated, header ``image_name rec_path tilt_path angle_path``."""
    lines = ["\t".join(MANIFEST_HEADER)]
    for name, rec, tilt, tlt in rows:
        lines.append(
            "\t".join(
                [
                    name,
                    str(Path(rec).resolve()),
                    str(Path(tilt).resolve()),
                    str(Path(tlt).resolve()),
                ]
            )
        )
    Path(path).write_text("\n".join(lines) + "\n")


def write_table(df: pd.DataFrame, parquet: Path | None = None, tsv: Path | None = None) -> None:
    """Write a table as parquet and/or TSV (no index)."""
    if parquet is not None:
        df.to_parquet(parquet, index=False)
    if tsv is not None:
        df.to_csv(tsv, sep="\t", index=False)
