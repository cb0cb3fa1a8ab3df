"""Device selection, mixed precision and seeding shared by the torch stages."""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator

import numpy as np
import torch

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["pick_device", "autocast", "seed_everything", "amp_dtype"]


def pick_device(prefer: str | torch.device | None = None) -> torch.device:
    """Choose the torch device a stage runs on.

    Parameters
    ----------
    prefer : str or torch.device, optional
        ``None`` or ``"auto"``: CUDA when available, else CPU. ``"cpu"`` forces the CPU.
        ``"cuda"`` / ``"cuda:1"`` / ``"mps"`` ask for that device and fail if it is missing.

    Returns
    -------
    torch.device
    """
    if isinstance(prefer, torch.device):
        prefer = str(prefer)
    if prefer is None or prefer == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        dev = torch.device(prefer)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"unknown device {prefer!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {prefer!r} was requested but CUDA is not available on this machine.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(
            f"device {prefer!r} was requested but only {torch.cuda.device_count()} CUDA device(s) exist."
        )
    if dev.type == "mps" and not (
        hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    ):
        raise InputError(f"device {prefer!r} was requested but MPS is not available.")
    return dev


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype used on ``device`` (bf16 where supported, else fp16), or None on CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True) -> Iterator[None]:
    """Automatic mixed precision on CUDA (bf16, or fp16 where bf16 is missing); a no-op on CPU.

    Parameters
    ----------
    device : torch.device or str
        The device the computation runs on.
    enabled : bool
        Set False to disable mixed precision explicitly.
    """
    device = torch.device(device)
    dtype = amp_dtype(device)
    if not enabled or dtype is None:
        yield
        return
    with torch.autocast(device_type="cuda", dtype=dtype):
        yield


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (CPU and CUDA) random generators.

    Parameters
    ----------
    seed : int
        The seed; stored in run options so a run can be repeated.
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
