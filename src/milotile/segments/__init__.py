"""Segment clustering: EManalysis's capabilities on chunked label volumes of any size.

ingest (any format -> OME-NGFF image + labels, object index in one pass) -> hand-crafted features
per object from its bounding-box crop (physical units) -> learned embeddings (3-D SimSiam, 3-D VAE,
point-cloud AE) -> weighted multi-feature clustering evaluated with ARI / NMI / matched accuracy ->
relabelled mask (OME-NGFF labels with colours), per-object table and plots.

>>> from milotile import segments as sg                                  # doctest: +SKIP
>>> sg.ingest_segments("em.mrc", "labels.h5", "project.zarr")            # doctest: +SKIP
>>> sg.compute_features("project.zarr")                                   # doctest: +SKIP
>>> sg.cluster_objects("project.zarr", features="size,sphericity,skeleton", n_clusters=4)  # doctest: +SKIP

Torch is imported only by :func:`train_model` / :func:`embed_objects`.
"""

from __future__ import annotations

from typing import Any

from milotile.segments.cluster import (
    ALGORITHMS,
    FEATURE_GROUPS,
    LEARNED,
    ClusterResult,
    cluster_objects,
)
from milotile.segments.features import compute_features, feature_units
from milotile.segments.ingest import index_objects, ingest_segments
from milotile.segments.io import open_volume
from milotile.segments.plots import plot_clusters
from milotile.segments.volume import SegmentVolume, open_segments

__all__ = [
    "ALGORITHMS", "FEATURE_GROUPS", "LEARNED", "ClusterResult", "SegmentVolume", "cluster_objects",
    "compute_features", "embed_objects", "feature_units", "index_objects", "ingest_segments", "open_segments",
    "open_volume", "plot_clusters", "train_model",
]


def train_model(*args: Any, **kwargs: Any) -> Any:
    """See :func:`milotile.segments.learn.train_model` (imports torch on first use)."""
    from milotile.segments.learn import train_model as _train

    return _train(*args, **kwargs)


def embed_objects(*args: Any, **kwargs: Any) -> Any:
    """See :func:`milotile.segments.learn.embed_objects` (imports torch on first use)."""
    from milotile.segments.learn import embed_objects as _embed

    return _embed(*args, **kwargs)
