"""The review page in a real headless Chromium (Debian's ``chromium`` + Playwright).

A picks table of true particles (high scores) and decoys (low scores) is served with
``make_server(None, review=ReviewApp(...))``. The test answers the queue with the keyboard from the
ground truth (``y`` / ``2`` = reject as junk / ``n``), undoes one verdict with ``u``, adds a missed
particle with a click in the slice view, reloads the page and finds every verdict again, exports,
and checks the store's verdict tables against the answers given. Skipped without Chromium or Playwright.
"""

from __future__ import annotations

import os
import threading

import pytest
from review_data import review_store
from test_atlas_browser import CHROMIUM, launch

pytestmark = [
    pytest.mark.client("chromium"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium executable (apt-get install chromium; scripts/ensure_chromium.sh)"),
]


@pytest.mark.slow
def test_review_keyboard_add_reload_export_in_chromium(tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    from milotile.explore.serve import make_server
    from milotile.explore.serve.review import ReviewApp

    col, picks, n_true = review_store(tmp_path)
    srv = make_server(None, port=0, review=ReviewApp(col, "picks", who="tester", box=12))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/review"
    errors: list[str] = []
    answers: dict[int, str] = {}
    try:
        with sync_api.sync_playwright() as p:
            ctx = launch(p, tmp_path)
            page = ctx.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(url)
            page.wait_for_function("window.review && (window.review.ready || window.review.error)", timeout=60000)
            assert page.evaluate("window.review.error") is None
            assert page.evaluate("window.review.n") == len(picks)
            # 1. answer nine picks from the truth with the keyboard
            for k in range(9):
                pick = page.evaluate("window.review.shown")
                true = pick < n_true
                key = "y" if true else ("2" if k % 2 else "n")
                answers[pick] = "accept" if true else "reject"
                before = page.evaluate("window.review.verdicts.size")
                page.keyboard.press(key)
                page.wait_for_function(f"window.review.verdicts.size === {before + 1} && window.review.shown !== {pick}")
            # 2. undo the last verdict
            page.keyboard.press("u")
            page.wait_for_function("window.review.verdicts.size === 8")
            undone = page.evaluate("window.review.shown")
            answers.pop(undone)
            # arrows move without a verdict
            page.keyboard.press("ArrowRight")
            page.wait_for_function(f"window.review.shown !== {undone}")
            # 3. add a missed particle with a click in the slice view
            page.check("#addmode")
            box = page.locator("#circles").bounding_box()
            sx, sy = 0.5 * box["width"], 0.4 * box["height"]
            want = page.evaluate("([x, y]) => window.review.toVoxel(x, y)", [sx, sy])
            z_slice = int(page.evaluate("+document.getElementById('z').value"))
            page.mouse.click(box["x"] + sx, box["y"] + sy)
            page.wait_for_function("window.review.added.length === 1")
            # the store holds the verdicts already (no export needed)
            lab, neg = col.read_table("labels-review"), col.read_table("negatives-review")
            acc = {int(r.pick) for r in lab.itertuples() if r.verdict == "accept"}
            rej = {int(r.pick) for r in neg.itertuples()}
            assert acc == {k for k, v in answers.items() if v == "accept"}
            assert rej == {k for k, v in answers.items() if v == "reject"}
            assert set(neg["reason"]) <= {"", "junk"} and (neg["reason"] == "junk").any()
            added = lab[lab.verdict == "add"]
            assert len(added) == 1 and added["z"].iloc[0] == z_slice
            assert abs(added["x"].iloc[0] - want[0]) < 0.6 and abs(added["y"].iloc[0] - want[1]) < 0.6
            assert set(lab["who"]) == {"tester"} and set(lab["run"]) == {"fake-run"}
            assert lab["when"].str.match(r"\d{4}-\d\d-\d\dT").all()
            sample_pos = page.evaluate("window.review.counts.sample")
            assert sample_pos == int(lab["sample"].sum() + neg["sample"].sum())
            # 4. reload: every verdict is back, the queue resumes at the first pick without one
            page.reload()
            page.wait_for_function("window.review && window.review.ready", timeout=60000)
            assert page.evaluate("window.review.verdicts.size") == len(answers)
            assert page.evaluate("window.review.added.length") == 1
            assert page.evaluate("window.review.shown") not in answers
            # 5. export: links to the verdict tables; the STAR download holds the accepted + added particles
            page.click("#export")
            page.wait_for_function("window.review.exported !== undefined")
            ex = page.evaluate("window.review.exported")
            assert ex["labels"]["n"] == len(lab) and ex["negatives"]["n"] == len(neg)
            star = page.request.get(page.url.replace("/review", "") + ex["labels"]["downloads"]["star"]).text()
            assert "_rlnCoordinateX" in star and star.count("tomo_00") >= len(lab)
            if os.environ.get("MILOTILE_DOCS_SCREENSHOT_REVIEW"):
                page.check("#addmode")
                page.screenshot(path=os.environ["MILOTILE_DOCS_SCREENSHOT_REVIEW"])
            ctx.close()
    finally:
        srv.shutdown()
        srv.server_close()
    assert not errors, errors
