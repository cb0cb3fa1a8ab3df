"""The review page's server side: queue, thumbnails, slice view, verdicts (``milotile refine review``).

Served by the atlas app's one-port server (:func:`milotile.explore.serve.make_server` with
``review=``). Reads the tomograms (a small cache of decoded storage chunks keeps the next thumbnail
fast) and the heatmaps; writes only the review's verdict tables (:class:`milotile.refine.review.VerdictLog`).

Routes (all under ``/review`` and ``/api/review``)
-------------------------------------------------
``GET /review``                         the page (``static/review.html``)
``GET /api/review/meta``                JSON: picks table, run, threshold, box, tomograms, reasons, counts
``GET /api/review/queue``               JSON: queue order, sample flags, pick columns (tomogram index, x, y, z, score)
``GET /api/review/verdicts``            JSON: the verdicts made so far on this picks table (and added particles)
``GET /api/review/estimate``            JSON: precision / recall at the threshold from the reviewed sample
``GET /review/thumb/<pick>.png``        three orthogonal slices through a pick (xy | xz | yz)
``GET /api/review/slice/<i>/<z>.png``   z slice of tomogram ``i`` (binned to at most 1024 px)
``GET /api/review/heatmap/<i>/<z>.png`` the picker's heatmap on the same grid (red, alpha = score)
``POST /api/review/verdict``            ``{pick, verdict: accept|reject, reason}``
``POST /api/review/add``                ``{tomogram, x, y, z}``: a missed particle
``POST /api/review/undo``               ``{vid}``: remove that verdict (default the last one)
``POST /api/review/export``             ``{}``: download links of the verdict tables
``GET /download/review/<labels|negatives>.<parquet|csv|star>``
"""

from __future__ import annotations

import io
import logging
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from milotile.errors import InputError
from milotile.refine.review import (
    MIN_SAMPLE,
    REASONS,
    VerdictLog,
    estimate,
    load_picks,
    review_order,
    reviewed_threshold,
    sample_weights,
    table_verdicts,
)

log = logging.getLogger(__name__)

__all__ = ["ChunkReader", "ReviewApp"]

#: Longest side of the slice view image (pixels); the slice comes from the first pyramid level that fits.
SLICE_PX = 1024


class ChunkReader:
    """Reads boxes of pyramid levels through an LRU cache of decoded storage chunks.

    Parameters
    ----------
    col
        The collection.
    budget_mb
        Memory for decoded chunks (default 512 MB: e.g. 32 chunks of ``64 x 256 x 256`` float32).
    """

    def __init__(self, col: Any, budget_mb: float = 512.0):
        self.col = col
        self.budget = int(budget_mb * 2**20)
        self._arrays: dict[tuple[str, int], Any] = {}
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def array(self, name: str, level: int) -> Any:
        """The zarr array of level ``level`` of tomogram ``name``."""
        key = (name, int(level))
        if key not in self._arrays:
            self._arrays[key] = self.col[name].group[str(int(level))]
        return self._arrays[key]

    def _chunk(self, name: str, level: int, idx: tuple[int, int, int]) -> np.ndarray:
        key = (name, level, idx)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        arr = self.array(name, level)
        cs = arr.chunks
        block = np.asarray(arr[tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, cs, strict=True))], np.float32)
        with self._lock:
            self._cache[key] = block
            self._bytes += block.nbytes
            while self._bytes > self.budget and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._bytes -= old.nbytes
        return block

    def read(self, name: str, level: int, lo: tuple[int, int, int], hi: tuple[int, int, int]) -> np.ndarray:
        """The box ``[lo, hi)`` (z, y, x) of a level; voxels outside the volume are NaN."""
        arr = self.array(name, level)
        shape, cs = arr.shape, arr.chunks
        out = np.full(tuple(h - lo_ for lo_, h in zip(lo, hi, strict=True)), np.nan, np.float32)
        a = [max(0, v) for v in lo]
        b = [min(s, v) for s, v in zip(shape, hi, strict=True)]
        if any(x >= y for x, y in zip(a, b, strict=True)):
            return out
        ranges = [range(a[d] // cs[d], (b[d] - 1) // cs[d] + 1) for d in range(3)]
        for iz in ranges[0]:
            for iy in ranges[1]:
                for ix in ranges[2]:
                    idx = (iz, iy, ix)
                    block = self._chunk(name, level, idx)
                    c0 = [i * c for i, c in zip(idx, cs, strict=True)]
                    s0 = [max(a[d], c0[d]) for d in range(3)]
                    s1 = [min(b[d], c0[d] + block.shape[d]) for d in range(3)]
                    out[tuple(slice(s0[d] - lo[d], s1[d] - lo[d]) for d in range(3))] = block[
                        tuple(slice(s0[d] - c0[d], s1[d] - c0[d]) for d in range(3))]
        return out


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ReviewApp:
    """State of a review: the picks, their queue, the verdict log, the tomogram reader.

    Parameters
    ----------
    col
        The collection (opened writable: the verdict tables are written into it).
    picks
        Picks to review: a table of the store, a file (STAR, copick, IMOD, ...) or a DataFrame
        (see :func:`milotile.refine.review.load_picks`).
    name
        Review name: verdicts go to ``tables/labels-<name>`` and ``tables/negatives-<name>``.
    who
        Reviewer (default the login name).
    threshold
        The picks' threshold (default the table's, else the median score).
    box
        Thumbnail box in voxels (default the picker's ``bbox``).
    thumb_px
        Displayed size of each of the three thumbnail panels.
    sample_every, seed
        Queue layout (:func:`milotile.refine.review.review_order`).
    """

    def __init__(self, col: Any, picks: Any = "picks", *, name: str = "review", who: str | None = None,
                 threshold: float | None = None, box: float | None = None, thumb_px: int = 128,
                 sample_every: int = 3, seed: int = 0):
        self.col = col
        self.picks, self.info = load_picks(col, picks)
        if box is not None:
            self.info["box"] = float(box)
        scores = self.picks["score"].to_numpy(np.float64)
        if threshold is None:
            threshold = self.info["threshold"]
        if threshold is None:
            threshold = float(np.median(scores)) if len(scores) else 0.5
        self.threshold = float(threshold)
        self.log = VerdictLog(col, name, who)
        self.order, sample = review_order(scores, self.threshold, sample_every=sample_every, seed=seed)
        self.is_sample = np.zeros(len(self.picks), bool)
        self.is_sample[self.order[sample]] = True
        n_above = int((scores >= self.threshold).sum())
        self.n_stratum = (len(scores) - n_above, n_above)
        self.thumb_px = int(thumb_px)
        self.reader = ChunkReader(col)
        self.names = sorted(col.names)
        self._stats: dict[str, tuple[float, float]] = {}
        self._queue: bytes | None = None
        log.info("review of %s: %d picks, threshold %.3g, box %.0f voxels; verdicts -> tables/%s, tables/%s",
                 self.info["table"], len(self.picks), self.threshold, self.info["box"], *self.log.tables.values())

    # -- data ------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """The picks table, its run, threshold, box, tomograms, reasons and the verdict tables."""
        tomos = []
        for n in self.names:
            t = self.col[n]
            tomos.append({"name": n, "shape": list(t.shape), "voxel_size": t.voxel_size,
                          "n_picks": int((self.picks["tomogram"] == n).sum())})
        return {"table": self.info["table"], "run": self.info["run"], "threshold": self.threshold,
                "box": self.info["box"], "n": int(len(self.picks)), "tomograms": tomos, "reasons": list(REASONS),
                "who": self.log.who, "tables": self.log.tables,
                "heatmaps": bool(self.info["run"]) and any(self._heatmap(n) is not None for n in self.names[:1])}

    def queue(self) -> bytes:
        """JSON of the queue (pick rows in order, sample flags) and the pick columns (cached)."""
        import json

        if self._queue is None:
            p = self.picks
            tix = {n: i for i, n in enumerate(self.names)}
            self._queue = json.dumps({
                "order": self.order.tolist(), "sample": self.is_sample[self.order].astype(int).tolist(),
                "tomo": p["tomogram"].map(tix).astype(int).tolist(),
                "x": np.round(p["x"].to_numpy(np.float64), 1).tolist(),
                "y": np.round(p["y"].to_numpy(np.float64), 1).tolist(),
                "z": np.round(p["z"].to_numpy(np.float64), 1).tolist(),
                "score": np.round(p["score"].to_numpy(np.float64), 4).tolist(),
            }).encode()
        return self._queue

    def verdicts(self) -> list[dict[str, Any]]:
        """Verdicts on this picks table, and every added particle."""
        df = self.log.frame()
        mine = set(table_verdicts(df, self.info["table"], self.info["run"])["vid"])
        df = df[df["vid"].isin(mine) | (df["verdict"] == "add")]  # in the order they were made
        cols = ["vid", "pick", "verdict", "reason", "sample", "tomogram", "x", "y", "z"]
        return [{**r, "pick": int(r["pick"]), "sample": bool(r["sample"])} for r in df[cols].to_dict("records")]

    def estimate(self) -> dict[str, Any]:
        """Precision and recall of the picks at the threshold from the reviewed random sample, and the
        threshold the sample would choose (when it can)."""
        df = table_verdicts(self.log.frame(["accept", "reject"]), self.info["table"], self.info["run"])
        w = sample_weights(df)
        rows = df["pick"].to_numpy(np.int64)
        scores = self.picks["score"].to_numpy(np.float64)[rows]
        acc = (df["verdict"] == "accept").to_numpy()
        smp = df["sample"].to_numpy(bool)
        est = _clean(estimate(scores, acc, self.threshold, weights=w) if smp.any() else
                     estimate(scores[:0], acc[:0], self.threshold))
        n_kept = int((self.picks["score"] >= self.threshold).sum())
        est.update(n_kept=n_kept, n_reviewed=int(len(df)), n_sample=int(smp.sum()))
        try:
            if smp.sum() < MIN_SAMPLE:
                raise InputError(f"{int(smp.sum())} reviewed random-sample picks: review at least {MIN_SAMPLE} to "
                                 "choose a threshold from the sample.")
            est["suggested"] = _clean(reviewed_threshold(scores, acc, weights=w))
        except InputError as exc:
            est["suggested"] = {"error": str(exc)}
        return est

    # -- images ------------------------------------------------------------------------------
    def stats(self, name: str) -> tuple[float, float]:
        """Mean and std of a tomogram: ingest's statistics, else those of its coarsest level."""
        if name not in self._stats:
            t = self.col[name]
            st = t.meta.get("stats") or {}
            if "mean" in st and "std" in st:
                self._stats[name] = (float(st["mean"]), float(st["std"]))
            else:
                v = np.asarray(t.data(max(t.levels)), np.float32)
                self._stats[name] = (float(v.mean()), float(v.std()))
        return self._stats[name]

    def _grey(self, name: str, a: np.ndarray) -> np.ndarray:
        mean, std = self.stats(name)
        g = (np.nan_to_num(a, nan=mean) - mean) / max(std, 1e-6)
        return (np.clip((g + 3.0) / 6.0, 0.0, 1.0) * 255.0).astype(np.uint8)

    def thumbnail(self, i: int) -> bytes:
        """PNG of pick ``i``: the xy, xz and yz slices through it, box = the picker's, side by side."""
        from PIL import Image

        if not 0 <= i < len(self.picks):
            raise KeyError(i)
        r = self.picks.iloc[i]
        name = str(r["tomogram"])
        h = max(2, int(np.ceil(self.info["box"] / 2)))
        c = [int(round(float(r[a]))) for a in ("z", "y", "x")]
        crop = self.reader.read(name, 0, tuple(v - h for v in c), tuple(v + h + 1 for v in c))
        g = self._grey(name, crop)
        panels = [g[h], g[:, h, :], g[:, :, h]]  # xy (rows y), xz (rows z), yz (rows z)
        px = self.thumb_px
        tiles = [np.asarray(Image.fromarray(p).resize((px, px), Image.Resampling.BILINEAR)) for p in panels]
        sep = np.full((px, 2), 40, np.uint8)
        return _png(np.concatenate([tiles[0], sep, tiles[1], sep, tiles[2]], axis=1))

    def _level(self, name: str) -> int:
        t = self.col[name]
        for lv in sorted(t.levels):
            if max(t.shape[1:]) / 2**lv <= SLICE_PX:
                return lv
        return max(t.levels)

    def slice_png(self, ti: int, z: float) -> bytes:
        """z slice of tomogram ``ti`` (index into the sorted names) at level-0 ``z``."""
        name = self.names[ti]
        lv = self._level(name)
        arr = self.reader.array(name, lv)
        zl = int(np.clip(round((z + 0.5) / 2**lv - 0.5), 0, arr.shape[0] - 1))
        img = self.reader.read(name, lv, (zl, 0, 0), (zl + 1, arr.shape[1], arr.shape[2]))[0]
        return _png(self._grey(name, img))

    def _heatmap(self, name: str) -> Any | None:
        from milotile.refine.predict import HEATMAPS

        run = self.info["run"]
        if not run:
            return None
        path = f"{HEATMAPS}/{run}/{name}"
        try:
            grp = self.col.zarr_group[path]
            return grp, grp["0"]
        except KeyError:
            return None

    def heatmap_png(self, ti: int, z: float) -> bytes:
        """The picker's heatmap (maximum over classes) at level-0 ``z`` on the slice view's grid, as red RGBA."""
        name = self.names[ti]
        found = self._heatmap(name)
        if found is None:
            raise KeyError(f"no heatmap of run {self.info['run']} for {name}")
        grp, hm = found
        ds = grp.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"]
        scale = next(t["scale"] for t in ds if t["type"] == "scale")[1:]
        trans = next((t["translation"] for t in ds if t["type"] == "translation"), [0.0] * 4)[1:]
        vs = self.col[name].voxel_size
        lv = self._level(name)
        arr = self.reader.array(name, lv)
        f = 2**lv

        def index(v0: np.ndarray, d: int) -> np.ndarray:
            return np.clip(np.round((v0 * vs - trans[d]) / scale[d]).astype(int), 0, hm.shape[1 + d] - 1)

        zi = int(index(np.array([z]), 0)[0])
        plane = np.asarray(hm[:, zi], np.float32).max(axis=0)
        yy = index((np.arange(arr.shape[1]) + 0.5) * f - 0.5, 1)
        xx = index((np.arange(arr.shape[2]) + 0.5) * f - 0.5, 2)
        v = np.clip(plane[np.ix_(yy, xx)], 0.0, 1.0)
        rgba = np.zeros(v.shape + (4,), np.uint8)
        rgba[..., 0] = 255
        rgba[..., 1] = (80 * v).astype(np.uint8)
        rgba[..., 3] = (200 * v).astype(np.uint8)
        return _png(rgba)

    # -- verdicts ----------------------------------------------------------------------------
    def verdict(self, body: dict[str, Any]) -> dict[str, Any]:
        """Store ``{pick, verdict, reason}``; returns the stored row and the new estimate."""
        i = int(body.get("pick", -1))
        if not 0 <= i < len(self.picks):
            raise InputError(f"pick {i} is not a row of {self.info['table']} ({len(self.picks)} picks).")
        verdict = str(body.get("verdict"))
        if verdict not in ("accept", "reject"):
            raise InputError(f"verdict must be accept or reject, got {verdict!r}")
        r = self.picks.iloc[i]
        stratum = int(float(r["score"]) >= self.threshold)
        row = self.log.add(verdict, tomogram=r["tomogram"], x=r["x"], y=r["y"], z=r["z"], cls=str(r["class"]),
                           reason=str(body.get("reason") or ""), sample=bool(self.is_sample[i]), stratum=stratum,
                           stratum_n=int(self.n_stratum[stratum]), score=float(r["score"]), pick=i,
                           picks=self.info["table"], run=self.info["run"])
        return {"row": _clean(row), "estimate": self.estimate()}

    def add(self, body: dict[str, Any]) -> dict[str, Any]:
        """Store a missed particle ``{tomogram, x, y, z}`` (level-0 voxels) as an added label."""
        name = str(body.get("tomogram"))
        if name not in self.names:
            raise InputError(f"unknown tomogram {name!r}")
        shape = self.col[name].shape
        xyz = [float(body[a]) for a in ("x", "y", "z")]
        if not all(0 <= v <= s - 1 for v, s in zip(xyz, shape[::-1], strict=True)):
            raise InputError(f"({xyz[0]:.0f}, {xyz[1]:.0f}, {xyz[2]:.0f}) lies outside {name} (x, y, z < {shape[::-1]}).")
        cls = str(self.picks["class"].iloc[0]) if len(self.picks) else "particle"
        row = self.log.add("add", tomogram=name, x=xyz[0], y=xyz[1], z=xyz[2], cls=cls, picks=self.info["table"],
                           run=self.info["run"])
        return {"row": _clean(row), "estimate": self.estimate()}

    def undo(self, body: dict[str, Any]) -> dict[str, Any]:
        """Remove verdict ``body["vid"]`` (default the last one)."""
        row = self.log.undo(body.get("vid") or None)
        return {"row": None if row is None else _clean(row), "estimate": self.estimate()}

    def export(self) -> dict[str, Any]:
        """Links to the verdict tables in parquet, CSV and RELION STAR."""
        out = {}
        for kind, table in self.log.tables.items():
            n = int(len(self.col.read_table(table))) if self.col.has_table(table) else 0
            out[kind] = {"table": table, "n": n,
                         "downloads": {f: f"/download/review/{kind}.{f}" for f in ("parquet", "csv", "star")}}
        return out

    def download(self, kind: str, fmt: str) -> bytes:
        """Bytes of a verdict table (``labels`` or ``negatives``) as ``parquet``, ``csv`` or ``star``."""
        table = self.log.tables[kind]
        if not self.col.has_table(table):
            raise KeyError(table)
        df = self.col.read_table(table)
        if fmt == "parquet":
            buf = io.BytesIO()
            df.to_parquet(buf, index=False)
            return buf.getvalue()
        if fmt == "csv":
            return df.to_csv(index=False).encode()
        if fmt == "star":
            from milotile.formats import export

            with tempfile.TemporaryDirectory() as d:
                target = Path(d) / f"{table}.star"
                export(df[["tomogram", "x", "y", "z", "class"]], "star", target, col=self.col)
                return target.read_bytes()
        raise KeyError(fmt)

    # -- routing -----------------------------------------------------------------------------
    def get(self, path: str) -> tuple[bytes, str] | None:
        """Body and content type of a GET route of the review (``None``: not a review route)."""
        import json

        js = "application/json"
        if path == "/api/review/meta":
            return json.dumps(self.meta()).encode(), js
        if path == "/api/review/queue":
            return self.queue(), js
        if path == "/api/review/verdicts":
            return json.dumps(self.verdicts()).encode(), js
        if path == "/api/review/estimate":
            return json.dumps(self.estimate()).encode(), js
        if path.startswith("/review/thumb/") and path.endswith(".png"):
            return self.thumbnail(int(path[len("/review/thumb/"):-4])), "image/png"
        for kind, fn in (("slice", self.slice_png), ("heatmap", self.heatmap_png)):
            pre = f"/api/review/{kind}/"
            if path.startswith(pre) and path.endswith(".png"):
                ti, z = path[len(pre):-4].split("/")
                return fn(int(ti), float(z)), "image/png"
        if path.startswith("/download/review/"):
            kind, _, fmt = path[len("/download/review/"):].rpartition(".")
            return self.download(kind, fmt), "application/octet-stream" if fmt == "parquet" else "text/plain"
        return None

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """JSON answer of a POST route of the review (``None``: not a review route)."""
        routes = {"/api/review/verdict": self.verdict, "/api/review/add": self.add, "/api/review/undo": self.undo,
                  "/api/review/export": lambda b: self.export()}
        fn = routes.get(path)
        return None if fn is None else fn(body)


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe copy: NaN -> None, numpy scalars -> Python, tuples -> lists."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _clean(v)
        elif isinstance(v, (tuple, list)):
            v = [None if isinstance(x, float) and not np.isfinite(x) else x for x in v]
        elif isinstance(v, (np.floating, float)):
            v = None if not np.isfinite(v) else float(v)
        elif isinstance(v, (np.integer,)):
            v = int(v)
        elif isinstance(v, (np.bool_,)):
            v = bool(v)
        elif v is pd.NA:
            v = None
        out[k] = v
    return out
