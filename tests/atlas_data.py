"""Generated stores for the atlas tests: embeddings with known species, a patch bank, a table."""

from __future__ import annotations

import numpy as np
import pandas as pd


def write_embedding_store(path, n: int = 600, d: int = 32, species: int = 3, seed: int = 0,
                          key: str = "k", bank: bool = True, names=("tomo_a", "tomo_b"),
                          spread: float = 0.35, shape=(32, 64, 64), tomograms: bool = False):
    """A collection with ``embeddings/<key>`` (Gaussian blobs, one per species), its table and a bank.

    Returns ``(col, species_per_row)``.
    """
    from milotile.store import open_collection

    rng = np.random.default_rng(seed)
    if tomograms:
        import tempfile
        from pathlib import Path

        from milotile.store import ingest, write_mrc

        src = Path(tempfile.mkdtemp())
        files = []
        for t in names:
            write_mrc(src / f"{t}.mrc", rng.normal(0, 1, shape).astype(np.float32), voxel_size=10.0, order="xyz")
            files.append(src / f"{t}.mrc")
        ingest(files, path, order="xyz")
    col = open_collection(path, mode="a")
    sp = rng.integers(0, species, n)
    centres = rng.normal(0, 1, (species, d)).astype(np.float32)
    emb = centres[sp] + rng.normal(0, spread, (n, d)).astype(np.float32)
    g = col.zarr_group.require_group("embeddings")
    arr = g.create_array(key, shape=(n, d), chunks=(min(256, n), d), dtype="float32", overwrite=True)
    arr[:] = emb
    arr.attrs["milotile"] = {"complete": True, "params": {"bank": key, "feature": "trunk", "n": n, "dim": d}}
    tomo = np.array(names)[rng.integers(0, len(names), n)]
    z, y, x = shape
    df = pd.DataFrame({
        "tomogram": tomo, "x": rng.uniform(4, x - 4, n), "y": rng.uniform(4, y - 4, n),
        "z": rng.uniform(4, z - 4, n), "species": np.array(["alpha", "beta", "gamma", "delta"])[sp],
        "patch_index": np.arange(n), "embedding_index": np.arange(n),
    })
    col.write_table(f"embeddings-{key}", df)
    col.write_table(f"patches-{key}", df.drop(columns=["embedding_index"]))
    if bank:
        b = 16
        yy, xx = np.mgrid[:b, :b] - (b - 1) / 2
        r = np.hypot(yy, xx)
        shapes = np.stack([(r < 4), (r > 3) & (r < 6), (np.abs(xx) < 2), (np.abs(yy) < 2)]).astype(np.float32)
        data = shapes[sp][:, None, None] + rng.normal(0, 0.2, (n, 1, 1, b, b)).astype(np.float32)
        pg = col.zarr_group.require_group("patches").require_group(key)
        parr = pg.create_array("data", shape=data.shape, chunks=(min(128, n), 1, 1, b, b), dtype="float32",
                               overwrite=True)
        parr[:] = data
        pg.attrs["milotile"] = {"complete": True, "params": {"bbox": b, "shifts": [], "modes": ["slab"]}}
    return col, sp
