"""Device selection, mixed precision and seeding shared by the torch stages."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from milotile.errors import InputError

log = logging.getLogger(__name__)

__all__ = ["pick_device", "autocast", "seed_everything", "amp_dtype", "cpu_has_bf16",
           "auto_batch_size"]


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


@functools.cache
def cpu_has_bf16() -> bool:
    """True when this CPU multiplies bf16 natively (AMX or AVX512-BF16 in ``/proc/cpuinfo``); read once per
    process (every autocast asks, once per batch)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"amx_bf16", "avx512_bf16"} & flags)
    except OSError:
        pass
    return False


def channels_last(obj: Any, device: torch.device | str) -> Any:
    """A 2D-convolution model or a 4-D / 5-D batch in channels-last memory order on the CPU (else unchanged).

    oneDNN's convolutions skip a layout conversion per call in that order: explore training steps ran
    1.15x (fp32) to 1.34x (bf16) faster on this project's 2-core CPU (``benchmarks/throughput.py``). Models
    change in place (and are returned); 5-D tensors take ``channels_last_3d``, other ranks pass through. CUDA keeps the default order
    (not measured there).
    """
    if torch.device(device).type != "cpu":
        return obj
    if isinstance(obj, torch.nn.Module):
        return obj.to(memory_format=torch.channels_last)
    if isinstance(obj, torch.Tensor) and obj.ndim in (4, 5):
        return obj.contiguous(memory_format=torch.channels_last if obj.ndim == 4 else torch.channels_last_3d)
    return obj


def amp_dtype(device: torch.device, cpu: bool = False) -> torch.dtype | None:
    """The autocast dtype used on ``device`` (bf16 where supported, else fp16), or None.

    On the CPU: with ``cpu=True`` bf16 whenever :func:`cpu_has_bf16`, unless ``MILOTILE_CPU_BF16=0`` turns
    it off; otherwise fp32. The picker and exploration both use it: the picker's F1 was measured with it
    (``benchmarks/refine_hard.py --curve``), and exploration, whose head and loss stay fp32
    (:meth:`milotile.explore.model.SimSiam.forward`), trains 1.6-1.9x faster at the 5-NN accuracy of fp32
    within the seeds' spread (``benchmarks/results/explore_bf16_hard.json``).
    """
    device = torch.device(device)
    if device.type == "cpu":
        return torch.bfloat16 if cpu and os.environ.get("MILOTILE_CPU_BF16") != "0" and cpu_has_bf16() else None
    if device.type != "cuda":
        return None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@contextlib.contextmanager
def autocast(device: torch.device | str, enabled: bool = True, cpu: bool = False) -> Iterator[None]:
    """Automatic mixed precision on CUDA (bf16, or fp16 where bf16 is missing); on the CPU only with ``cpu``.

    Parameters
    ----------
    device : torch.device or str
        The device the computation runs on.
    enabled : bool
        Set False to disable mixed precision explicitly.
    cpu : bool
        Also use bf16 autocast on a CPU with native bf16, unless ``MILOTILE_CPU_BF16=0`` (see :func:`amp_dtype`).
    """
    device = torch.device(device)
    dtype = amp_dtype(device, cpu=cpu)
    if not enabled or dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
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


def auto_batch_size(
    step: Callable[[int], torch.Tensor], requested: int, budget_bytes: int, probe: int = 4, minimum: int = 2
) -> tuple[int, int]:
    """Largest power-of-two batch (at most ``requested``) whose saved activations fit ``budget_bytes``.

    ``step(n)`` runs a forward pass on a batch of ``n`` and returns the loss; the tensors autograd
    saves for the backward pass are counted (``torch.autograd.graph.saved_tensors_hooks``), which is
    what grows with the batch. Returns ``(batch_size, bytes_per_sample)``.
    """
    seen: set[int] = set()
    total = {"n": 0}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total["n"] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step(probe)
    del loss
    per_sample = max(1, total["n"] // probe)
    fit = max(minimum, budget_bytes // per_sample)
    if requested <= fit:
        return int(requested), per_sample
    bs = minimum
    while bs * 2 <= fit:
        bs *= 2
    return bs, per_sample
