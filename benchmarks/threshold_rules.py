"""Benchmark: rules for the automatic pick threshold, re-scored on saved picker runs (issue 23).

Every run that ``benchmarks/refine_hard.py`` saves keeps all its peaks (``picks_all.parquet``, decoded at
:data:`milotile.refine.threshold.AUTO_FLOOR`), its labels and its checkpoint, so a threshold rule can be
tried without retraining. For each run this prints the F1 at the best threshold (an oracle) and, for each
rule, the F1 at the threshold the rule chooses and the gap to the best (Hungarian matching within half the
particle radius, as ``refine_hard.py``). Rules:

* ``labels`` — the library's rule, exactly as ``refine pick`` applies it
  (:func:`milotile.refine.threshold.apply_auto_threshold`): the F1 estimated from the labels' recall and the
  peak counts, label logit-scores lowered by :data:`~milotile.refine.threshold.LABEL_SHIFT`;
* ``shift_S`` — the same with the label scores lowered by ``S`` logit units;
* ``recall_lcb`` — the recall of each threshold replaced by a lower confidence bound (the 0.2 quantile of
  its Beta posterior): the labels are few, and memorised ones overstate the recall at high thresholds;
* ``particles_at_r75`` — the number of particles estimated at the highest threshold that keeps 3/4 of the
  labels, instead of the tightest bound over all thresholds keeping half;
* ``bagged`` — the estimated F1 curve averaged over 100 bootstrap resamples of the labels;
* ``break_even`` — the threshold keeping as many peaks in the labelled tomograms as particles estimated;
* ``valley`` — Otsu's split of the logit-scores of all peaks (no labels);
* ``pu`` — the previous rule (Lee & Liu's r²/N, label margin).

Example::

    python benchmarks/threshold_rules.py /tmp/q/rh/run_s*_6_defaults /tmp/q/la/run_la*_defaults \\
        --json benchmarks/results/threshold_rules.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from scipy.stats import beta

sys.path.insert(0, str(Path(__file__).resolve().parent))
from refine_hard import RESULTS, TUNE_SETTINGS, saved_run  # noqa: E402

from milotile.metrics import evaluate, pr_curve  # noqa: E402
from milotile.nn.checkpoint import load_checkpoint  # noqa: E402
from milotile.refine.threshold import (  # noqa: E402
    AUTO_FLOOR,
    LABEL_SHIFT,
    MIN_RECALL,
    apply_auto_threshold,
    label_scores,
    otsu_logit,
)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def estimated_f1(label_scores_: np.ndarray, peak_scores: np.ndarray, cand: np.ndarray, *, shift: float = LABEL_SHIFT,
                 recall_quantile: float | None = None, particles_at: float | None = None) -> tuple[np.ndarray, float]:
    """Estimated F1 at each candidate logit threshold ``cand`` and the estimated number of particles: the
    library's estimate (:func:`milotile.refine.threshold.f1_label_threshold`) with the variations of the rules."""
    zl = _logit(label_scores_) - shift
    zp = np.sort(_logit(peak_scores[peak_scores >= AUTO_FLOOR]))
    k = (zl[None, :] >= cand[:, None]).sum(axis=1)
    recall = k / max(len(zl), 1)
    above = len(zp) - np.searchsorted(zp, cand, side="left")
    ok = recall >= MIN_RECALL
    if not ok.any():
        return np.zeros(len(cand)), float("nan")
    if particles_at is None:
        n_pos = float(np.min(above[ok] / recall[ok]))
    else:
        i = np.flatnonzero(recall >= particles_at)
        i = int(i[-1]) if len(i) else int(np.flatnonzero(ok)[0])
        n_pos = float(above[i] / recall[i])
    r = recall if recall_quantile is None else beta.ppf(recall_quantile, k + 1, len(zl) - k + 1)
    return 2.0 * n_pos * r / (above + n_pos), n_pos


def rules(picks: pd.DataFrame, contract: dict) -> dict[str, float]:
    """The threshold each rule chooses for one run's peaks (one class)."""
    lab = pd.DataFrame(contract.get("train_labels") or [], columns=["tomogram", "x", "y", "z", "class"])
    ls = label_scores(picks, lab, float(contract.get("bbox", 16)) / 4.0)
    peaks = picks.loc[picks["tomogram"].isin(set(lab["tomogram"])), "score"].to_numpy(np.float64)
    cand = np.unique(_logit(peaks[peaks >= AUTO_FLOOR]))
    sig = lambda z: float(1.0 / (1.0 + np.exp(-z)))  # noqa: E731

    def argmax_rule(**kw) -> Callable[[], float]:
        return lambda: sig(cand[int(np.argmax(estimated_f1(ls, peaks, cand, **kw)[0]))])

    def bagged() -> float:
        rng = np.random.default_rng(0)
        f = np.mean([estimated_f1(ls[rng.integers(0, len(ls), len(ls))], peaks, cand)[0] for _ in range(100)], axis=0)
        return sig(cand[int(np.argmax(f))])

    def break_even() -> float:
        n_pos = estimated_f1(ls, peaks, cand)[1]
        desc = np.sort(peaks[peaks >= AUTO_FLOOR])[::-1]
        return float(desc[min(max(int(round(n_pos)), 1), len(desc)) - 1]) if np.isfinite(n_pos) else AUTO_FLOOR

    out = {"labels": lambda: float(apply_auto_threshold(picks, contract)[1]["particle"]["threshold"])}
    out.update({f"shift_{s:g}": argmax_rule(shift=s) for s in (0.0, 0.5, 1.0)})
    out.update(recall_lcb=argmax_rule(recall_quantile=0.2), particles_at_r75=argmax_rule(particles_at=0.75),
               bagged=bagged, break_even=break_even,
               valley=lambda: otsu_logit(picks["score"].to_numpy()[picks["score"].to_numpy() >= AUTO_FLOOR]),
               pu=lambda: float(apply_auto_threshold(picks, contract, rule="pu")[1]["particle"]["threshold"]))
    return {name: f() for name, f in out.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="saved run folders of refine_hard.py")
    ap.add_argument("--json", default=str(RESULTS / "threshold_rules.json"))
    args = ap.parse_args(argv)
    records = []
    for r in args.runs:
        run = Path(r)
        saved = saved_run(run)
        contract = load_checkpoint(run / ("best.pt" if (run / "best.pt").exists() else "last.pt"))["contract"]
        picks = pd.read_parquet(run / "picks_all.parquet")
        match_r = saved["radius"] / 2
        curve = pr_curve(picks, saved["true"], match_r, by="tomogram", max_thresholds=150)
        rec = {"run": run.name, "preset": "hard" if saved["setting"] is None else "lookalike", "setting": saved["setting"],
               "tune": saved["setting"] is None and saved["seed"] == 0 or saved["setting"] in TUNE_SETTINGS,
               "seed": saved["seed"], "species": saved["species"], "f1_best": round(float(curve["f1"].max()), 4)}
        for name, t in rules(picks, contract).items():
            f1 = float(evaluate(picks, saved["true"], match_r, by="tomogram", threshold=t).iloc[-1]["f1"])
            rec[f"gap_{name}"] = round(rec["f1_best"] - f1, 4)
            rec[f"threshold_{name}"] = round(t, 4)
        records.append(rec)
        print(rec["run"], rec["f1_best"], {k[4:]: v for k, v in rec.items() if k.startswith("gap_")}, flush=True)
    df = pd.DataFrame(records)
    gaps = [c for c in df if c.startswith("gap_")]
    summary = []
    for group, g in [("all", df), ("tune", df[df["tune"]]), ("report", df[~df["tune"]])]:
        summary += [{"runs": group, "rule": c[4:], "n": len(g), "gap_mean": round(float(g[c].mean()), 4),
                     "gap_worst": round(float(g[c].max()), 4), "n_gap_over_0.05": int((g[c] > 0.05).sum())} for c in gaps]
    table = pd.DataFrame(summary)
    print(table.to_string(index=False))
    out = {"benchmark": "threshold_rules", "command": " ".join(["python benchmarks/threshold_rules.py", *sys.argv[1:]]),
           "load_avg": os.getloadavg(), "records": records, "summary": summary}
    Path(args.json).write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
