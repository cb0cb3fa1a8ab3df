"""The review loop without a browser: queue, estimates, reviewed threshold, verdict tables, the server's
routes (imported picks, heatmap overlay, writes limited to the verdict tables) and ``refine retrain``."""

from __future__ import annotations

import json
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from review_data import review_store

from milotile.errors import InputError
from milotile.refine.review import (
    VerdictLog,
    apply_rethreshold,
    design_weights,
    estimate,
    rescored_weights,
    rethreshold,
    review_order,
    reviewed_threshold,
    round_labels,
    sample_threshold,
    wilson_interval,
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return review_store(tmp_path_factory.mktemp("review"))


# ------------------------------------------------------------------------------------ statistics
def test_wilson_interval():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 3), round(hi, 3)) == (0.49, 0.943)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # never a zero-width interval at 0/n
    assert wilson_interval(50, 100, z=1.0)[1] - wilson_interval(50, 100, z=1.0)[0] < wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0]


def test_review_order_interleaves_a_uniform_sample():
    rng = np.random.default_rng(1)
    s = rng.uniform(0, 1, 3000)
    order, sample = review_order(s, 0.5, sample_every=3, seed=4)
    assert sorted(order.tolist()) == list(range(len(s)))  # every pick once
    assert sample.tolist() == [(i + 1) % 3 == 0 for i in range(len(s))]
    near = order[~sample][:50]
    assert np.abs(s[near] - 0.5).max() < 0.02  # informative picks: nearest the threshold first
    first = order[sample][:300]  # the sample spans all scores, 3/4 of it from the picks kept at the threshold
    assert s[first].min() < 0.05 and s[first].max() > 0.95
    assert abs((s[first] >= 0.5).mean() - 0.75) < 0.01
    again, _ = review_order(s, 0.5, sample_every=3, seed=4)
    np.testing.assert_array_equal(order, again)  # a reloaded page gets the same queue
    with pytest.raises(InputError):
        review_order(s, 0.5, sample_every=0)


def test_sample_estimate_is_unbiased_and_covered():
    rng = np.random.default_rng(2)
    s = rng.beta(0.7, 0.7, 20000)
    truth = rng.uniform(size=len(s)) < s  # a pick is a particle with probability = its score
    t = 0.6
    true_p = truth[s >= t].mean()
    true_r = (truth & (s >= t)).sum() / truth.sum()
    n_strata = np.array([(s < t).sum(), (s >= t).sum()])
    hits_p = hits_r = 0
    errs = []
    for seed in range(40):
        order, sample = review_order(s, t, seed=seed)
        rows, smp = order[:450], sample[:450]  # 450 verdicts, 150 of them the random sample
        stratum = (s[rows] >= t).astype(int)
        w = design_weights(stratum, n_strata[stratum], smp)
        e = estimate(s[rows], truth[rows], t, weights=w)
        errs.append(e["precision"] - true_p)
        hits_p += e["precision_ci"][0] <= true_p <= e["precision_ci"][1]
        hits_r += e["recall_ci"][0] <= true_r <= e["recall_ci"][1]
    assert abs(np.mean(errs)) < 0.02  # unbiased
    assert np.mean(np.abs(errs)) < 0.06
    assert hits_p >= 34 and hits_r >= 34  # ~95 % intervals
    # unweighted, the same verdicts are biased: the informative ones all lie near the threshold
    assert abs(estimate(s[rows], truth[rows], t)["precision"] - true_p) > 0.1


def test_reviewed_threshold():
    rng = np.random.default_rng(3)
    good, bad = rng.uniform(0.6, 1.0, 30), rng.uniform(0.0, 0.4, 30)
    s = np.r_[good, bad]
    v = np.r_[np.ones(30, bool), np.zeros(30, bool)]
    r = reviewed_threshold(s, v)
    assert bad.max() < r["threshold"] < good.min()
    assert r["precision"] == 1.0 and r["recall"] == 1.0 and r["rule"] == "f1"
    # mixed scores: a precision target moves the threshold up
    s2 = np.r_[s, rng.uniform(0.5, 0.7, 20)]
    v2 = np.r_[v, np.zeros(20, bool)]
    f1 = reviewed_threshold(s2, v2)
    hp = reviewed_threshold(s2, v2, target_precision=0.99)
    assert hp["threshold"] >= f1["threshold"] and hp["precision"] >= 0.99
    with pytest.raises(InputError, match="at least 10"):
        reviewed_threshold(s[:5], v[:5])
    with pytest.raises(InputError):
        reviewed_threshold(bad, np.zeros(30, bool))  # nothing accepted


def _review_all(col, picks, n_true, name, upto, start=0, run="fake-run"):
    """The simulated reviewer judges queue positions ``start..upto-1`` of ``tables/picks`` (threshold 0.4)."""
    log = VerdictLog(col, name, who="sim")
    sc = picks["score"].to_numpy()
    order, sample = review_order(sc, 0.4, seed=1)
    n_strata = [int((sc < 0.4).sum()), int((sc >= 0.4).sum())]
    for pos in range(start, upto):
        i = int(order[pos])
        st = int(sc[i] >= 0.4)
        log.add("accept" if i < n_true else "reject", tomogram=picks.tomogram[i], x=picks.x[i], y=picks.y[i],
                z=picks.z[i], pick=i, picks="picks", run=run, score=sc[i], sample=bool(sample[pos]), stratum=st,
                stratum_n=n_strata[st])
    return log


def test_rethreshold_writes_the_reviewed_picks_its_verdicts_choose(tmp_path, capsys):
    """The round without training: the reviewed table at the threshold its own verdicts choose, written to another
    table; refused with too few verdicts, over the reviewed table, or when the table is not the one reviewed."""
    col, picks, n_true = review_store(tmp_path)
    sc = picks["score"].to_numpy()
    log = _review_all(col, picks, n_true, "rt", 9)
    with pytest.raises(InputError, match=r"'picks' is not re-thresholded: 9 reviewed picks \(\d+ accepted\): review "
                                         "at least 10 picks"):
        rethreshold(col, log.frame())
    with pytest.raises(InputError, match="review at least"):
        apply_rethreshold(col, "rt")
    assert not col.has_table("picks-reviewed")
    log = _review_all(col, picks, n_true, "rt", len(picks), start=9)
    res = apply_rethreshold(col, "rt")
    assert res["table"] == "picks" and res["run"] == "fake-run" and len(res["candidates"]) == len(picks)
    out = col.read_table("picks-reviewed")
    assert len(out) == int((sc >= res["threshold"]).sum()) and (out["score"] >= res["threshold"]).all()
    params = col.table_params("picks-reviewed")
    assert params["source"] == "picks" and params["threshold"] == pytest.approx(res["threshold"])
    # every pick judged: the estimate is the truth of the kept rows, and the threshold the F1 optimum
    true_kept = len(out[["x", "y", "z"]].merge(picks.iloc[:n_true][["x", "y", "z"]]))
    assert res["precision"] == pytest.approx(true_kept / len(out))
    f1 = [2 * ((sc >= t) & (np.arange(len(sc)) < n_true)).sum() / ((sc >= t).sum() + n_true) for t in np.unique(sc)]
    assert res["f1"] == pytest.approx(max(f1))
    from milotile.cli import main

    assert main(["refine", "rethreshold", str(col.path), "--name", "rt", "--table", "picks-cli"]) == 0
    assert "picks of picks at threshold" in capsys.readouterr().out
    assert col.read_table("picks-cli").equals(out)
    before = col.read_table("picks")
    with pytest.raises(InputError, match="reviewed table"):
        apply_rethreshold(col, "rt", table="picks")
    assert col.read_table("picks").equals(before)  # nothing written
    # the reviewed table written again by another run: its old verdicts are not its verdicts
    col.write_table("picks", picks.iloc[::-1].reset_index(drop=True), params={"threshold": 0.4, "run": "other-run"})
    with pytest.raises(InputError, match=rf"\({len(picks)} more were made on an earlier table of that name\): 0 reviewed"):
        rethreshold(col, log.frame())
    # ... and by the same run with other rows: refused, not re-thresholded on the wrong picks
    col.write_table("picks", picks.iloc[::-1].reset_index(drop=True), params={"threshold": 0.4, "run": "fake-run"})
    with pytest.raises(InputError, match="not the ones reviewed"):
        rethreshold(col, log.frame())


def test_a_verdict_replaces_only_the_same_pick_of_the_same_run(store):
    """``refine retrain`` writes ``picks`` again: a verdict on row 3 of the new table keeps the one on row 3 of the
    old table."""
    col, _, _ = store
    log = VerdictLog(col, "runs", who="me")
    log.add("accept", tomogram="tomo_000", x=1, y=2, z=3, pick=3, picks="picks", run="r0")
    log.add("reject", tomogram="tomo_001", x=9, y=9, z=9, pick=3, picks="picks", run="r0-r1")
    assert VerdictLog(col, "runs").frame()["run"].tolist() == ["r0", "r0-r1"]
    log.add("reject", tomogram="tomo_000", x=1, y=2, z=3, pick=3, picks="picks", run="r0")  # changed mind
    assert sorted(VerdictLog(col, "runs").frame()["verdict"]) == ["reject", "reject"]


# ------------------------------------------------------------------------------------ verdicts
def test_verdict_log_persists_replaces_and_undoes(store):
    col, picks, _ = store
    log = VerdictLog(col, "unit", who="me")
    a = log.add("accept", tomogram="tomo_000", x=1, y=2, z=3, pick=0, picks="picks", run="r0", score=0.9, sample=True)
    log.add("reject", tomogram="tomo_001", x=4, y=5, z=6, reason="gold", pick=1, picks="picks", run="r0")
    assert len(col.read_table("labels-unit")) == 1 and col.read_table("negatives-unit")["reason"].tolist() == ["gold"]
    log.add("reject", tomogram="tomo_000", x=1, y=2, z=3, reason="junk", pick=0, picks="picks", run="r0")  # changed mind
    assert len(col.read_table("labels-unit")) == 0 and len(col.read_table("negatives-unit")) == 2
    again = VerdictLog(col, "unit")
    assert again.frame()["verdict"].tolist() == ["reject", "reject"] and set(again.frame()["who"]) == {"me"}
    gone = again.undo()
    assert gone["pick"] == 0 and len(col.read_table("negatives-unit")) == 1
    assert log.undo(a["vid"]) is None  # a replaced verdict cannot be undone twice
    with pytest.raises(InputError, match="reason"):
        log.add("reject", tomogram="tomo_000", x=1, y=2, z=3, reason="ugly")
    with pytest.raises(InputError, match="not in"):
        log.add("accept", tomogram="nope", x=1, y=2, z=3)
    with pytest.raises(InputError, match="review name"):
        VerdictLog(col, "a/b")


def test_round_labels_count_each_place_once_across_rounds():
    import pandas as pd

    def verdicts(rows):
        return pd.DataFrame([{"tomogram": t, "x": x, "y": 5.0, "z": 6.0, "verdict": v, "sample": s}
                             for t, x, v, s in rows])

    first = verdicts([("a", 1.0, "accept", False), ("a", 2.0, "reject", False), ("b", 3.0, "accept", True),
                      ("b", 4.0, "add", False)])
    contract = {"classes": ["ribo"], "train_labels": [["a", 9.0, 5.0, 6.0, "ribo"]], "train_negatives": []}
    lab, neg = round_labels(contract, first)
    assert sorted(lab["x"]) == [1.0, 4.0, 9.0] and set(lab["class"]) == {"ribo"}  # the sample pick is held out
    assert neg["x"].tolist() == [2.0]
    # round 2 under the same review name: the first round's verdicts are in the log and in the contract
    contract2 = {"classes": ["ribo"], "train_labels": lab.values.tolist(), "train_negatives": neg.values.tolist()}
    second = pd.concat([first, verdicts([("a", 7.0, "accept", False), ("b", 8.0, "reject", False)])])
    lab2, neg2 = round_labels(contract2, second)
    assert sorted(lab2["x"]) == [1.0, 4.0, 7.0, 9.0] and sorted(neg2["x"]) == [2.0, 8.0]
    # a previous label the reviewer now rejects is a negative only
    lab3, neg3 = round_labels(contract2, verdicts([("a", 9.0, "reject", False)]))
    assert 9.0 not in lab3["x"].tolist() and 9.0 in neg3["x"].tolist()
    assert len(round_labels(contract2, second, train_on_sample=True)[0]) == 5


def test_sample_threshold_of_a_retrained_picker_weighs_by_its_own_candidates():
    import pandas as pd

    # the new picker: 30 particles scored 0.5-0.9, 200 junk peaks at 0.05-0.2, one junk peak at 0.6
    rng = np.random.default_rng(0)
    sc = np.concatenate([np.linspace(0.5, 0.9, 30), rng.uniform(0.05, 0.2, 200), [0.6]])
    cands = pd.DataFrame({"tomogram": "t", "x": np.arange(len(sc)) * 10.0, "y": 0.0, "z": 0.0, "score": sc})
    # the reviewed sample of the previous picker: 12 particles from its kept stratum (weight ~1), and from its
    # low stratum of 3000 candidates 5 junk picks, one of which the new picker now scores 0.6
    rows = [(10.0 * i, "accept", 1, 14) for i in range(0, 30, 3)] + [(10.0 * 230, "reject", 0, 3000)]
    rows += [(10.0 * (30 + i), "reject", 0, 3000) for i in range(4)] + [(10.0 * 1, "accept", 1, 14), (20.0, "accept", 1, 14)]
    ver = pd.DataFrame({"tomogram": "t", "x": [r[0] for r in rows], "y": 0.0, "z": 0.0, "verdict": [r[1] for r in rows],
                        "sample": True, "stratum": [r[2] for r in rows], "stratum_n": [r[3] for r in rows], "picks": "p"})
    design = sample_threshold(cands, ver, 1.0, weighting="design")
    post = sample_threshold(cands, ver, 1.0)
    # the design weights let the one junk pick stand for 600 junk candidates above 0.6: the threshold jumps over it
    assert design["threshold"] > 0.6
    # weighted by the new candidates' counts, the threshold keeps the particles below 0.6 and the junk out
    assert 0.2 < post["threshold"] <= 0.5 and post["weighting"] == "rescored"
    true_p = (cands["score"].iloc[:30] >= post["threshold"]).sum() / (cands["score"] >= post["threshold"]).sum()
    assert abs(post["precision"] - true_p) < 0.1
    assert sample_threshold(cands, ver.iloc[:5], 1.0) is None  # fewer than MIN_SAMPLE verdicts
    # a sample of 3 accepted particles and 11 rejected junk peaks: a precision curve from three particles
    # does not choose the threshold (the caller falls back to the automatic one); with 6 accepted it does
    def sample(n_acc: int) -> pd.DataFrame:
        xs = [10.0 * i for i in range(0, 3 * n_acc, 3)] + [10.0 * (30 + 15 * j) for j in range(11)]
        return pd.DataFrame({"tomogram": "t", "x": xs, "y": 0.0, "z": 0.0, "verdict": ["accept"] * n_acc + ["reject"] * 11,
                             "sample": True, "stratum": 0, "stratum_n": 100, "picks": "p"})

    assert sample_threshold(cands, sample(3), 1.0) is None
    assert sample_threshold(cands, sample(6), 1.0) is not None
    with pytest.raises(InputError, match="5 of them accepted"):
        reviewed_threshold(np.linspace(0.1, 0.9, 12), np.arange(12) >= 9)
    w = rescored_weights([0.9, 0.8, 0.0], [0.9, 0.85, 0.8, 0.1], min_per_bin=5)
    assert w.tolist() == [2.0, 2.0, 2.0]  # one bin: 4 candidates for 2 proposed sample picks


# ------------------------------------------------------------------------------------ server
def _files(root: Path) -> dict[str, float]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_server_routes_imported_star_heatmap_and_writes_only_verdicts(store, tmp_path):
    from milotile.explore.serve import make_server
    from milotile.explore.serve.review import ReviewApp
    from milotile.formats import export

    col, picks, n_true = store
    star = tmp_path / "picks.star"
    export(picks.assign(**{"class": "particle"}), "star", star, col=col)  # picks from other software
    # a heatmap for run "fake-run" with one hot blob at level-0 (x, y, z) = (48, 24, 16) in tomo_000
    grp = col.zarr_group.require_group("derived/heatmaps/fake-run/tomo_000")
    hm = np.zeros((1, 16, 48, 48), np.float32)
    hm[0, 8, 12, 24] = 1.0  # model grid: 2x binned, offset 0.5 voxel
    grp.create_array("0", data=hm)
    vs = col["tomo_000"].voxel_size
    grp.attrs["ome"] = {"multiscales": [{"datasets": [{"path": "0", "coordinateTransformations": [
        {"type": "scale", "scale": [1.0, 2 * vs, 2 * vs, 2 * vs]},
        {"type": "translation", "translation": [0.0, 0.5 * vs, 0.5 * vs, 0.5 * vs]}]}]}]}
    root = Path(col.path)
    before = _files(root)

    app = ReviewApp(col, str(star), name="imported", threshold=0.4)
    assert app.info["table"] == "picks.star" and len(app.picks) == len(picks)
    srv = make_server(None, port=0, review=app)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    u = f"http://127.0.0.1:{srv.server_address[1]}"

    def get(path):
        return urllib.request.urlopen(u + path).read()

    def post(path, body):
        req = urllib.request.Request(u + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req).read())

    try:
        assert b"review.js" in get("/")  # no atlas: / is the review page
        meta = json.loads(get("/api/review/meta"))
        assert meta["n"] == len(picks) and meta["box"] == 32.0 and meta["tables"]["labels"] == "labels-imported"
        q = json.loads(get("/api/review/queue"))
        assert sorted(q["order"]) == list(range(len(picks)))
        from PIL import Image

        im = Image.open(__import__("io").BytesIO(get(f"/review/thumb/{q['order'][0]}.png")))
        assert im.size == (3 * 128 + 4, 128)  # xy | xz | yz
        assert np.asarray(im).std() > 5
        sl = Image.open(__import__("io").BytesIO(get("/api/review/slice/0/16.png")))
        assert sl.size == (96, 96)
        # the heatmap overlay is on the slice's grid, hot where the blob is (run from the picks' table params)
        app.info["run"] = "fake-run"
        heat = np.asarray(Image.open(__import__("io").BytesIO(get("/api/review/heatmap/0/16.png"))))
        assert heat.shape == (96, 96, 4)
        yy, xx = np.unravel_index(np.argmax(heat[..., 3]), heat.shape[:2])
        assert abs(yy - 24.5) <= 1 and abs(xx - 48.5) <= 1
        with pytest.raises(urllib.error.HTTPError):
            get("/api/review/heatmap/1/16.png")  # no heatmap for tomo_001
        for pos in range(12):
            i = q["order"][pos]
            r = post("/api/review/verdict", {"pick": i, "verdict": "accept" if i < n_true else "reject"})
        assert r["estimate"]["n_sample"] == 4 and r["estimate"]["n_reviewed"] == 12
        lab = col.read_table("labels-imported")
        assert set(lab["stratum"]) <= {0, 1} and (lab["stratum_n"] > 0).all()
        post("/api/review/add", {"tomogram": "tomo_001", "x": 10, "y": 11, "z": 12})
        with pytest.raises(urllib.error.HTTPError):
            post("/api/review/add", {"tomogram": "tomo_001", "x": 500, "y": 11, "z": 12})
        lab = col.read_table("labels-imported")
        assert set(lab["picks"]) == {"picks.star"} and (lab["verdict"] == "add").sum() == 1
    finally:
        srv.shutdown()
        srv.server_close()
    after = _files(root)
    changed = {k for k in after if before.get(k) != after[k]} | (set(before) - set(after))
    assert changed == {"tables/labels-imported.parquet", "tables/negatives-imported.parquet"}


# ------------------------------------------------------------------------------------ next round
@pytest.mark.slow
def test_retrain_uses_verdicts_and_the_sample(tmp_path):
    import milotile as mt
    from milotile.refine.review import retrain

    col, picks, n_true = review_store(tmp_path)
    gt = picks.iloc[:n_true]
    tiny = dict(bbox=12, arch_config={"start_filts": 4, "stem_ch": 4, "feat_dim": 8}, crop=(4, 32, 32), batch_size=2,
                seed=3, device="cpu", max_pos=32, n_unlabeled=32, repeats=1)
    first = mt.refine.train(col, gt[gt.tomogram == "tomo_000"].iloc[:4], epochs=1, out=tmp_path / "run0", **tiny)
    col.write_table("picks", picks, params={"threshold": 0.4, "run": "run0", "checkpoint": str(first.path)})
    log = VerdictLog(col, "review", who="sim")
    order, sample = review_order(picks["score"], 0.4, seed=0)
    n_strata = [int((picks["score"] < 0.4).sum()), int((picks["score"] >= 0.4).sum())]
    for pos in range(36):
        i = int(order[pos])
        r = picks.iloc[i]
        st = int(r.score >= 0.4)
        log.add("accept" if i < n_true else "reject", tomogram=r.tomogram, x=r.x, y=r.y, z=r.z, pick=i,
                picks="picks", run="run0", score=r.score, sample=bool(sample[pos]), stratum=st, stratum_n=n_strata[st],
                reason="" if i < n_true else "junk")
    res = retrain(col, tmp_path / "run0", epochs=1, floor=0.01)
    new = mt.refine.Picker.load(res["run"])
    n_train = int((~sample[:36]).sum())
    n_acc = sum(int(order[p]) < n_true for p in range(36) if not sample[p])
    # sample verdicts held out; an accepted pick on one of the 4 first labels' places counts once
    first_rows = set(gt.index[gt.tomogram == "tomo_000"][:4])
    accepted = {int(order[p]) for p in range(36) if not sample[p] and int(order[p]) < n_true}
    n_lab = len(first_rows | accepted)
    assert len(new.contract["train_labels"]) == n_lab
    assert len(new.contract["train_negatives"]) == n_train - n_acc
    assert new.contract["init_from"].endswith("best.pt") or new.contract["init_from"].endswith("last.pt")
    assert res["estimate"] is not None and res["estimate"]["n_sample"] == 12
    assert col.table_params("picks")["threshold"] == pytest.approx(res["threshold"])
    assert (col.read_table("picks")["score"] >= res["threshold"]).all()
    assert len(col.read_table("picks-all")) >= len(col.read_table("picks"))
    # the reviewed picks without training, for comparison (the table was read before retrain wrote it again)
    assert res["previous"]["table"] == "picks" and 0 < res["previous"]["threshold"] < 1
    assert set(res["previous"]["estimate"]) >= {"precision", "recall", "f1"}
    # a second round under the same review name: the first round's verdicts are not counted twice
    again = retrain(col, res["run"], epochs=1, floor=0.01, table=None, write_heatmaps=False)
    assert again["n_labels"] == n_lab and again["n_negatives"] == n_train - n_acc
