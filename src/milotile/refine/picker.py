"""A trained picker: model + contract, and block-wise prediction on raw level-0 voxels.

The contract's preprocessing is the one of :mod:`milotile.ops.preprocess` (compression, Gaussian,
normalisation with the statistics of the *filtered* tomogram). Checkpoints written before that
contract (``contract["preprocessing"]`` below :data:`PREPROCESSING_VERSION`) normalised with the raw
volume's statistics; they are refused with a message naming the retrain step.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from milotile.errors import InputError
from milotile.nn.checkpoint import build_model, load_checkpoint
from milotile.nn.device import autocast, pick_device
from milotile.ops.grid import Grid
from milotile.ops.preprocess import preprocess_block
from milotile.refine import model as _model  # noqa: F401  (registers unet4 / unet5 / ressmall)
from milotile.refine import predict
from milotile.refine.decode import picker_grid

logger = logging.getLogger(__name__)

__all__ = ["PREPROCESSING_VERSION", "Picker"]

#: version of the picker preprocessing contract (2: one preprocessing, statistics of the filtered volume)
PREPROCESSING_VERSION = 2


class Picker:
    """A trained positive-unlabeled picker.

    Attributes
    ----------
    model : torch.nn.Module
        The network in eval mode on ``device``.
    contract : dict
        Everything prediction needs: preprocessing (``gauss``, ``clip``, ``compress``,
        ``normalization``), geometry (``bbox``, ``crop``, ``down_ratio``, ``out_stride``,
        ``out_offset``, ``receptive_field``, ``halo``, ``voxel_size``), ``classes`` and the
        validation-chosen ``suggested_threshold``.
    device : torch.device
        Where the model runs.
    path : pathlib.Path or None
        Checkpoint the picker was loaded from.
    amp : bool
        Mixed precision on CUDA (bf16, else fp16) while predicting; set False for fp32
        (``benchmarks/gpu.sh`` measures both).
    """

    amp: bool = True

    def __init__(self, model: torch.nn.Module, contract: dict[str, Any], device: torch.device | str | None = None,
                 path: str | os.PathLike[str] | None = None) -> None:
        self.device = pick_device(device)
        self.model = model.to(self.device).eval()
        self.contract = dict(contract)
        self.path = Path(path) if path is not None else None

    @classmethod
    def load(cls, ckpt_path: str | os.PathLike[str], device: torch.device | str | None = None) -> Picker:
        """Load a picker checkpoint written by :func:`milotile.refine.train`.

        Parameters
        ----------
        ckpt_path
            ``best.pt`` / ``last.pt`` of a refine run (or the run folder: ``best.pt`` is used).
        device
            ``None``/``"auto"`` (CUDA when present), ``"cpu"``, ``"cuda:N"``.
        """
        p = Path(ckpt_path)
        if p.is_dir():
            p = p / "best.pt" if (p / "best.pt").is_file() else p / "last.pt"
        ckpt = load_checkpoint(p)
        contract = ckpt.get("contract") or {}
        if contract.get("kind") != "refine-picker":
            raise InputError(f"checkpoint {str(p)!r} is not a refine picker (contract kind {contract.get('kind')!r}).")
        if int(contract.get("preprocessing", 1)) < PREPROCESSING_VERSION:
            raise InputError(
                f"checkpoint {str(p)!r} was trained with the old picker preprocessing (raw-volume statistics); "
                "retrain it with `milotile refine train` (same options) to use it with this version."
            )
        model = build_model(ckpt)
        return cls(model, contract, device=device, path=p)

    # ------------------------------------------------------------------ geometry
    @property
    def halo(self) -> tuple[int, int, int]:
        """Level-0 voxels (z, y, x) of context needed on each side of a block (receptive field +
        Gaussian support; y/x rounded up to the model's alignment, z to even when compressed)."""
        return tuple(int(h) for h in self.contract["halo"])  # type: ignore[return-value]

    @property
    def n_classes(self) -> int:
        """Number of output channels."""
        return int(self.contract.get("n_classes", 1))

    @property
    def classes(self) -> list[str]:
        """Class (species) name of each output channel."""
        return list(self.contract.get("classes") or ["particle"])

    def out_shape(self, block_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        """Output-grid shape for a raw block shape (z, y, x)."""
        z, y, x = block_shape
        zs, ys, xs = self.contract["out_stride"]
        return math.ceil(z / zs), math.ceil(y / ys), math.ceil(x / xs)

    @property
    def grid(self) -> Grid:
        """Where output voxel ``k`` of a block starting at level-0 voxel 0 lies (``grid.shifted(origin)``)."""
        return picker_grid(self.contract)

    # ------------------------------------------------------------------ prediction
    def _slab_depth(self) -> tuple[int, int]:
        rf_z_model = int(self.contract["receptive_field_model"][0])
        mz = rf_z_model // 2
        return max(int(self.contract["crop"][0]), 2 * mz + 8), mz

    def predict_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for an already preprocessed ``(D, Y, X)`` block (model-input slices).

        2.5D models (``predict_volume``) run their 2D trunk once per slice and the 3D head over the
        whole block; other models run on overlapping z slabs. Averaged over ``contract["tta"]`` exact
        in-plane symmetries (:mod:`milotile.refine.tta`).
        """
        n_views = int(self.contract.get("tta", 1))
        if n_views > 1:
            from milotile.refine.tta import tta_average

            return tta_average(self._predict_once, x, n_views)
        return self._predict_once(x)

    @property
    def cpu_bf16(self) -> bool:
        """Whether prediction on a CPU with native bf16 (AMX / AVX512-BF16) runs under bf16 autocast: the
        contract's ``cpu_bf16`` (the recipe's, recorded at training; checkpoints without it: fp32).
        ``MILOTILE_CPU_BF16=0`` turns it off."""
        return bool(self.contract.get("cpu_bf16", False))

    def _autocast(self) -> Any:
        return autocast(self.device, enabled=self.amp, cpu=bool(self.cpu_bf16))

    @torch.no_grad()
    def _predict_once(self, x: np.ndarray) -> np.ndarray:
        if hasattr(self.model, "predict_volume"):
            t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
            with self._autocast():
                logits = self.model.predict_volume(t)
            return torch.sigmoid(logits.float()).cpu().numpy()
        d = x.shape[0]
        slab, mz = self._slab_depth()
        out: np.ndarray | None = None
        step = max(slab - 2 * mz, 1)
        starts = [0] if d <= slab else list(range(0, d - slab, step)) + [d - slab]
        for s in starts:
            e = min(s + slab, d)
            t = torch.from_numpy(np.ascontiguousarray(x[s:e]))[None].to(self.device)
            with self._autocast():
                logits = self.model(t)["hm"]
            prob = torch.sigmoid(logits.float())[0].cpu().numpy()
            if out is None:
                out = np.empty((prob.shape[0], d, prob.shape[2], prob.shape[3]), np.float32)
            keep0 = 0 if s == 0 else mz
            keep1 = (e - s) if e == d else (e - s - mz)
            out[:, s + keep0 : s + keep1] = prob[:, keep0:keep1]
        assert out is not None
        return out

    def predict_block(self, raw_block: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
        """Heatmap probabilities of a raw level-0 block.

        Parameters
        ----------
        raw_block
            ``(Z, Y, X)`` float32 raw voxels, including the halo (:attr:`halo`) around the region of
            interest; outputs within the halo are affected by the block border.
        stats
            Global (mean, std) of the filtered tomogram (:func:`milotile.refine.predict.picker_stats`).

        Returns
        -------
        numpy.ndarray
            float32 ``(C, Z', Y', X')`` on the model output grid: ``Y' = ceil(Y/2)``,
            ``X' = ceil(X/2)``, ``Z' = Z`` (``ceil(Z/2)`` with compression). Output voxel ``k`` sits at
            level-0 :attr:`grid` ``.to_level0(k)`` relative to the block origin.
        """
        raw = np.asarray(raw_block)
        if raw.ndim != 3:
            raise InputError(f"predict_block expects a (Z, Y, X) block, got shape {raw.shape}.")
        if not np.isfinite(raw).all():
            raise InputError("The block passed to predict_block contains NaN or infinite voxels.")
        c = self.contract
        x = preprocess_block(raw, mean=float(stats[0]), std=float(stats[1]), gauss=float(c.get("gauss", 0.0)),
                             clip=tuple(c.get("clip", (-3.0, 3.0))), compress=bool(c.get("compress", False)),
                             compress_how=str(c.get("compress_how", "max")))
        return self.predict_preprocessed(x)

    def pick(self, col: Any, **kw: Any) -> Any:
        """Pick particles in a whole collection; see :func:`milotile.refine.predict.pick`."""
        return predict.pick(col, self, **kw)

    def __repr__(self) -> str:
        c = self.contract
        return (f"Picker(arch={c.get('arch')!r}, classes={self.classes}, bbox={c.get('bbox')}, "
                f"compress={c.get('compress')}, device={self.device})")
