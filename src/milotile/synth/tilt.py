"""Tilt-series simulation: projection, contrast transfer function and noise.

Geometry
--------
This module uses the convention of :func:`milotile.ops.geometry.project_points` with
``tilt_axis_angle = 0`` and ``sign = +1`` (IMOD's aligned-stack convention):

* the tomogram is an array ``(z, y, x)``; a point is ``(x, y, z)`` in voxels, and centred
  coordinates are ``xc = x - (X - 1) / 2`` (likewise ``yc``, ``zc``); z is the section index,
  increasing towards the beam source;
* the tilt axis is the y axis, so a tilt image ``(y, x)`` row ``y`` only sees tomogram row
  ``y`` (every y row is an independent 2D problem in the x-z plane);
* at tilt angle ``theta`` a point lands on image column
  ``u = xc cos(theta) - zc sin(theta) + (X - 1) / 2`` and row ``v = y``: for a positive angle,
  points above the centre (``zc > 0``) move towards smaller x.

:class:`Projector` builds, once per volume shape and angle set, a sparse matrix whose rows are
``(tilt, column)`` and whose columns are ``(z, x)`` voxels: each voxel is splatted onto the two
image columns around ``u`` with linear weights (``u`` computed by ``project_points`` itself).
The forward projection is one sparse product per block of y rows; the back-projection used by
:mod:`milotile.synth.reconstruct` is the transposed product, i.e. linear interpolation of every
filtered tilt at the same ``u``. Data and tilt-sum extraction therefore agree by construction.

Contrast
--------
The clean image is the CTF-filtered projected density,
``ctf(k) = -(sqrt(1 - A^2) sin(chi) + A cos(chi))`` with
``chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4`` (``df > 0`` = underfocus). ``ctf`` is negative
from ``k = 0`` up to its first zero, so dense matter is dark, as in cryo-ET. Gaussian noise is
added with variance ``var(clean stack) / snr``.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.fft
import scipy.sparse as sp

from milotile.ops.geometry import project_points

logger = logging.getLogger(__name__)

__all__ = [
    "Projector",
    "add_noise",
    "apply_ctf",
    "ctf_1d",
    "ctf_2d",
    "default_bfactor",
    "default_defocus",
    "electron_wavelength",
]


def _n_workers(workers: int | None) -> int:
    if workers is None:
        return max(1, min(2, os.cpu_count() or 1))
    return max(1, int(workers))


class Projector:
    """Linear projector between a volume ``(Z, Y, X)`` and a tilt stack ``(T, Y, X)``.

    Parameters
    ----------
    volume_shape : tuple of int
        ``(Z, Y, X)``.
    angles_deg : sequence of float
        Tilt angles in degrees.
    workers : int, optional
        Threads for the sparse products (scipy releases the GIL); default ``min(2, cpus)``.
    block : int
        Number of y rows per task.

    Notes
    -----
    The matrix has about ``2 Z X T`` non-zeros (float32 values, int32 indices): 2.7 million,
    22 MB, for ``128 x 256`` and 41 tilts. Memory during a product is one block of y rows.
    """

    def __init__(
        self,
        volume_shape: tuple[int, int, int],
        angles_deg: Sequence[float] | np.ndarray,
        *,
        workers: int | None = None,
        block: int = 16,
    ) -> None:
        zdim, ydim, xdim = (int(s) for s in volume_shape)
        self.volume_shape = (zdim, ydim, xdim)
        self.tilt_shape = (ydim, xdim)
        self.angles = np.asarray(angles_deg, dtype=np.float64).ravel()
        self.workers = _n_workers(workers)
        self.block = max(1, int(block))
        n_t = self.angles.size
        zz, xx = np.meshgrid(np.arange(zdim), np.arange(xdim), indexing="ij")
        pts = np.stack([xx.ravel(), np.zeros(zz.size), zz.ravel()], axis=1).astype(np.float64)
        cols = np.arange(zdim * xdim, dtype=np.int64)
        rows_l, cols_l, vals_l = [], [], []
        for t in range(n_t):
            uv = project_points(
                pts,
                self.angles[t : t + 1],
                self.volume_shape,
                self.tilt_shape,
                tilt_axis_angle=0.0,
                sign=1,
            )
            u = uv[:, 0, 0]
            i0 = np.floor(u).astype(np.int64)
            f = (u - i0).astype(np.float32)
            for idx, w in ((i0, 1.0 - f), (i0 + 1, f)):
                ok = (idx >= 0) & (idx < xdim) & (w > 0)
                rows_l.append(t * xdim + idx[ok])
                cols_l.append(cols[ok])
                vals_l.append(w[ok])
        shape = (n_t * xdim, zdim * xdim)
        coo = sp.coo_matrix(
            (np.concatenate(vals_l), (np.concatenate(rows_l), np.concatenate(cols_l))),
            shape=shape,
            dtype=np.float32,
        )
        self.matrix = coo.tocsr()
        self.matrix_t = self.matrix.T.tocsr()
        logger.debug(
            "projector %s x %d tilts: %d non-zeros", self.volume_shape, n_t, self.matrix.nnz
        )

    def _map(self, fn: Callable[[int], None], n: int) -> None:
        """Run ``fn(y0)`` for every block start, in threads when ``workers > 1``."""
        starts = range(0, n, self.block)
        if self.workers == 1:
            for s in starts:
                fn(s)
        else:
            with ThreadPoolExecutor(self.workers) as ex:
                list(ex.map(fn, starts))

    def forward(self, volume: np.ndarray) -> np.ndarray:
        """Line integrals of ``volume`` (Z, Y, X) for every tilt: a float32 stack (T, Y, X)."""
        zdim, ydim, xdim = self.volume_shape
        if tuple(volume.shape) != self.volume_shape:
            raise ValueError(
                f"volume shape {volume.shape} does not match the projector {self.volume_shape}"
            )
        n_t = self.angles.size
        out = np.empty((n_t, ydim, xdim), dtype=np.float32)

        def work(y0: int) -> None:
            y1 = min(y0 + self.block, ydim)
            cols = np.ascontiguousarray(volume[:, y0:y1, :].transpose(0, 2, 1), dtype=np.float32)
            res = self.matrix @ cols.reshape(zdim * xdim, y1 - y0)
            out[:, y0:y1, :] = res.reshape(n_t, xdim, y1 - y0).transpose(0, 2, 1)

        self._map(work, ydim)
        return out

    def backward(self, stack: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
        """Back-project a stack (T, Y, X) into a float32 volume (Z, Y, X).

        Every voxel receives, for every tilt, the linearly interpolated value at its projected
        column, times ``weights[t]`` (default 1).
        """
        zdim, ydim, xdim = self.volume_shape
        n_t = self.angles.size
        if tuple(stack.shape) != (n_t, ydim, xdim):
            raise ValueError(f"stack shape {stack.shape} does not match ({n_t}, {ydim}, {xdim})")
        w = np.ones(n_t, dtype=np.float32) if weights is None else np.asarray(weights, np.float32)
        out = np.empty(self.volume_shape, dtype=np.float32)

        def work(y0: int) -> None:
            y1 = min(y0 + self.block, ydim)
            cols = np.ascontiguousarray(
                (stack[:, y0:y1, :] * w[:, None, None]).transpose(0, 2, 1), dtype=np.float32
            )
            res = self.matrix_t @ cols.reshape(n_t * xdim, y1 - y0)
            out[:, y0:y1, :] = res.reshape(zdim, xdim, y1 - y0).transpose(0, 2, 1)

        self._map(work, ydim)
        return out


# --------------------------------------------------------------------------- CTF
def electron_wavelength(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å for an acceleration voltage in kV."""
    v = voltage_kv * 1e3
    return 12.2643 / math.sqrt(v * (1.0 + 0.978466e-6 * v))


def default_defocus(pixel_size: float, voltage_kv: float = 300.0) -> float:
    """Defocus (Å) whose first CTF zero lies at 0.8 x Nyquist, clipped to 0.5-6 µm.

    For 10 Å pixels at 300 kV this is about 3.2 µm.
    """
    lam = electron_wavelength(voltage_kv)
    k0 = 0.8 / (2.0 * pixel_size)
    return float(np.clip(1.0 / (lam * k0**2), 5_000.0, 60_000.0))


def ctf_1d(
    k: np.ndarray,
    *,
    defocus: float,
    voltage_kv: float = 300.0,
    cs_mm: float = 2.7,
    amplitude_contrast: float = 0.1,
    bfactor: float = 0.0,
) -> np.ndarray:
    """CTF at spatial frequencies ``k`` (1/Å); negative at low frequency (dense = dark).

    Parameters
    ----------
    k : ndarray
        Spatial frequency magnitudes in 1/Å.
    defocus : float
        Underfocus in Å (positive).
    voltage_kv, cs_mm, amplitude_contrast : float
        Microscope: acceleration voltage, spherical aberration, amplitude-contrast fraction.
    bfactor : float
        Envelope ``exp(-bfactor k^2 / 4)`` in Å^2 (0: none).
    """
    lam = electron_wavelength(voltage_kv)
    cs = cs_mm * 1e7
    k2 = np.asarray(k, dtype=np.float64) ** 2
    chi = np.pi * lam * defocus * k2 - 0.5 * np.pi * cs * lam**3 * k2**2
    a = amplitude_contrast
    env = np.exp(-bfactor * k2 / 4.0)
    return -(math.sqrt(1.0 - a * a) * np.sin(chi) + a * np.cos(chi)) * env


def default_bfactor(pixel_size: float) -> float:
    """Envelope B-factor (Å^2) that halves the CTF at Nyquist: ``16 ln 2 pixel_size^2``."""
    return float(16.0 * math.log(2.0) * pixel_size**2)


def ctf_2d(shape: tuple[int, int], pixel_size: float, **kwargs: float) -> np.ndarray:
    """CTF on the ``rfft2`` grid of an image ``shape`` (rows, cols); kwargs go to :func:`ctf_1d`."""
    ky = np.fft.fftfreq(shape[0], d=pixel_size)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=pixel_size)[None, :]
    return ctf_1d(np.sqrt(kx**2 + ky**2), **kwargs).astype(np.float32)


def apply_ctf(
    stack: np.ndarray,
    pixel_size: float,
    *,
    defocus: float | None = None,
    pad: int = 16,
    workers: int | None = None,
    **kwargs: float,
) -> np.ndarray:
    """Filter every tilt of ``stack`` (T, Y, X) with the CTF (reflect-padded by ``pad`` pixels).

    Parameters
    ----------
    stack : ndarray
        Projected density, float32.
    pixel_size : float
        Å per pixel.
    defocus : float, optional
        Underfocus in Å; :func:`default_defocus` when None.
    pad : int
        Reflect padding on each image side against wrap-around.
    workers : int, optional
        FFT threads.
    **kwargs
        ``voltage_kv``, ``cs_mm``, ``amplitude_contrast``, ``bfactor`` for :func:`ctf_1d`
        (``bfactor`` defaults to :func:`default_bfactor`).

    Returns
    -------
    ndarray, float32, same shape
    """
    if defocus is None:
        defocus = default_defocus(pixel_size, kwargs.get("voltage_kv", 300.0))
    kwargs.setdefault("bfactor", default_bfactor(pixel_size))
    _, ny, nx = stack.shape
    padded = np.pad(stack, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    ctf = ctf_2d(padded.shape[1:], pixel_size, defocus=defocus, **kwargs)
    w = _n_workers(workers)
    spec = scipy.fft.rfft2(padded, axes=(-2, -1), workers=w)
    spec *= ctf[None]
    out = scipy.fft.irfft2(spec, s=padded.shape[1:], axes=(-2, -1), workers=w)
    return np.ascontiguousarray(out[:, pad : pad + ny, pad : pad + nx], dtype=np.float32)


def add_noise(stack: np.ndarray, snr: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Add white Gaussian noise so that ``var(stack) / var(noise) == snr``.

    Returns the noisy float32 stack and the noise standard deviation (0 for ``snr = inf``).
    """
    if math.isinf(snr):
        return stack.astype(np.float32, copy=True), 0.0
    sigma = float(np.sqrt(np.var(stack, dtype=np.float64) / snr))
    noise = rng.standard_normal(stack.shape, dtype=np.float32)
    noise *= np.float32(sigma)
    return (stack + noise).astype(np.float32, copy=False), sigma
