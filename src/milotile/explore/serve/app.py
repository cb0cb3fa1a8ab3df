"""The selection app's server: page, points, thumbnails, selection and export on ONE port.

Standard library only (:class:`http.server.ThreadingHTTPServer`): the app makes a handful of
requests (page, one binary point buffer, thumbnails on hover, selection, export), so an ASGI stack
buys nothing here and one port keeps a single SSH tunnel enough
(``ssh -L 7000:localhost:7000 host``). The page draws the points with a small hand-written WebGL2
renderer (``static/app.js``, no build step).

Routes
------
``GET /``                      the page (``static/index.html``) and ``/static/<file>``
``GET /api/meta``              JSON: key, n, clusters (id, colour, count), tomograms, bounds
``GET /api/points.bin``        float32 ``[x, y, palette index] * n`` (palette index = cluster + 1)
``GET /api/nearest?x=&y=&r=``  JSON of the nearest point within ``r`` map units (hover)
``GET /thumb/<id>.png``        the candidate's patch, cut from the patch bank on demand
``POST /api/select``           ``{polygon | box, clusters}`` -> JSON counts + selection id
``GET /api/selection/<sid>.bin``  uint32 ids of a selection
``POST /api/export``           ``{selection, name}`` -> ``tables/labels-<name>`` + download links
``GET /download/<name>.<parquet|tsv|star>``  the exported selection

With a review (``make_server(..., review=ReviewApp(...))``, ``milotile refine review`` or
``explore serve --picks``) the same server also serves the review page at ``/review`` and its routes
(:mod:`milotile.explore.serve.review`); without an atlas ``/`` leads to the review page.
"""

from __future__ import annotations

import io
import json
import logging
import tempfile
import threading
import uuid
from collections import OrderedDict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import numpy as np

from milotile.errors import InputError
from milotile.explore.plots import patch_png
from milotile.explore.select import check_name, save_selection, selection_counts, selection_ids

log = logging.getLogger(__name__)

__all__ = ["AtlasApp", "serve", "patch_png"]

STATIC = Path(__file__).parent / "static"
_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8", ".png": "image/png"}


class AtlasApp:
    """State shared by the request threads: the atlas arrays, selections, the patch bank."""

    def __init__(self, atlas: Any, thumb_px: int = 96, max_selections: int = 32):
        self.atlas = atlas
        t = atlas.table
        self.xy = t[["map_x", "map_y"]].to_numpy(np.float32)
        self.cluster = t["cluster"].to_numpy(np.int32)
        self.thumb_px = int(thumb_px)
        self._selections: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._max = int(max_selections)
        self._lock = threading.Lock()
        self._tree = None
        self._bank = None
        self._bank_checked = False
        self._points: bytes | None = None

    # -- data --------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """Key, size, clusters, tomograms and map bounds (``review``: whether the review tab is served)."""
        cl = self.atlas.clusters()
        finite = self.xy[np.isfinite(self.xy).all(axis=1)]
        lo, hi = (finite.min(axis=0), finite.max(axis=0)) if len(finite) else (np.zeros(2), np.ones(2))
        t = self.atlas.table
        return {
            "key": self.atlas.key, "n": int(len(t)),
            "clusters": [{"id": int(r.cluster), "color": str(r.color), "count": int(r["count"])} for _, r in cl.iterrows()],
            "tomograms": sorted(t["tomogram"].astype(str).unique().tolist()) if "tomogram" in t else [],
            "bounds": [float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])],
            "thumbnails": self.bank() is not None,
        }

    def points(self) -> bytes:
        """float32 ``x, y, palette index`` per point (cached)."""
        if self._points is None:
            buf = np.empty((len(self.xy), 3), np.float32)
            buf[:, :2] = self.xy
            buf[:, 2] = self.cluster + 1
            self._points = np.ascontiguousarray(buf).tobytes()
        return self._points

    def bank(self) -> Any | None:
        """The patch bank behind the embeddings (``None`` when the store has none)."""
        if not self._bank_checked:
            self._bank_checked = True
            from milotile.explore.data import open_bank

            try:
                self._bank = open_bank(self.atlas.collection, self.atlas.bank_key)
            except InputError as exc:
                log.warning("no thumbnails: %s", exc)
        return self._bank

    def thumbnail(self, i: int) -> bytes:
        """PNG of candidate ``i`` (shift 0, the channels the model sees: a halves bank shows the tilt sum)."""
        from milotile.explore.data import model_channels

        bank = self.bank()
        if bank is None or not 0 <= i < bank.n:
            raise KeyError(i)
        patch = np.asarray(bank.array[i : i + 1, 0], np.float32)
        return patch_png(model_channels(patch, bank.layout)[0], self.thumb_px)

    def nearest(self, x: float, y: float, r: float) -> dict[str, Any]:
        """The nearest point to ``(x, y)`` within ``r`` (map units), or ``{}``."""
        if self._tree is None:
            from scipy.spatial import cKDTree

            ok = np.isfinite(self.xy).all(axis=1)
            self._tree = (cKDTree(self.xy[ok]), np.flatnonzero(ok))
        tree, rows = self._tree
        d, j = tree.query([x, y], distance_upper_bound=max(r, 0.0))
        if not np.isfinite(d):
            return {}
        row = self.atlas.table.iloc[int(rows[j])]
        out = {"id": int(row["id"]), "cluster": int(row["cluster"]), "thumb": f"/thumb/{int(row['id'])}.png"}
        for c in ("tomogram", "x", "y", "z"):
            if c in row:
                out[c] = row[c] if c == "tomogram" else round(float(row[c]), 1)
        return out

    # -- selection ---------------------------------------------------------------------------
    def select(self, body: dict[str, Any]) -> dict[str, Any]:
        """Compute a selection from ``{polygon | box, clusters}``; keep it under a new id."""
        clusters = body.get("clusters")
        ids = selection_ids(self.atlas.table, polygon=body.get("polygon"), box=body.get("box"),
                            clusters=None if clusters is None else [int(c) for c in clusters])
        sid = uuid.uuid4().hex[:12]
        geom = {k: body[k] for k in ("polygon", "box") if body.get(k) is not None}
        with self._lock:
            self._selections[sid] = {"ids": ids, "geometry": geom, "clusters": clusters}
            while len(self._selections) > self._max:
                self._selections.popitem(last=False)
        return {"selection": sid, **selection_counts(self.atlas.table, ids)}

    def selection(self, sid: str) -> dict[str, Any]:
        """A kept selection (``KeyError`` when unknown)."""
        with self._lock:
            return self._selections[sid]

    def export(self, body: dict[str, Any]) -> dict[str, Any]:
        """Write the selection ``body["selection"]`` as ``tables/labels-<name>``; return links."""
        try:
            sel = self.selection(str(body.get("selection")))
        except KeyError:
            raise InputError(f"unknown selection {body.get('selection')!r}; select points first.") from None
        name = check_name(str(body.get("name") or "selection"))
        params = {"source": "app", **sel["geometry"], "clusters": sel["clusters"]}
        labels = save_selection(self._writable_atlas(), sel["ids"], name, params)
        return {"name": name, "n": int(len(labels)), "table": f"labels-{name}",
                "downloads": {f: f"/download/{name}.{f}" for f in ("parquet", "tsv", "star")}}

    def _writable_atlas(self) -> Any:
        """The atlas on a writable open of its store: the app serves from a read-only open and writes
        only when the user exports a selection."""
        col = self.atlas.collection
        if getattr(col, "writable", True):
            return self.atlas
        from dataclasses import replace

        from milotile.store import open_collection

        with self._lock:
            if not hasattr(self, "_writable"):
                self._writable = replace(self.atlas, collection=open_collection(
                    col.url, mode="r+", storage_options=col.storage_options))
        return self._writable

    def download(self, name: str, fmt: str) -> bytes:
        """Bytes of an exported selection in ``parquet``, ``tsv`` (MiLoPYP) or ``star`` (RELION 5)."""
        from milotile.explore.select import selection_dir

        col = self.atlas.collection
        name = check_name(name)
        labels = col.read_table(f"labels-{name}")
        if fmt == "parquet":
            buf = io.BytesIO()
            labels.to_parquet(buf, index=False)
            return buf.getvalue()
        if fmt == "tsv":
            return (selection_dir(self.atlas) / f"{name}.tsv").read_bytes()
        if fmt == "star":
            from milotile.formats import export

            with tempfile.TemporaryDirectory() as d:
                target = Path(d) / f"{name}.star"
                export(labels, "star", target, col=col)  # also writes tomograms.star beside it
                return target.read_bytes()
        raise KeyError(fmt)


def _handler(app: AtlasApp | None, review: Any = None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "milotile-atlas"

        def log_message(self, fmt: str, *args: Any) -> None:  # route to logging, not stderr
            log.debug("%s %s", self.address_string(), fmt % args)

        def _send(self, body: bytes, ctype: str, status: int = 200, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, v in (extra or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(body)

        def _json(self, obj: Any, status: int = 200) -> None:
            self._send(json.dumps(obj).encode(), "application/json", status)

        def _error(self, status: int, msg: str) -> None:
            self._json({"error": msg}, status)

        def do_GET(self) -> None:  # noqa: N802
            url = urlparse(self.path)
            p = url.path
            try:
                if review is not None and (p == "/review" or (app is None and p in ("/", "/index.html"))):
                    return self._send((STATIC / "review.html").read_bytes(), _TYPES[".html"])
                got = review.get(p) if review is not None else None
                if got is not None:
                    return self._send(*got)
                if app is None and (p.startswith("/api/") or p.startswith("/thumb/") or p.startswith("/download/")):
                    return self._error(404, "no atlas is served")
                if p in ("/", "/index.html"):
                    self._send((STATIC / "index.html").read_bytes(), _TYPES[".html"])
                elif p == "/favicon.ico":
                    self._send(b"", "image/x-icon", 204)
                elif p.startswith("/static/"):
                    f = (STATIC / p[len("/static/"):]).resolve()
                    if STATIC.resolve() not in f.parents or not f.is_file():
                        return self._error(404, "not found")
                    self._send(f.read_bytes(), _TYPES.get(f.suffix, "application/octet-stream"))
                elif p == "/api/meta":
                    self._json({**app.meta(), "review": review is not None})
                elif p == "/api/points.bin":
                    self._send(app.points(), "application/octet-stream")
                elif p == "/api/nearest":
                    q = {k: float(v[0]) for k, v in parse_qs(url.query).items()}
                    self._json(app.nearest(q["x"], q["y"], q.get("r", 0.01)))
                elif p.startswith("/thumb/") and p.endswith(".png"):
                    self._send(app.thumbnail(int(p[len("/thumb/"):-4])), "image/png")
                elif p.startswith("/api/selection/") and p.endswith(".bin"):
                    ids = app.selection(p[len("/api/selection/"):-4])["ids"]
                    self._send(np.asarray(ids, np.uint32).tobytes(), "application/octet-stream")
                elif p.startswith("/download/"):
                    name, _, fmt = p[len("/download/"):].rpartition(".")
                    ctype = {"parquet": "application/octet-stream", "tsv": "text/tab-separated-values",
                             "star": "text/plain"}.get(fmt, "application/octet-stream")
                    self._send(app.download(name, fmt), ctype,
                               extra={"Content-Disposition": f'attachment; filename="{name}.{fmt}"'})
                else:
                    self._error(404, "not found")
            except (KeyError, ValueError, IndexError) as exc:
                self._error(404, f"not found: {exc}")
            except InputError as exc:
                self._error(400, str(exc))

        def do_POST(self) -> None:  # noqa: N802
            p = urlparse(self.path).path
            try:
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                got = review.post(p, body) if review is not None else None
                if got is not None:
                    self._json(got)
                elif app is None:
                    self._error(404, "no atlas is served")
                elif p == "/api/select":
                    self._json(app.select(body))
                elif p == "/api/export":
                    self._json(app.export(body))
                else:
                    self._error(404, "not found")
            except (InputError, ValueError, TypeError) as exc:
                self._error(400, str(exc))

    return Handler


def make_server(atlas: Any, host: str = "127.0.0.1", port: int = 7000, thumb_px: int = 96,
                review: Any = None) -> ThreadingHTTPServer:
    """A ready (not yet serving) HTTP server for ``atlas`` (may be ``None`` with a ``review``,
    :class:`milotile.explore.serve.review.ReviewApp`); ``port=0`` picks a free port."""
    if atlas is None and review is None:
        raise InputError("nothing to serve: give an atlas or picks to review.")
    app = AtlasApp(atlas, thumb_px=thumb_px) if atlas is not None else None
    server = ThreadingHTTPServer((host, int(port)), _handler(app, review))
    server.daemon_threads = True
    server.app = app  # type: ignore[attr-defined]
    server.review = review  # type: ignore[attr-defined]
    return server


def serve(col: Any, key: str | None = None, *, host: str = "127.0.0.1", port: int = 7000, thumb_px: int = 96,
          review: Any = None, atlas: bool = True) -> None:
    """Serve the selection app for the atlas ``key`` of ``col`` (and the review page when ``review``
    is given; ``atlas=False``: the review page alone) until interrupted."""
    from milotile.explore.atlas import load_atlas
    from milotile.store import as_collection

    # serving the atlas only reads; an export reopens it writable (review verdicts go through their own log)
    a = load_atlas(as_collection(col, mode="r"), key) if atlas else None
    try:
        server = make_server(a, host, port, thumb_px, review=review)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port} ({exc.strerror}); choose another --port.") from None
    what = f"atlas {a.key} ({len(a)} points)" if a is not None else "review"
    page = "review" if a is None else ""
    log.info("%s: open http://%s:%d/%s  (Ctrl-C stops; from a laptop: ssh -L %d:localhost:%d HOST)",
             what, host, server.server_address[1], page, server.server_address[1], server.server_address[1])
    try:
        server.serve_forever()
    finally:
        server.server_close()
