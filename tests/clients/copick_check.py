"""Read a whole copick project with the real ``copick`` package and print what it sees.

Runs inside the copick client environment (copick 1.x pins zarr 2), from any working directory (a
relative ``overlay_root`` resolves against it, an absolute one anywhere). Usage:
``python copick_check.py copick_config.json``; prints one JSON document with the runs, voxel
spacings, tomograms (shape, scale and mean of every level, read through zarr 2) and picks.
"""

from __future__ import annotations

import json
import sys


def main(config: str) -> int:
    import importlib.metadata as md

    import copick
    import numpy as np
    import zarr

    root = copick.from_file(config)
    out = {
        "versions": {"copick": md.version("copick"), "zarr": zarr.__version__},
        "objects": {o.name: {"label": o.label, "radius": o.radius, "color": list(o.color or [])}
                    for o in root.pickable_objects},
        "runs": {},
    }
    for run in root.runs:
        r = {"voxel_spacings": {}, "picks": []}
        for vs in run.voxel_spacings:
            tomos = {}
            for tomo in vs.tomograms:
                grp = zarr.open(tomo.zarr(), mode="r")
                ms = grp.attrs["multiscales"][0]
                levels = []
                for ds in ms["datasets"]:
                    arr = grp[ds["path"]]
                    data = arr[:]
                    scale = [t for t in ds["coordinateTransformations"] if t["type"] == "scale"][0]["scale"]
                    levels.append({"path": ds["path"], "shape": list(arr.shape), "scale": scale,
                                   "mean": float(np.mean(data, dtype=np.float64)), "dtype": str(arr.dtype)})
                full = tomo.numpy(zarr_group="0")
                tomos[tomo.tomo_type] = {"levels": levels, "numpy_shape": list(full.shape),
                                         "numpy_mean": float(np.mean(full, dtype=np.float64)),
                                         "version": ms.get("version")}
            r["voxel_spacings"][f"{vs.voxel_size:.3f}"] = tomos
        for picks in run.picks:
            pos, _t = picks.numpy()
            r["picks"].append({"object": picks.pickable_object_name, "user_id": picks.user_id,
                               "session_id": picks.session_id, "n": int(len(pos)),
                               "positions_A": np.asarray(pos, dtype=float).tolist(),
                               "scores": [float(p.score) for p in picks.points]})
        out["runs"][run.name] = r
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
