"""Ingest MRC tomograms and aligned tilt series into a collection store with bounded memory.

Every input is validated before anything is written (missing files, unreadable or truncated MRC,
tilt stacks whose x/y size differs from the tomogram, angle counts, duplicate names, empty or 2D
volumes, unknown axis orders). The volumes are then copied zarr chunk by zarr chunk: each dask task
reads one ``(64, 256, 256)`` region through ``mrcfile``'s memory map, writes it, and returns its
count, sum, sum of squares and number of non-finite values. A tomogram with NaN/inf values is
removed again, together with everything else written by the same call, so a failed ingest leaves
the store exactly as it was.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import dask
import dask.array as da
import numpy as np
import zarr

from milotile.errors import InputError
from milotile.ops.stats import block_moments, merge_moments
from milotile.runtime import compute_with_progress
from milotile.store.arrays import (
    AXES_ZYX,
    DEFAULT_CHUNKS,
    clip_chunks,
    create_array,
    downsample_block,
    multiscale_metadata,
)
from milotile.store.collection import STAGING, TILTS, TOMOGRAMS, Collection, as_collection
from milotile.store.copick_tree import (
    copick_tomograms,
    is_copick_config,
    zarr_fingerprint,
    zarr_image,
)
from milotile.store.lock import writer_lock
from milotile.store.mrc import (
    ORDERS,
    OrientedMRC,
    check_order,
    fingerprint,
    quick_fingerprint,
    read_header,
)
from milotile.store.ngff import grey_channel
from milotile.store.stage_output import make_token

log = logging.getLogger(__name__)

TOMO_SUFFIXES = (".rec", ".mrc")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass
class Source:
    """One tomogram to ingest, with its optional aligned tilt series."""

    name: str
    rec_path: str
    tilt_path: str | None = None
    angle_path: str | None = None
    origin: str = ""  # where it was named ("manifest.txt line 3"), for error messages
    angles: np.ndarray | None = field(default=None, repr=False)
    kind: str = "mrc"  # "mrc" or "zarr" (an OME-NGFF multiscale image, e.g. from a copick project)


# ---------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------
def read_text_lines(path: Path, what: str) -> list[str]:
    """The lines of a UTF-8 text file; a binary or non-UTF-8 file is an InputError naming the line."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise InputError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    try:
        return raw.decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise InputError(f"{what} {path} is not UTF-8 text (byte {exc.start}, line {line}); "
                         "it must be a plain text file") from None


def read_manifest(path: str | os.PathLike) -> list[Source]:
    """Parse a MiLoPYP manifest: ``image_name rec_path [tilt_path angle_path]`` with a header line.

    Tabs or any whitespace separate the columns; relative paths are relative to the manifest.
    """
    p = Path(path).expanduser().absolute()  # sources travel to Dask workers that may run elsewhere
    base = p.parent
    lines = read_text_lines(p, "manifest")
    rows = [(i + 1, ln.split()) for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith("#")]
    if not rows:
        raise InputError(f"manifest {p} is empty")
    header = [c.lower() for c in rows[0][1]]
    if "image_name" not in header or "rec_path" not in header:
        raise InputError(f"manifest {p} line {rows[0][0]}: the header must name image_name and rec_path")
    col = {c: header.index(c) for c in header}
    out = []
    for lineno, parts in rows[1:]:
        if len(parts) != len(header):
            raise InputError(
                f"manifest {p} line {lineno}: expected {len(header)} columns ({' '.join(header)}), got {len(parts)}"
            )

        def resolve(key: str, parts: list[str] = parts) -> str | None:
            if key not in col:
                return None
            q = Path(parts[col[key]])
            return str(q if q.is_absolute() else (base / q))

        out.append(
            Source(
                name=parts[col["image_name"]],
                rec_path=resolve("rec_path"),
                tilt_path=resolve("tilt_path"),
                angle_path=resolve("angle_path"),
                origin=f"manifest {p} line {lineno}",
            )
        )
    return out


def _with_tilts(rec: Path, origin: str) -> Source:
    """A source for ``rec``, picking up ``<stem>.tlt`` and its aligned stack by name."""
    folder, stem = rec.parent, rec.stem
    tlt = folder / f"{stem}.tlt"
    tilt = None
    if tlt.exists():
        for cand in (folder / f"{stem}.ali", folder / f"{stem}_ali.mrc", folder / f"{stem}.mrc"):
            if cand.exists() and cand != rec:
                tilt = str(cand)
                break
    return Source(stem, str(rec), tilt, str(tlt) if tilt else None, origin=origin)


def _from_folder(folder: Path) -> list[Source]:
    recs = {f.stem: f for f in sorted(folder.glob("*.rec"))}
    out: list[Source] = []
    for f in sorted(folder.glob("*.mrc")):
        tlt = f.with_suffix(".tlt")
        if f.stem not in recs and not tlt.exists() and not f.stem.endswith("_ali"):
            recs[f.stem] = f
    for _stem, rec in sorted(recs.items()):
        out.append(_with_tilts(rec, f"folder {folder}"))
    if not out:
        raise InputError(f"folder {folder} holds no .rec or .mrc tomogram")
    return out


def collect_sources(
    sources: Iterable[str | os.PathLike] | str | os.PathLike, copick_tomo_type: str | None = None
) -> list[Source]:
    """Turn manifests, folders, single files, OME-Zarr images and copick configs into :class:`Source` records.

    A copick config contributes one source per run (the finest voxel spacing of
    ``copick_tomo_type``, see :func:`milotile.store.copick_tree.copick_tomograms`); an OME-NGFF
    image folder (Zarr v2 or v3) is one source named after the folder.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    out: list[Source] = []
    for s in sources:
        p = Path(s).expanduser().absolute()  # a worker in another folder resolves it the same way
        if p.is_dir() and ((p / "zarr.json").exists() or (p / ".zattrs").exists()):
            out.append(Source(p.name[: -len(".zarr")] if p.name.endswith(".zarr") else p.name, str(p),
                              origin=f"argument {p}", kind="zarr"))
        elif p.is_dir():
            out.extend(_from_folder(p))
        elif is_copick_config(p):
            out.extend(Source(run, str(z), origin=f"copick project {p}", kind="zarr")
                       for run, z in copick_tomograms(p, copick_tomo_type))
        elif p.suffix.lower() in TOMO_SUFFIXES:
            if not p.exists():
                raise InputError(f"tomogram file {p} does not exist")
            out.append(_with_tilts(p, f"argument {p}"))
        elif p.exists():
            out.extend(read_manifest(p))
        else:
            raise InputError(f"source {p} does not exist")
    if not out:
        raise InputError("nothing to ingest")
    return out


def read_angles(path: str | os.PathLike, origin: str = "") -> np.ndarray:
    """Read a ``.tlt`` file (one angle in degrees per line)."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{origin + ': ' if origin else ''}angle file {p} does not exist")
    vals = []
    for i, ln in enumerate(read_text_lines(p, "angle file"), 1):
        if not ln.strip():
            continue
        try:
            vals.append(float(ln.split()[0]))
        except ValueError:
            raise InputError(f"angle file {p} line {i}: {ln.strip()!r} is not a number") from None
    if not vals:
        raise InputError(f"angle file {p} is empty")
    return np.asarray(vals, dtype=np.float64)


# ---------------------------------------------------------------------------------------------
# validation
# ---------------------------------------------------------------------------------------------
@dataclass
class _Plan:
    src: Source
    order: str
    shape: tuple[int, int, int]
    voxel_size: float
    size_bytes: int
    mtime_ns: int
    quick: str = ""
    tilt_shape: tuple[int, int, int] | None = None
    tilt_pixel: float | None = None
    tilt_size: int | None = None
    tilt_mtime: int | None = None
    tilt_quick: str | None = None
    action: str = "write"  # write | skip | overwrite


def _validate(sources: list[Source], order: str, voxel_size: float | None) -> list[_Plan]:
    seen: dict[str, str] = {}
    plans = []
    for s in sources:
        where = s.origin or s.rec_path
        if not NAME_RE.match(s.name):
            raise InputError(f"{where}: tomogram name {s.name!r} must start with a letter or digit and hold only "
                             "letters, digits, '.', '_' and '-'")
        if s.name in seen:
            raise InputError(f"duplicate tomogram name {s.name!r} ({seen[s.name]} and {where})")
        seen[s.name] = where
        if not Path(s.rec_path).exists():
            raise InputError(f"{where}: tomogram file {s.rec_path} does not exist")
        if s.kind == "zarr":
            img = zarr_image(s.rec_path)
            vs = voxel_size if voxel_size is not None else img.voxel_size
            plans.append(_Plan(s, order, img.shape, float(vs), img.size_bytes, img.mtime_ns, ""))
            continue
        hdr = read_header(s.rec_path, what=f"{where}: tomogram")
        shape = tuple(hdr.file_shape[a] for a in ORDERS[order])
        vs = voxel_size if voxel_size is not None else hdr.voxel_size[0]
        if not vs or vs <= 0 or not np.isfinite(vs):
            raise InputError(f"{where}: {s.rec_path} has no voxel size in its header; pass --voxel-size")
        plan = _Plan(s, order, shape, float(vs), hdr.size_bytes, hdr.mtime_ns, quick_fingerprint(s.rec_path))
        if (s.tilt_path is None) != (s.angle_path is None):
            raise InputError(f"{where}: a tilt series needs both the tilt stack and the .tlt angle file")
        if s.tilt_path is not None:
            thdr = read_header(s.tilt_path, what=f"{where}: tilt stack")
            s.angles = read_angles(s.angle_path, where)
            n, ty, tx = thdr.file_shape
            if len(s.angles) != n:
                raise InputError(
                    f"{where}: {s.angle_path} lists {len(s.angles)} angles but the tilt stack {s.tilt_path} has {n} tilts"
                )
            if (ty, tx) != shape[1:]:
                raise InputError(
                    f"{where}: tilt stack {s.tilt_path} is {tx}x{ty} pixels (x*y) but tomogram {s.rec_path} is "
                    f"{shape[2]}x{shape[1]} in order {order}; check --order or the tilt stack"
                )
            plan.tilt_shape = (n, ty, tx)
            plan.tilt_size, plan.tilt_mtime = thdr.size_bytes, thdr.mtime_ns
            plan.tilt_quick = quick_fingerprint(s.tilt_path)
            tvs = thdr.voxel_size[0]
            plan.tilt_pixel = float(tvs) if tvs and tvs > 0 else plan.voxel_size
        plans.append(plan)
    return plans


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------
def _copy_block(block: np.ndarray, targets: list[zarr.Array], block_info: dict | None = None) -> np.ndarray:
    """Write one block into ``targets[0]`` and its 2x, 4x, ... means into the coarser levels.

    Each coarser level's zarr chunks are the level-0 chunks halved per level, so every block owns
    exactly one chunk of every level and no two tasks write into the same chunk. Returns
    ``[count, sum, sumsq, n_nonfinite]`` of the block's finite values.
    """
    loc = [a for a, _ in block_info[0]["array-location"]]
    cur = block
    for level, target in enumerate(targets):
        if level:
            cur = downsample_block(cur)
            loc = [a // 2 for a in loc]
        if cur.size:
            target[tuple(slice(a, a + n) for a, n in zip(loc, cur.shape, strict=True))] = cur
    moments = block_moments(block)
    return np.array([*moments, block.size - moments[0]], dtype=np.float64).reshape(1, 1, 1, 4)


def _copy_lazy(src: da.Array, targets: list[zarr.Array]) -> da.Array:
    """Lazy per-chunk copy of ``src`` into ``targets`` (pyramid levels).

    Returns the per-block ``[n, mean, M2, n_nonfinite]`` rows, ``(n_blocks, 4)``, merged on the
    driver by :func:`_merge_stats` (the one moments accumulator, :mod:`milotile.ops.stats`).
    """
    per_block = src.map_blocks(
        _copy_block,
        targets=targets,
        new_axis=3,
        chunks=tuple((1,) * len(c) for c in src.chunks) + ((4,),),
        dtype=np.float64,
        meta=np.empty((0, 0, 0, 0), dtype=np.float64),
    )
    return per_block.reshape(-1, 4)


def _merge_stats(rows: np.ndarray) -> tuple[float, float, float, int]:
    """``(n, mean, variance, n_nonfinite)`` of per-block rows from :func:`_copy_lazy`."""
    rows = np.asarray(rows, dtype=np.float64).reshape(-1, 4)
    n, mean, var = merge_moments(rows[:, :3])
    return n, mean, var, int(rows[:, 3].sum())


def _n_levels(shape: Sequence[int], n_levels: int = 3) -> int:
    """Pyramid levels of a volume: up to ``n_levels``, each at least one voxel along every axis."""
    return next((lv for lv in range(n_levels) if min(s // 2**lv for s in shape) < 1), n_levels)


def _pyramid_targets(group: zarr.Group, shape: Sequence[int], chunks: Sequence[int], n_levels: int = 3) -> list[zarr.Array]:
    """Create the arrays ``0, 1, 2`` of a multiscale image whose chunks halve level by level."""
    chunks = clip_chunks(shape, chunks)
    if any(c % 2 ** (n_levels - 1) for c, s in zip(chunks, shape, strict=True) if c < s):
        raise InputError(f"chunk shape {tuple(chunks)} must be a multiple of {2 ** (n_levels - 1)} for the pyramid")
    targets = []
    for level in range(_n_levels(shape, n_levels)):
        f = 2**level
        lshape = [s // f for s in shape]
        lchunks = [max(1, c // f) for c in chunks]
        targets.append(create_array(group, str(level), lshape, chunks=lchunks, dimension_names=AXES_ZYX))
    return targets


def ingest(
    sources: Iterable[str | os.PathLike] | str | os.PathLike,
    store: str | os.PathLike | Collection,
    *,
    order: str | None = None,
    voxel_size: float | None = None,
    tilt_axis_angle: float = 0.0,
    overwrite: bool = False,
    chunks: Sequence[int] = DEFAULT_CHUNKS,
    copick_tomo_type: str | None = None,
    quick_check: bool = False,
) -> Collection:
    """Ingest tomograms (and aligned tilt series) into a collection store.

    Parameters
    ----------
    sources : path or list of paths
        MiLoPYP manifests (``image_name rec_path [tilt_path angle_path]``), folders of
        ``.rec``/``.mrc`` (a ``<stem>.tlt`` plus a tilt stack ``<stem>.ali``/``<stem>_ali.mrc``/
        ``<stem>.mrc`` beside a ``<stem>.rec`` is picked up as its tilt series), single files,
        OME-NGFF image folders (Zarr v2/v3) or copick configs (one tomogram per run; the copick
        tree is only read, never written).
    store : path, URL or Collection
        The collection store; created if missing.
    order : {"zxy", "xzy", "xyz", "yxz"}, optional
        Which MRC axis is the depth (see :mod:`milotile.store.mrc`); default: the MRC sections.
    voxel_size : float, optional
        Override the header voxel size (Å).
    tilt_axis_angle : float
        Tilt-axis direction of the aligned stacks (degrees from the image y axis; 0 for IMOD).
    overwrite : bool
        Re-ingest tomograms whose source file changed since they were ingested.
    chunks : sequence of int
        Zarr chunk shape of the volumes.
    copick_tomo_type : str, optional
        Tomogram type taken from copick projects (default: the only or first type).
    quick_check : bool
        Re-ingest decision from size, mtime and 64 sampled blocks (milliseconds) instead of the
        whole-file SHA-1 (one read of every file already in the store, 0.28-0.58 GB/s per core here; see
        ``benchmarks/ingest.py --hash``). The quick check misses an edit between the sampled blocks
        when size and mtime were kept.

    Returns
    -------
    Collection
        The opened store.

    Raises
    ------
    InputError
        For any bad input; nothing is written in that case.
    """
    order = check_order(order)
    if voxel_size is not None and not (voxel_size > 0):
        raise InputError(f"--voxel-size must be positive, got {voxel_size}")
    plans = _validate(collect_sources(sources, copick_tomo_type), order, voxel_size)
    col = as_collection(store, mode="a")
    with writer_lock(col, TOMOGRAMS):  # one ingest at a time: they share staging/
        return _ingest_plans(col, plans, order, voxel_size, tilt_axis_angle, overwrite, chunks,
                             "quick" if quick_check else "full")


def _ingest_plans(col: Collection, plans: list[_Plan], order: str, voxel_size: float | None,
                  tilt_axis_angle: float, overwrite: bool, chunks: Sequence[int], check: str = "full") -> Collection:
    """Skip unchanged tomograms, then stage, check and move the others into place (lock held)."""
    _decide(col, plans, order, voxel_size, tilt_axis_angle, overwrite, check)
    todo = [p for p in plans if p.action != "skip"]
    for p in plans:
        if p.action == "skip":
            log.info("%s unchanged (%s), skipped", p.src.name, CHECKS[check])
    if not todo:
        return col

    # Everything is written under staging/ first and moved into place only when complete, so a
    # failure (NaN values, a crash, Ctrl-C) never touches tomograms already in the store.
    stage_root = col.group(STAGING, create=True)
    try:
        stats, fps, tilt_fps = _copy_all(col, stage_root, todo, order, chunks)
        for i, plan in enumerate(todo):
            _check_stats(plan, stats[2 * i], stats[2 * i + 1])
        for i, plan in enumerate(todo):
            _write_attrs(col, stage_root, plan, order, tilt_axis_angle, stats[2 * i], fps[i], tilt_fps.get(i))
        for plan in todo:  # every input was good: move the staged entries into place
            name = plan.src.name
            _replace(col, f"{STAGING}/{TOMOGRAMS}/{name}", f"{TOMOGRAMS}/{name}")
            if plan.tilt_shape is not None:
                _replace(col, f"{STAGING}/{TILTS}/{name}", f"{TILTS}/{name}")
            elif name in col.group(TILTS, create=True):
                del col.zarr_group[TILTS][name]
            log.info("ingested %s %s (z,y,x) at %.4g Å", name, plan.shape, plan.voxel_size)
    finally:
        if STAGING in col.zarr_group:
            del col.zarr_group[STAGING]
        col.refresh()
    col.consolidate(_written_nodes(todo), drop=[f"{kind}/{p.src.name}" for p in todo for kind in (TOMOGRAMS, TILTS)])
    return col


def _written_nodes(todo: list[_Plan]) -> list[str]:
    """Every node an ingest call wrote (for the consolidated metadata, read without listing the store)."""
    nodes = [TOMOGRAMS, TILTS]
    for p in todo:
        name = p.src.name
        nodes += [f"{TOMOGRAMS}/{name}", *(f"{TOMOGRAMS}/{name}/{lv}" for lv in range(_n_levels(p.shape)))]
        if p.tilt_shape is not None:
            nodes += [f"{TILTS}/{name}", f"{TILTS}/{name}/0"]
    return nodes


def _copy_all(col: Collection, stage_root: zarr.Group, todo: list[_Plan], order: str,
              chunks: Sequence[int]) -> tuple[list, list[str], dict[int, str]]:
    """Copy every volume and tilt stack into ``staging/`` (one distributed pass that also computes
    the statistics and the content fingerprints). Returns per-plan ``[vol, tilt]`` statistics (flat),
    the tomogram fingerprints and ``{plan index: tilt fingerprint}``."""
    stage_tomo = stage_root.require_group(TOMOGRAMS)
    stage_tilt = stage_root.require_group(TILTS)
    stats_tasks = []
    for plan in todo:
        name = plan.src.name
        g = stage_tomo.create_group(name, overwrite=True)
        src = _source_array(plan, chunks)
        stats_tasks.append(_copy_lazy(src, _pyramid_targets(g, plan.shape, chunks)))
        if plan.tilt_shape is not None:
            tg = stage_tilt.create_group(name, overwrite=True)
            tchunks = (1, min(plan.tilt_shape[1], 1024), min(plan.tilt_shape[2], 1024))
            tsrc = da.from_array(OrientedMRC(plan.src.tilt_path, "zxy"), chunks=tchunks,
                                 name=f"tilt-{name}-{plan.mtime_ns}")
            ttarget = create_array(tg, "0", plan.tilt_shape, chunks=tchunks, dimension_names=("tilt", "y", "x"))
            stats_tasks.append(_copy_lazy(tsrc, [ttarget]))
        else:
            stats_tasks.append(None)
    fps = [dask.delayed(_fingerprint)(p.src.rec_path) for p in todo]
    with_tilt = [i for i, p in enumerate(todo) if p.tilt_shape is not None]
    fps += [dask.delayed(_fingerprint)(todo[i].src.tilt_path) for i in with_tilt]
    lazy = [t for t in stats_tasks if t is not None]
    log.info("ingesting %d tomograms into %s", len(todo), col.url)
    computed = _compute(lazy + fps)
    stats_iter = iter(computed[: len(lazy)])
    fp_vals = computed[len(lazy):]
    stats = [_merge_stats(next(stats_iter)) if t is not None else None for t in stats_tasks]
    return stats, list(fp_vals[: len(todo)]), dict(zip(with_tilt, fp_vals[len(todo):], strict=True))


def _check_stats(plan: _Plan, vol_stats: tuple | None, tilt_stats: tuple | None) -> None:
    """NaN/inf values or a constant volume or tilt stack: one clear error (nothing is moved into place)."""
    for what, st, path in (("tomogram", vol_stats, plan.src.rec_path), ("tilt stack", tilt_stats, plan.src.tilt_path)):
        if st is not None and st[3] > 0:
            raise InputError(f"{what} {path} contains {int(st[3])} NaN or infinite values")
        if st is not None and st[0] > 0 and not st[2] > 0:
            raise InputError(f"{what} {path} is constant (an empty volume)")


def _write_attrs(col: Collection, stage_root: zarr.Group, plan: _Plan, order: str, tilt_axis_angle: float, vol_stats: tuple,
                 fp: str, tilt_fp: str | None) -> None:
    """OME metadata and the ``milotile`` attributes (source, fingerprints, token, statistics)."""
    name = plan.src.name
    g = stage_root[TOMOGRAMS][name]
    _, mean, var, _ = vol_stats
    ome = multiscale_metadata(name, plan.voxel_size, _n_levels(plan.shape))
    sd = float(np.sqrt(max(var, 0.0)))
    ome["omero"] = grey_channel("tomogram", (float(mean) - 3 * sd, float(mean) + 3 * sd))  # napari: "<name>: tomogram"
    g.attrs["ome"] = ome  # no listing
    g.attrs["milotile"] = {
        "source": col.relative_path(plan.src.rec_path), "size_bytes": plan.size_bytes, "mtime_ns": plan.mtime_ns,
        "quick_fingerprint": plan.quick, "fingerprint": fp, "fingerprint_kind": _fingerprint_kind(plan.src.rec_path),
        "token": make_token(fp, order, plan.voxel_size),
        "voxel_size": plan.voxel_size, "order": order, "shape": list(plan.shape),
        "stats": {"mean": float(mean), "std": float(np.sqrt(max(var, 0.0)))}, "complete": True,
    }
    if plan.tilt_shape is None:
        return
    angles = [float(a) for a in plan.src.angles]
    stage_root[TILTS][name].attrs["milotile"] = {
        "source": col.relative_path(plan.src.tilt_path),
        "angle_file": col.relative_path(plan.src.angle_path), "size_bytes": plan.tilt_size,
        "mtime_ns": plan.tilt_mtime, "quick_fingerprint": plan.tilt_quick, "fingerprint": tilt_fp,
        "fingerprint_kind": _fingerprint_kind(plan.src.tilt_path),
        "token": make_token(tilt_fp, angles, float(tilt_axis_angle), plan.tilt_pixel), "angles": angles,
        "tilt_axis_angle": float(tilt_axis_angle), "pixel_size": plan.tilt_pixel, "complete": True,
    }


def _fingerprint_kind(path: str) -> str:
    """What :func:`_fingerprint` hashes for ``path`` (recorded beside the fingerprint, shown by ``info``)."""
    return "sha1 of the level-0 chunk files" if os.path.isdir(path) else "sha1 of the whole file"


def _fingerprint(path: str) -> str:
    """Content fingerprint of a source: the MRC file, or every file of a zarr image's level-0 array."""
    if os.path.isdir(path):
        img = zarr_image(path)
        return zarr_fingerprint(Path(img.path) / img.array)
    return fingerprint(path)


def _source_array(plan: _Plan, chunks: Sequence[int]) -> da.Array:
    """The source volume as a dask array with the store's chunks (read-only, lazily)."""
    zchunks = clip_chunks(plan.shape, chunks)
    if plan.src.kind == "zarr":
        arr = zarr_image(plan.src.rec_path).open()
        return da.from_zarr(arr, name=f"zarr-{plan.src.name}-{plan.mtime_ns}").astype(np.float32).rechunk(zchunks)
    return da.from_array(OrientedMRC(plan.src.rec_path, plan.order), chunks=zchunks,
                         name=f"mrc-{plan.src.name}-{plan.mtime_ns}")


#: How a re-ingest tells an unchanged source from a changed one (``ingest(check=...)``).
CHECKS = {
    "full": "whole-file SHA-1",
    "quick": "size, mtime and sampled blocks (--quick-check), else whole-file SHA-1",
}


def _same_file(meta: dict, size: int | None, mtime: int | None, quick: str | None, path: str | None,
               check: str = "full", fingerprints: dict[str, str] | None = None) -> bool:
    """Whether a source file still holds what was ingested.

    ``check="full"``: its whole-file fingerprint equals the stored one (an edit anywhere is seen, whatever
    the size and mtime). ``check="quick"``: size, mtime and the sampled hash agree (an edit between the
    sampled blocks with the mtime restored is missed), else the whole-file fingerprint decides.
    """
    if check == "quick" and meta.get("size_bytes") == size and meta.get("mtime_ns") == mtime \
            and meta.get("quick_fingerprint") == quick:
        return True
    if path is None:
        return False
    fp = (fingerprints or {}).get(path) or _fingerprint(path)
    return meta.get("fingerprint") == fp


def _fingerprints(paths: list[str]) -> dict[str, str]:
    """Whole-file fingerprints of ``paths``, a few files at a time (hashlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    paths = sorted(set(paths))
    if not paths:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(paths), os.cpu_count() or 1)) as pool:
        return dict(zip(paths, pool.map(_fingerprint, paths), strict=True))


def _decide(col: Collection, plans: list[_Plan], order: str, voxel_size: float | None, tilt_axis_angle: float,
            overwrite: bool, check: str = "full") -> None:
    """Per tomogram: skip it when tomogram, tilt stack and angles are unchanged (``check``: see
    :data:`CHECKS`); refuse a changed one without ``overwrite``. Derived data of a replaced input
    become stale through its new token."""
    tomo_root = col.group(TOMOGRAMS, create=True)
    tilt_root = col.group(TILTS)
    known = [p for p in plans if _node_meta(tomo_root, p.src.name).get("complete")]
    fps = _fingerprints([q for p in known for q in (p.src.rec_path, p.src.tilt_path) if q]) if check == "full" else {}
    for plan in plans:
        name = plan.src.name
        try:
            meta = dict(tomo_root[name].attrs.get("milotile", {}))  # one read; no listing
        except KeyError:
            continue
        if not meta.get("complete"):
            plan.action = "overwrite"  # left over from a crash: redo
            continue
        same_opts = meta.get("order") == order and (voxel_size is None or meta.get("voxel_size") == plan.voxel_size)
        same = same_opts and _same_file(meta, plan.size_bytes, plan.mtime_ns, plan.quick, plan.src.rec_path,
                                        check, fps)
        tmeta = _node_meta(tilt_root, name)
        if plan.tilt_shape is None:
            same_tilt = not tmeta
        else:
            same_tilt = (
                bool(tmeta.get("complete"))
                and _same_file(tmeta, plan.tilt_size, plan.tilt_mtime, plan.tilt_quick, plan.src.tilt_path, check, fps)
                and tmeta.get("angles") == [float(a) for a in plan.src.angles]
                and tmeta.get("tilt_axis_angle") == float(tilt_axis_angle)
            )
        if same and same_tilt:
            plan.action = "skip"
        elif overwrite:
            plan.action = "overwrite"
        else:
            what = "tomogram" if not same else "tilt series (stack or angles)"
            raise InputError(
                f"tomogram {name} is already in {col.url} and its {what} changed "
                f"({plan.src.rec_path}); pass --overwrite to replace it"
            )


def _node_meta(group: zarr.Group | None, name: str) -> dict:
    """The ``milotile`` attributes of ``group[name]`` (empty when either is missing)."""
    try:
        return dict(group[name].attrs.get("milotile", {})) if group is not None else {}
    except KeyError:
        return {}


def _replace(col: Collection, src: str, dst: str) -> None:
    """Move the node at ``src`` to ``dst`` (replacing it); a directory rename on local stores."""
    fs = col.fs
    col.group(dst.rsplit("/", 1)[0], create=True)  # parent group with its zarr.json
    s, d = col._join(src), col._join(dst)
    if fs.exists(d):
        fs.rm(d, recursive=True)
    fs.mv(s, d, recursive=True)


def _compute(tasks: list) -> list:
    """Compute with a progress bar (distributed client if one is active)."""
    return compute_with_progress(tasks, desc="ingest")
