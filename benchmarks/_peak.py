"""Fraction-of-peak accounting shared by the benchmarks: machine peak FLOP/s, model FLOPs, read speed.

* :func:`cpu_peak` -- the CPU's peak FLOP/s from ``/proc/cpuinfo``:

  ``cores x clock x SIMD lanes (fp32) x 2 (an FMA is two FLOPs) x FMA units per core``.

  Assumptions (printed with every figure): lanes from the widest vector flag (``avx512f`` -> 16
  fp32 lanes, ``avx2``/``fma`` -> 8, ``sse2`` -> 4); **2 FMA units per core** for AVX-512 server
  parts (Skylake-SP Gold/Platinum and later; a few Silver/Bronze have 1), 2 for AVX2 cores; the
  clock is the ``cpu MHz`` field (the nominal clock on a VM, turbo ignored); cores = ``os.cpu_count()``.
  The bf16 peak counts Intel AMX where ``amx_bf16`` is present (1024 bf16 FLOPs per cycle and core:
  16x32 by 32x16 tile multiply-add every 16 cycles) and else AVX512-BF16 dot products (2x fp32).
  Override with ``MILOTILE_PEAK_GFLOPS`` (fp32) when the datasheet says otherwise.
* :func:`gpu_peak` -- datasheet dense peak FLOP/s of known GPUs by name (fp32 / bf16 tensor core).
* :func:`model_flops` -- FLOPs of one call counted by ``torch.utils.flop_counter.FlopCounterMode``
  (convolutions and matrix products; element-wise ops are not counted, which is the usual convention).
* :func:`sequential_read` -- bytes/s of a plain sequential read of every file under a folder (the
  chunk files of a Zarr array): the ceiling an I/O-bound stage is compared with.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["cpu_peak", "gpu_peak", "model_flops", "sequential_read", "fraction", "peak_for"]


def _cpuinfo() -> dict[str, str]:
    info: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info.setdefault(k.strip(), v.strip())
        elif not line.strip() and info:
            break  # first processor block is enough
    return info


def cpu_peak(cores: int | None = None) -> dict[str, Any]:
    """Peak FLOP/s of this CPU (fp32 vector FMA, and bf16), with the assumptions used.

    Parameters
    ----------
    cores : int, optional
        Cores to count (default ``os.cpu_count()``; pass the cores a worker owns).

    Returns
    -------
    dict
        ``fp32_flops``, ``bf16_flops``, ``cores``, ``clock_ghz``, ``lanes_fp32``, ``fma_units``,
        ``amx_bf16``, ``model``, ``assumptions``.
    """
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    cores = int(cores or os.cpu_count() or 1)
    clock = float(info.get("cpu MHz", "2000")) / 1000.0
    if "avx512f" in flags:
        lanes, fma_units = 16, 2
    elif "avx2" in flags or "fma" in flags:
        lanes, fma_units = 8, 2
    else:
        lanes, fma_units = 4, 1
    fp32 = cores * clock * 1e9 * lanes * 2 * fma_units
    amx = "amx_bf16" in flags
    if amx:
        bf16 = cores * clock * 1e9 * 1024
    elif "avx512_bf16" in flags:
        bf16 = 2 * fp32
    else:
        bf16 = fp32
    override = os.environ.get("MILOTILE_PEAK_GFLOPS")
    if override:
        fp32 = float(override) * 1e9
    return {
        "fp32_flops": fp32, "bf16_flops": bf16, "cores": cores, "clock_ghz": clock,
        "lanes_fp32": lanes, "fma_units": fma_units, "amx_bf16": amx, "model": info.get("model name", "?"),
        "assumptions": (
            f"{cores} cores x {clock:.2f} GHz (cpu MHz field) x {lanes} fp32 lanes x 2 (FMA) x "
            f"{fma_units} FMA units/core" + ("; bf16 via AMX 1024 FLOP/cycle/core" if amx else "")
            + (f"; fp32 overridden by MILOTILE_PEAK_GFLOPS={override}" if override else "")
        ),
    }


# dense datasheet peaks, FLOP/s: (fp32 non-tensor, bf16 tensor core)
_GPU_PEAKS = {
    "H200": (67e12, 989e12), "H100": (67e12, 989e12), "A100": (19.5e12, 312e12),
    "L40S": (91.6e12, 362e12), "A10": (31.2e12, 125e12), "V100": (15.7e12, 125e12), "T4": (8.1e12, 65e12),
    "RTX 4090": (82.6e12, 165e12), "RTX 3090": (35.6e12, 71e12),
}


def gpu_peak(name: str | None = None) -> dict[str, Any] | None:
    """Datasheet dense peak of the CUDA device ``name`` (default: device 0), or None if unknown."""
    if name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    for key, (fp32, bf16) in _GPU_PEAKS.items():
        if key.lower() in name.lower():
            return {"fp32_flops": fp32, "bf16_flops": bf16, "model": name,
                    "assumptions": f"datasheet dense peak of {key} (SXM where variants differ)"}
    return None


def peak_for(device: str = "cpu", cores: int | None = None) -> dict[str, Any]:
    """:func:`gpu_peak` for a CUDA device (when known), else :func:`cpu_peak`."""
    if str(device).startswith("cuda"):
        g = gpu_peak()
        if g is not None:
            return g
    return cpu_peak(cores)


def model_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (forward, or forward + backward if ``fn`` does both)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def fraction(flops_per_s: float, peak: dict[str, Any], dtype: str = "fp32") -> float:
    """Achieved FLOP/s as a fraction of ``peak`` (``dtype`` ``fp32`` or ``bf16``)."""
    return float(flops_per_s) / float(peak[f"{dtype}_flops"])


def sequential_read(folder: str | os.PathLike, block: int = 8 << 20) -> dict[str, float]:
    """Read every file under ``folder`` once, in sorted order, with plain ``read()`` calls.

    The page cache is not dropped (no root needed); compare a stage with this figure measured in
    the same state (both warm) or on a fresh store (both cold).

    Returns
    -------
    dict
        ``bytes``, ``files``, ``seconds``, ``bytes_per_s``.
    """
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    n = 0
    t0 = time.perf_counter()
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            while True:
                b = fh.read(block)
                if not b:
                    break
                n += len(b)
    dt = time.perf_counter() - t0
    return {"bytes": n, "files": len(files), "seconds": dt, "bytes_per_s": n / max(dt, 1e-9)}


if __name__ == "__main__":  # pragma: no cover
    import json

    print(json.dumps(cpu_peak(), indent=1))
