"""Open OME-Zarr images with napari-ome-zarr in a headless ``ViewerModel`` and print the layers.

Runs inside the napari client environment (``scripts/client_envs.sh napari``), never in the
project venv. Usage: ``python napari_check.py PATH [PATH ...]``; prints one JSON document:
``{"versions": {...}, "results": {path: {"layers": [...]} | {"error": "..."}}}``.
"""

from __future__ import annotations

import contextlib
import json
import sys
import traceback


def _layer(layer) -> dict:
    data = layer.data
    multiscale = bool(getattr(layer, "multiscale", False))
    first = data[0] if multiscale else data
    out = {
        "type": type(layer).__name__,
        "name": str(layer.name),
        "scale": [float(v) for v in layer.scale],
        "translate": [float(v) for v in layer.translate],
        # napari-ome-zarr 0.10 passes the OME transforms as an affine (plus scale)
        "affine_translate": [float(v) for v in layer.affine.translate],
        "world_origin": [float(v) for v in layer.data_to_world((0,) * layer.ndim)],
        "shape": [int(v) for v in first.shape],
        "dtype": str(first.dtype),
        "multiscale": multiscale,
        "levels": len(data) if multiscale else 1,
    }
    if type(layer).__name__ == "Labels":
        try:
            out["n_colors"] = len(layer.colormap.color_dict)
        except Exception:  # colour maps differ between napari versions
            out["n_colors"] = None
    if type(layer).__name__ == "Image":
        out["colormap"] = str(getattr(layer.colormap, "name", ""))
        out["contrast_limits"] = [float(v) for v in layer.contrast_limits]
    return out


def main(paths: list[str]) -> int:
    import napari
    import napari_ome_zarr
    from napari.components import ViewerModel
    from npe2 import PluginManager

    PluginManager.instance().discover()  # a headless ViewerModel does not load plugins by itself

    versions = {"napari": napari.__version__, "napari-ome-zarr": getattr(napari_ome_zarr, "__version__", "?")}
    try:
        import importlib.metadata as md

        versions["napari-ome-zarr"] = md.version("napari-ome-zarr")
        versions["zarr"] = md.version("zarr")
    except Exception:
        pass
    results = {}
    for p in paths:
        viewer = ViewerModel()
        try:
            with contextlib.redirect_stdout(sys.stderr):  # the plugin prints what it reads
                layers = viewer.open(p, plugin="napari-ome-zarr")
            results[p] = {"layers": [_layer(lay) for lay in layers]}
        except Exception as exc:  # report, do not stop: the test shows every failure
            results[p] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()[-2000:]}
    print(json.dumps({"versions": versions, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
