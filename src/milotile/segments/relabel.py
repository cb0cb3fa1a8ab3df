"""The relabelled mask: every object's voxels take the value cluster + 1 (0 stays background).

Block-wise with a sorted-id lookup (``numpy.searchsorted``), so ids of any size (uint64) work and
no ``max_id``-sized table is built (EManalysis's lookup raised IndexError for ids above the largest
feature id and wrote uint8 PNGs that overflow above 255 clusters). Objects without a cluster
(not in the table) map to 0; noise objects (cluster ``-1``) get the value ``K + 1`` and a grey
colour. The result is an OME-NGFF label image ``labels/clusters`` with a colour table and per-value
properties (cluster number, object count), chunked like the image.
"""

from __future__ import annotations

import logging

import numpy as np

from milotile.segments.volume import SegmentVolume
from milotile.store.labels import label_colors, write_labels

log = logging.getLogger(__name__)

__all__ = ["map_block", "write_cluster_labels"]


def map_block(block: np.ndarray, ids: np.ndarray, values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Map object ids in ``block`` to ``values`` (ids sorted ascending; unknown ids -> 0)."""
    if not len(ids):
        return np.zeros(block.shape, dtype)
    b = block.astype(np.uint64, copy=False)
    pos = np.clip(np.searchsorted(ids, b), 0, len(ids) - 1)
    hit = ids[pos] == b
    return np.where(hit & (b != 0), values[pos], 0).astype(dtype)


def write_cluster_labels(vol: SegmentVolume, ids: np.ndarray, clusters: np.ndarray, name: str = "clusters") -> None:
    """Write the label image ``labels/<name>`` of ``vol`` from object ``ids`` and their ``clusters``."""
    order = np.argsort(ids)
    ids = np.asarray(ids, np.uint64)[order]
    clusters = np.asarray(clusters, np.int64)[order]
    k = int(clusters.max()) + 1 if (clusters >= 0).any() else 0
    values = np.where(clusters >= 0, clusters + 1, k + 1)
    top = int(values.max()) if len(values) else 0
    dtype = np.dtype(np.uint8 if top < 2**8 else np.uint16 if top < 2**16 else np.uint32)
    present = sorted(int(v) for v in np.unique(values))
    colors = label_colors(present)
    props = []
    for c, v in zip(colors, present, strict=True):
        is_noise = v == k + 1 and (clusters < 0).any()
        if is_noise:
            c["rgba"] = [128, 128, 128, 255]
        props.append({"label-value": v, "cluster": -1 if is_noise else v - 1, "objects": int(np.sum(values == v))})
    import dask

    col = vol.collection
    mapped = vol.labels("objects").map_blocks(map_block, ids, values, dtype, dtype=dtype)
    sources = {p: col.source_token(p) for p in (vol.path(), "tables/segment-clusters")}
    out = col.stage_output(vol.path("labels", name), {"label_image": name}, sources)
    with out:
        lazy = write_labels(vol.group, name, mapped, chunks=vol.chunks, scale=vol.voxel_size, colors=colors,
                            properties=props, unit=vol.unit, compute=False)
        out.begin(vol.group["labels"][name])
        dask.compute(lazy)
        out.finish(kind="clusters", n_clusters=k, noise_value=k + 1 if (clusters < 0).any() else None)
    log.info("wrote labels/%s of %s: %d clusters as values 1..%d (%s)", name, vol.name, k, top, dtype)
