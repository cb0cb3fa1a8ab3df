"""Colours of the atlas: a 2D colormap of the map position and a categorical cluster palette.

The 2D colormap is a plane of constant lightness in CIELAB: ``a*`` follows map x and ``b*`` map y,
so nearby points get similar colours and perceived colour distance follows map distance (the idea
of MiLoPYP's Ziegler 2D colormap, computed here instead of shipped as a lookup table).
"""

from __future__ import annotations

import colorsys

import numpy as np

__all__ = ["colormap_2d", "cluster_palette", "to_hex", "UNASSIGNED_RGB"]

#: colour of unassigned points
UNASSIGNED_RGB = (150, 150, 150)


def colormap_2d(u: np.ndarray, v: np.ndarray, lightness: float = 68.0, chroma: float = 62.0) -> np.ndarray:
    """RGB uint8 ``(n, 3)`` for map positions ``u, v`` in ``[0, 1]`` (values outside are clipped)."""
    from skimage.color import lab2rgb

    u = np.clip(np.asarray(u, np.float64), 0, 1)
    v = np.clip(np.asarray(v, np.float64), 0, 1)
    lab = np.stack([np.full_like(u, lightness), (2 * u - 1) * chroma, (2 * v - 1) * chroma], axis=-1)
    rgb = lab2rgb(lab.reshape(-1, 1, 3)).reshape(-1, 3)
    return np.round(np.clip(rgb, 0, 1) * 255).astype(np.uint8)


def cluster_palette(n: int) -> np.ndarray:
    """``(n, 3)`` uint8 distinct colours: matplotlib's tab20 first, then golden-ratio hues."""
    from matplotlib import colormaps

    base = (np.asarray(colormaps["tab20"].colors)[[0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19]] * 255)
    out = [tuple(int(round(c)) for c in rgb) for rgb in base[: min(n, 20)]]
    for i in range(len(out), n):
        h = (i * 0.618033988749895) % 1.0
        s = 0.55 + 0.35 * ((i // 7) % 2)
        val = 0.75 + 0.2 * ((i // 3) % 2)
        out.append(tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h, s, val)))
    return np.asarray(out, np.uint8).reshape(-1, 3)


def to_hex(rgb: np.ndarray) -> np.ndarray:
    """``(n, 3)`` uint8 -> array of ``"#rrggbb"`` strings."""
    rgb = np.asarray(rgb, np.uint32).reshape(-1, 3)
    packed = (rgb[:, 0] << 16) | (rgb[:, 1] << 8) | rgb[:, 2]
    return np.array([f"#{v:06x}" for v in packed.tolist()], dtype=object)
