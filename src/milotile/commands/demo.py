"""``milotile demo``: the whole pipeline on generated data."""

from __future__ import annotations

import argparse
from pathlib import Path

from milotile.commands import parse_ints


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``demo``."""
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline end to end on a generated collection",
        description="Generates a synthetic collection (particles of several species, membranes, a filament, "
        "gold, junk; tilt series with CTF and noise; WBP tomograms), ingests it, preprocesses, mines "
        "candidates, extracts patch banks, trains and applies the SimSiam explorer, trains the PU picker "
        "from 30 %% of one species in one tomogram, picks every tomogram and reports F1 against the ground "
        "truth, traces the filament, and exports the picks (MiLoPYP txt, IMOD, STAR, copick, ndjson, CSV).",
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-tomograms", type=int, default=3)
    p.add_argument("--size", type=lambda s: parse_ints(s, 3, "--size"), default=(96, 192, 192), metavar="Z,Y,X")
    p.add_argument("--snr", type=float, default=0.5)
    p.add_argument("--explore-epochs", type=int, default=4)
    p.add_argument("--refine-epochs", type=int, default=8)
    p.add_argument("--segments-epochs", type=int, default=3,
                   help="point-cloud AE epochs of the segment-clustering stage (0: hand-crafted features only)")
    p.add_argument("--hard-epochs", type=int, default=12, help="epochs of the picker on the hard preset (default 12)")
    p.add_argument("--no-hard", dest="hard", action="store_false", help="skip the hard-preset picking stage")
    p.set_defaults(handler=run, needs_cluster=False)


def run(args: argparse.Namespace) -> int:
    """Handler of ``milotile demo`` (the demo starts its own cluster from the global options)."""
    from milotile.demo import DemoConfig, run_demo

    cfg = DemoConfig(out=args.out, seed=args.seed, n_tomograms=args.n_tomograms, size=tuple(args.size),
                     snr=args.snr, explore_epochs=args.explore_epochs, refine_epochs=args.refine_epochs,
                     workers=args.workers, segments_epochs=args.segments_epochs, hard=args.hard,
                     hard_epochs=args.hard_epochs)
    report = run_demo(cfg)
    print(f"milotile demo finished; outputs in {Path(args.out).resolve()}")
    for stage, facts in report.stages.items():
        shown = ", ".join(f"{k}={v}" for k, v in facts.items() if k not in ("seconds", "cpu_seconds"))
        print(f"  {stage:12s} {facts['seconds']:7.1f} s  cpu {facts.get('cpu_seconds', 0.0):7.1f} s  {shown}")
    total = report.summary()
    print(f"  {'total':12s} {total['wall_seconds']:7.1f} s  cpu {total['cpu_seconds']:7.1f} s on {total['cores']} "
          f"core(s); load average {total['load_avg_1m_start']:.1f} at the start, {total['load_avg_1m_end']:.1f} at the end")
    return 0
