"""The picker's contract: everything prediction needs, stored in every checkpoint.

Preprocessing (``gauss``, ``compress``, ``compress_how``, ``clip``; the one preprocessing of
:mod:`milotile.ops.preprocess`, version :data:`milotile.refine.picker.PREPROCESSING_VERSION`),
geometry (``bbox``, ``crop``, ``out_stride``/``out_offset`` = the output :class:`~milotile.ops.grid.Grid`,
receptive field and ``halo`` in level-0 voxels, ``xy_alignment``), classes, and the score threshold
validation chose (``suggested_threshold``; ``None`` until a validation ran).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from milotile.ops.preprocess import block_halo
from milotile.refine.data import model_crop_shape
from milotile.refine.picker import PREPROCESSING_VERSION

__all__ = ["picker_contract"]


def picker_contract(*, arch: str, model: torch.nn.Module, classes: list[str], bbox: float, crop: Sequence[int],
                    gauss: float, compress: bool, clip: Sequence[float], thresh: float, tau: float, geom: Any,
                    voxel_size: float, train_stats: dict, val_radius: float, compress_how: str = "max") -> dict:
    """The contract of a picker being trained (see the module notes)."""
    rf = model.receptive_field()  # model-input voxels
    gz, gy, gx = block_halo(gauss, compress)
    zs = 2 if compress else 1
    rf_raw = (rf[0] * zs + (zs - 1) + 2 * gz, rf[1] + 2 * gy, rf[2] + 2 * gx)
    al = int(getattr(model, "xy_alignment", 2))
    hz = int(math.ceil((rf_raw[0] - 1) / 2))
    if compress:
        hz += hz % 2
    hxy = [int(math.ceil(math.ceil((r - 1) / 2) / al) * al) for r in rf_raw[1:]]
    return {
        "kind": "refine-picker",
        "preprocessing": PREPROCESSING_VERSION,
        "arch": arch,
        "n_classes": len(classes),
        "classes": list(classes),
        "bbox": float(bbox),
        "crop": list(model_crop_shape(crop)),
        "down_ratio": 2,
        "out_stride": [zs, 2, 2],
        "out_offset": [0.5 if compress else 0.0, 0.0, 0.0],
        "gauss": float(gauss),
        "compress": bool(compress),
        "compress_how": str(compress_how),
        "clip": [float(clip[0]), float(clip[1])],
        "normalization": {"method": "zscore-clip-unit", "stats": "global mean/std of the filtered tomogram"},
        "train_stats": {k: [float(v[0]), float(v[1])] for k, v in train_stats.items()},
        "receptive_field_model": [int(v) for v in rf],
        "receptive_field": [int(v) for v in rf_raw],
        "halo": [hz, *hxy],
        "xy_alignment": al,
        "voxel_size": float(voxel_size),
        "target_sigma": float(geom.sigma),
        "target_radius": float(geom.radius),
        "thresh": float(thresh),
        "tau": float(tau),
        "match_radius": float(val_radius),
        "suggested_threshold": None,
    }
