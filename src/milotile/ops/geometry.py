"""Projection geometry between a tomogram and its aligned tilt series.

Convention (shared by :mod:`milotile.synth`, the tilt-sum patches and the geometry check)
-----------------------------------------------------------------------------------------
* The tomogram is an array ``(Z, Y, X)``; a point is ``(x, y, z)`` in voxels, voxel centres at
  integers. Centred coordinates are ``xc = x - (X - 1) / 2`` (likewise ``yc``, ``zc``).
* An aligned tilt image is an array ``(Y_t, X_t)`` with the same pixel size as the tomogram unless
  ``pixel_ratio`` (tomogram voxel size / tilt pixel size) says otherwise. Its centre is
  ``((X_t - 1) / 2, (Y_t - 1) / 2)``.
* The tilt axis lies in the image plane at ``tilt_axis_angle`` degrees counter-clockwise from the
  image y axis (0 for IMOD-aligned stacks, whose tilt axis is parallel to y).
* For a tilt angle ``theta`` (degrees) the point projects to, in the frame rotated with the axis
  (``a`` along the axis, ``b`` across it)::

      a = yc,  b = xc * cos(theta) - sign * zc * sin(theta)

  With ``sign = +1`` this is IMOD's convention for an aligned stack and its ``tilt`` reconstruction
  after ``trimvol -rx`` (z = section index increasing towards the beam source, positive angles
  moving points with positive z towards negative x). It is also what MiLoPYP assumes
  (it flips depth, ``z' = Z - z``, and adds ``z' sin``). ``sign = -1`` is the mirrored convention
  some other packages use; :func:`milotile.ops.tilt_check.check_tilt_geometry` checks which one fits per tomogram.
* Finally ``(b, a)`` is rotated back by ``tilt_axis_angle``, scaled by ``pixel_ratio`` and
  shifted by optional per-tilt ``shifts`` (pixels, ``(n_tilts, 2)`` as ``(dx, dy)``).

The weighted back-projection in :mod:`milotile.synth` uses exactly :func:`project_points`,
so synthetic data and extraction agree by construction and the tests check the sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import dask.array as da
import numpy as np

__all__ = ["TiltGeometry", "project_points", "tilt_window"]


def project_points(
    xyz: np.ndarray,
    angles_deg: np.ndarray,
    volume_shape: tuple[int, int, int],
    tilt_shape: tuple[int, int],
    *,
    tilt_axis_angle: float = 0.0,
    sign: int = 1,
    pixel_ratio: float = 1.0,
    shifts: np.ndarray | None = None,
) -> np.ndarray:
    """Project tomogram points onto every tilt image.

    Parameters
    ----------
    xyz : ndarray, shape (N, 3)
        Points ``(x, y, z)`` in tomogram voxels.
    angles_deg : ndarray, shape (T,)
        Tilt angles in degrees.
    volume_shape : tuple of int
        Tomogram shape ``(Z, Y, X)``.
    tilt_shape : tuple of int
        Tilt image shape ``(Y_t, X_t)``.
    tilt_axis_angle : float
        Tilt-axis direction in degrees, counter-clockwise from the image y axis.
    sign : {1, -1}
        Handedness of the projection (``+1``: IMOD convention).
    pixel_ratio : float
        Tomogram voxel size divided by the tilt pixel size.
    shifts : ndarray, shape (T, 2), optional
        Per-tilt image shifts ``(dx, dy)`` in tilt pixels, added after projection.

    Returns
    -------
    ndarray, shape (N, T, 2)
        Image positions ``(u, v)`` = (column, row) in tilt pixels, float.
    """
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
    if xyz.shape[-1] != 3:
        raise ValueError(f"xyz must have shape (N, 3), got {xyz.shape}")
    zdim, ydim, xdim = volume_shape
    ty, tx = tilt_shape
    theta = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))[None, :]
    psi = np.deg2rad(tilt_axis_angle)
    xc = xyz[:, 0] - (xdim - 1) / 2.0
    yc = xyz[:, 1] - (ydim - 1) / 2.0
    zc = xyz[:, 2] - (zdim - 1) / 2.0
    # rotate the in-plane coordinates into the tilt-axis frame (axis along "a")
    cp, sp = np.cos(psi), np.sin(psi)
    b0 = cp * xc + sp * yc
    a0 = -sp * xc + cp * yc
    b = b0[:, None] * np.cos(theta) - sign * zc[:, None] * np.sin(theta)
    a = np.broadcast_to(a0[:, None], b.shape)
    # back to image axes
    u = (cp * b - sp * a) * pixel_ratio + (tx - 1) / 2.0
    v = (sp * b + cp * a) * pixel_ratio + (ty - 1) / 2.0
    out = np.stack([u, v], axis=-1)
    if shifts is not None:
        shifts = np.asarray(shifts, dtype=np.float64)
        if shifts.shape != (theta.shape[1], 2):
            raise ValueError(f"shifts must have shape ({theta.shape[1]}, 2), got {shifts.shape}")
        out = out + shifts[None, :, :]
    return out


def tilt_window(angles_deg: np.ndarray, low: float = -20.0, high: float = 20.0) -> np.ndarray:
    """Indices of the tilts whose angle lies inside ``[low, high]`` degrees.

    Raises
    ------
    ValueError
        If the window is empty or reversed.
    """
    if low > high:
        raise ValueError(f"tilt window low={low} is above high={high}")
    angles = np.asarray(angles_deg, dtype=np.float64)
    idx = np.flatnonzero((angles >= low) & (angles <= high))
    if idx.size == 0:
        raise ValueError(
            f"no tilt angle lies inside the window [{low}, {high}] degrees "
            f"(angles span {angles.min():.1f} to {angles.max():.1f})"
        )
    return idx


@dataclass
class TiltGeometry:
    """An aligned tilt series and how the tomogram projects onto it (see the module notes)."""

    data: da.Array
    angles: np.ndarray
    full_shape: tuple[int, int, int]
    tilt_axis_angle: float = 0.0
    sign: int = 1
    pixel_ratio: float = 1.0
    shifts: np.ndarray | None = None
    window: tuple[float, float] = (-20.0, 20.0)

    def project(self, xyz_full: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """``(N, len(idx), 2)`` image positions ``(u, v)`` of full-resolution points on tilts ``idx``."""
        return project_points(
            xyz_full,
            np.asarray(self.angles)[idx],
            self.full_shape,
            tuple(self.data.shape[1:]),
            tilt_axis_angle=self.tilt_axis_angle,
            sign=self.sign,
            pixel_ratio=self.pixel_ratio,
            shifts=None if self.shifts is None else np.asarray(self.shifts)[idx],
        )
