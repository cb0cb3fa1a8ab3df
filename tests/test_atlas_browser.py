"""The atlas selection app in a real headless Chromium (Debian's ``chromium`` + Playwright).

The test serves an atlas of generated embeddings, waits for the WebGL points, draws a box and a
lasso with the mouse, toggles a cluster off, clicks Export and checks that the labels table written
into the store holds exactly the ids inside the drawn region of the visible clusters (computed here
independently from the atlas table). Skipped, with the reason, when Chromium or Playwright is missing
(``scripts/ensure_chromium.sh`` installs Chromium; CI runs it).
"""

from __future__ import annotations

import os
import shutil
import threading

import numpy as np
import pytest
from atlas_data import write_embedding_store

from milotile.explore.atlas import atlas

CHROMIUM = os.environ.get("MILOTILE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--use-gl=swiftshader", "--enable-unsafe-swiftshader",
         "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
         "--disable-dev-shm-usage"]

pytestmark = [
    pytest.mark.client("chromium"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium; scripts/ensure_chromium.sh)"),
]


def launch(p, tmp_path):
    """A headless Chromium with a fresh profile and software WebGL."""
    ctx = p.chromium.launch_persistent_context(
        str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=FLAGS,
        viewport={"width": 1200, "height": 760},
    )
    return ctx


@pytest.mark.slow
def test_app_box_lasso_toggle_export_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from milotile.explore.serve import make_server

    col, _ = write_embedding_store(tmp_path / "s.zarr", n=3000, d=16, species=3)
    a = atlas(col, method="pca", n_clusters=3, overcluster=30, fit_sample=3000)
    t = a.table
    srv = make_server(a, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/"
    errors: list[str] = []
    try:
        with sync_api.sync_playwright() as p:
            ctx = launch(p, tmp_path)
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("window.milotile && (window.milotile.ready || window.milotile.error)", timeout=60000)
            assert page.evaluate("window.milotile.error || null") is None
            assert page.evaluate("window.milotile.n") == len(t)
            # WebGL really drew the points: the canvas is not uniform background
            shot = page.locator("#gl").screenshot()
            assert len(shot) > 5000
            ov = page.locator("#overlay").bounding_box()
            to_page = lambda sx, sy: (ov["x"] + sx, ov["y"] + sy)  # noqa: E731

            # 1. box over the middle of the map
            page.check("input[value=box]")
            w, h = ov["width"], ov["height"]
            s0, s1 = (0.25 * w, 0.2 * h), (0.75 * w, 0.8 * h)
            page.mouse.move(*to_page(*s0))
            page.mouse.down()
            page.mouse.move(*to_page(*s1), steps=8)
            page.mouse.up()
            page.wait_for_function("window.milotile.selection !== null")
            first = page.evaluate("window.milotile.selection.id")
            # 2. toggle the cluster with the most points inside the box off -> the selection is recomputed
            d0 = page.evaluate("([x, y]) => window.milotile.screenToData(x, y)", list(s0))
            d1 = page.evaluate("([x, y]) => window.milotile.screenToData(x, y)", list(s1))
            inbox = t.map_x.between(min(d0[0], d1[0]), max(d0[0], d1[0])) & t.map_y.between(min(d0[1], d1[1]), max(d0[1], d1[1]))
            assert inbox.sum() > 20
            off = int(t[inbox]["cluster"].value_counts().idxmax())
            page.uncheck(f"input[data-cluster='{off}']")
            page.wait_for_function(f"window.milotile.selection.id !== '{first}'")
            want = np.sort(t[inbox & (t.cluster != off)]["id"].to_numpy())
            assert page.evaluate("window.milotile.selection.n") == len(want)
            # 3. export writes exactly those ids into the store
            page.fill("#name", "box-sel")
            page.click("#export")
            page.wait_for_function("window.milotile.exported !== undefined")
            stored = col.read_table("labels-box-sel")
            np.testing.assert_array_equal(np.sort(stored["id"].to_numpy()), want)
            assert set(col.table_params("labels-box-sel")["clusters"]) == {int(c) for c in t["cluster"].unique()} - {off}
            assert "box" in col.table_params("labels-box-sel")
            # 4. a lasso (triangle) with the same cluster hidden
            before = page.evaluate("window.milotile.selection.id")
            page.check("input[value=lasso]")
            tri = [(0.2 * w, 0.85 * h), (0.5 * w, 0.1 * h), (0.8 * w, 0.85 * h)]
            page.mouse.move(*to_page(*tri[0]))
            page.mouse.down()
            for v in tri[1:] + tri[:1]:
                page.mouse.move(*to_page(*v), steps=6)
            page.mouse.up()
            page.wait_for_function(f"window.milotile.selection.id !== '{before}'")
            poly = np.array([page.evaluate("([x, y]) => window.milotile.screenToData(x, y)", list(v)) for v in tri])
            (x1, y1), (x2, y2), (x3, y3) = poly
            den = (y2 - y3) * (x1 - x3) + (x3 - x2) * (y1 - y3)
            al = ((y2 - y3) * (t.map_x - x3) + (x3 - x2) * (t.map_y - y3)) / den
            be = ((y3 - y1) * (t.map_x - x3) + (x1 - x3) * (t.map_y - y3)) / den
            inside = (al > 0) & (be > 0) & (1 - al - be > 0) & (t.cluster != off)
            got = page.evaluate("window.milotile.selection.n")
            assert abs(got - int(inside.sum())) <= 2  # mouse positions are rounded to whole pixels
            # 5. hover shows a thumbnail
            r = t[t.cluster != off].iloc[0]
            sx, sy = page.evaluate("([x, y]) => window.milotile.dataToScreen(x, y)", [float(r.map_x), float(r.map_y)])
            page.mouse.move(*to_page(sx, sy))
            page.wait_for_selector("#hover:not([hidden])", timeout=10000)
            assert "/thumb/" in page.get_attribute("#thumb", "src")
            if os.environ.get("MILOTILE_DOCS_SCREENSHOT"):
                page.screenshot(path=os.environ["MILOTILE_DOCS_SCREENSHOT"])
            ctx.close()
    finally:
        srv.shutdown()
        srv.server_close()
    assert not errors, errors
