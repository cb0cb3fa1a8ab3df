"""The collection store: Zarr v3 + OME-NGFF 0.5 volumes, tilt series, derived data and parquet tables."""

from milotile.store.arrays import create_array, downsample_block, multiscale_metadata, write_dask
from milotile.store.collection import (
    Collection,
    TiltSeries,
    Tomogram,
    as_collection,
    open_collection,
)
from milotile.store.ingest import collect_sources, ingest, read_angles, read_manifest
from milotile.store.mrc import ORDERS, OrientedMRC, read_header, write_mrc
from milotile.store.producers import missing_input, producer
from milotile.store.stage_output import StageOutput, output_status, source_token

__all__ = [
    "ORDERS",
    "Collection",
    "StageOutput",
    "OrientedMRC",
    "TiltSeries",
    "Tomogram",
    "as_collection",
    "collect_sources",
    "create_array",
    "downsample_block",
    "ingest",
    "missing_input",
    "multiscale_metadata",
    "open_collection",
    "output_status",
    "producer",
    "read_angles",
    "read_header",
    "read_manifest",
    "source_token",
    "write_dask",
    "write_mrc",
]
