"""Weighted back-projection (WBP) of an aligned tilt series.

Uses the geometry of :mod:`milotile.synth.tilt` / :func:`milotile.ops.geometry.project_points`
(tilt axis = y, ``sign = +1``): each tilt is ramp-filtered along x (the direction across the
tilt axis), then every voxel collects the filtered value at its projected column ``u`` with the
transposed projection matrix. With tilts only up to about ±60° the reconstruction misses a wedge
of Fourier space around the k_z axis (the "missing wedge"), as real tomograms do.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import scipy.fft

from milotile.synth.tilt import Projector, _n_workers

logger = logging.getLogger(__name__)

__all__ = ["angular_weights", "ramp_filter", "wbp"]

_TAPERS = ("hamming", "cosine", "none")


def angular_weights(angles_deg: Sequence[float] | np.ndarray) -> np.ndarray:
    """Angular spacing (radians) assigned to each tilt, for uneven angle sets too."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    if a.size == 1:
        return np.array([np.pi])
    order = np.argsort(a, kind="stable")
    s = a[order]
    g = np.gradient(s)
    out = np.empty_like(g)
    out[order] = g
    return out


def ramp_filter(
    stack: np.ndarray, *, taper: str = "hamming", workers: int | None = None
) -> np.ndarray:
    """Filter every row of every tilt with ``|k|`` (times a taper) along x.

    Parameters
    ----------
    stack : ndarray, shape (T, Y, X)
        Tilt series.
    taper : {"hamming", "cosine", "none"}
        Apodisation of the ramp towards Nyquist: ``0.54 + 0.46 cos(2 pi k)``, ``cos(pi k)`` or none.
    workers : int, optional
        FFT threads.

    Returns
    -------
    ndarray, float32, same shape

    Notes
    -----
    Rows are padded to at least twice their length with their edge values, so that the ramp
    filter does not ring at the borders of tilts whose field of view cuts through the sample.
    """
    if taper not in _TAPERS:
        raise ValueError(f"taper must be one of {_TAPERS}, got {taper!r}")
    nx = stack.shape[-1]
    n = scipy.fft.next_fast_len(2 * nx, real=True)
    left = (n - nx) // 2
    padded = np.pad(stack, ((0, 0), (0, 0), (left, n - nx - left)), mode="edge")
    k = np.fft.rfftfreq(n)
    filt = np.abs(k)
    if taper == "hamming":
        filt = filt * (0.54 + 0.46 * np.cos(2 * np.pi * k))
    elif taper == "cosine":
        filt = filt * np.cos(np.pi * k)
    w = _n_workers(workers)
    spec = scipy.fft.rfft(padded, axis=-1, workers=w)
    spec *= filt.astype(np.float32)
    out = scipy.fft.irfft(spec, n=n, axis=-1, workers=w)
    return np.ascontiguousarray(out[..., left : left + nx], dtype=np.float32)


def wbp(
    stack: np.ndarray,
    angles_deg: Sequence[float] | np.ndarray,
    volume_shape: tuple[int, int, int],
    *,
    taper: str = "hamming",
    projector: Projector | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Reconstruct a tomogram ``(Z, Y, X)`` from an aligned tilt stack ``(T, Y, X)``.

    Parameters
    ----------
    stack : ndarray, shape (T, Y, X)
        Aligned tilt series, same x-y size and pixel size as the tomogram.
    angles_deg : sequence of float
        Tilt angles in degrees.
    volume_shape : tuple of int
        ``(Z, Y, X)`` of the output.
    taper : {"hamming", "cosine", "none"}
        Ramp-filter apodisation (see :func:`ramp_filter`).
    projector : Projector, optional
        Re-use an existing projector for these angles and shape.
    workers : int, optional
        Threads.

    Returns
    -------
    ndarray, float32, shape ``volume_shape``
        ``sum_t dtheta_t * filtered_t(u(x, z, theta_t), y)``.
    """
    angles = np.asarray(angles_deg, dtype=np.float64).ravel()
    if stack.ndim != 3 or stack.shape[0] != angles.size:
        raise ValueError(f"stack shape {stack.shape} does not match {angles.size} angles")
    if tuple(stack.shape[1:]) != tuple(volume_shape[1:]):
        raise ValueError(
            f"tilt images {stack.shape[1:]} do not match the volume's (Y, X) {volume_shape[1:]}"
        )
    if projector is None:
        projector = Projector(volume_shape, angles, workers=workers)
    elif projector.volume_shape != tuple(volume_shape) or not np.array_equal(
        projector.angles, angles
    ):
        raise ValueError("projector was built for another volume shape or angle set")
    filtered = ramp_filter(stack, taper=taper, workers=workers)
    return projector.backward(filtered, weights=angular_weights(angles))
