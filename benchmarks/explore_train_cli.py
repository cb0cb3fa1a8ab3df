"""Benchmark: ``milotile explore train`` as a whole CLI command against a plain torch loop (issue 26, item 3).

Each variant is one command, timed from launch to exit (interpreter start-up, imports, reading the patch
bank, training, writing the checkpoint), on the same generated bank of ``--bank-n`` patches of ``--bbox``
pixels, for the same number of epochs. Reported: patches per second over the whole command and the ratio to
each plain loop, with peak RSS and the load average before each run.

* **cli** — ``milotile explore train STORE --epochs E --device cpu`` at its defaults (CPU trunk widths
  32,64,128, batched augmentation on tensors, bf16 autocast where the CPU has native bf16, the automatic
  batch size, the runtime thread budget).
* **plain, MiLoPYP's model** — what a user would otherwise run: a single-process torch loop over the same
  patches read into memory, MiLoPYP's trunk widths (64,128,256), fp32, batch 128, torch's default threads,
  views augmented per patch in numpy (random flips, 90° rotations, Gaussian noise). The augmentation is far
  cheaper than MiLoPYP's PIL pipeline, so the plain loop is favoured, not handicapped.
* **plain, the CLI's model** — the same loop with the CLI's widths (32,64,128), fp32: what the pipeline
  (batched augmentation, bf16, batch size, threads) adds over a plain loop of the same network.

    python benchmarks/explore_train_cli.py                 # ~6 min on 2 quiet cores
    python benchmarks/explore_train_cli.py --quick         # checks the script (~1 min)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import run_measured, write_results  # noqa: E402

log = logging.getLogger("bench.explore_train_cli")
SRC = Path(__file__).resolve().parents[1] / "src"

PLAIN = r"""
import sys, time
import numpy as np, torch, zarr
from milotile.explore.model import SimSiam, simsiam_loss

store, epochs, batch, widths = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), tuple(map(int, sys.argv[4].split(",")))
x = np.asarray(zarr.open_group(store, mode="r")["patches"]["bank"]["data"][:], np.float32)[:, 0, 0]  # (n, b, b)
rng = np.random.default_rng(0)
torch.manual_seed(0)
model = SimSiam("3d", widths=widths)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)

def view(p):
    if rng.random() < 0.5:
        p = p[:, ::-1]
    p = np.rot90(p, int(rng.integers(4)))
    return (p + rng.normal(0, 0.1, p.shape)).astype(np.float32)

seen = 0
t0 = time.perf_counter()
for epoch in range(epochs):
    order = rng.permutation(len(x))
    for s in range(0, len(x) - batch + 1, batch):
        idx = order[s:s + batch]
        v1 = torch.from_numpy(np.stack([view(x[i]) for i in idx]))[:, None]
        v2 = torch.from_numpy(np.stack([view(x[i]) for i in idx]))[:, None]
        p1, p2, z1, z2 = model(v1, v2)
        loss = simsiam_loss(p1, p2, z1, z2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(idx)
torch.save(model.state_dict(), sys.argv[5])
print("trained", seen, time.perf_counter() - t0)
"""


def run(name: str, cmd: list[str], env: dict, patches: int) -> dict:
    load = [round(v, 2) for v in os.getloadavg()]
    wall, rss, out = run_measured(cmd, env=env)
    row = {"name": name, "wall_s": round(wall, 1), "peak_rss_mib": round(rss / 2**20), "patches": patches,
           "patches_per_s_whole_command": round(patches / wall, 1), "load_avg_before": load}
    if out.startswith("trained") or "\ntrained" in out:
        seen, loop_s = out.split("trained")[-1].split()[:2]
        row["patches"] = int(seen)
        row["patches_per_s_whole_command"] = round(int(seen) / wall, 1)
        row["patches_per_s_loop_only"] = round(int(seen) / float(loop_s), 1)
    log.info("%s: %s", name, json.dumps(row))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bank-n", type=int, default=2048)
    ap.add_argument("--bbox", type=int, default=36)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--work", default=None)
    ap.add_argument("--out", default="explore_train_cli")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if a.quick:
        a.bank_n, a.epochs = 256, 1
    from throughput import write_bank

    work = Path(a.work or tempfile.mkdtemp(prefix="explore_train_cli_"))
    work.mkdir(parents=True, exist_ok=True)
    store = work / "bank.zarr"
    shutil.rmtree(store, ignore_errors=True)
    write_bank(store, a.bank_n, a.bbox)
    env = {"PYTHONPATH": str(SRC), "MILOTILE_PROGRESS": "0"}
    py = sys.executable
    rows = []
    out = work / "run-cli"
    shutil.rmtree(out, ignore_errors=True)
    rows.append(run("cli: milotile explore train (defaults)",
                    [py, "-m", "milotile.cli", "-q", "explore", "train", str(store), "--epochs", str(a.epochs),
                     "--device", "cpu", "--out", str(out)], env, a.bank_n * a.epochs))
    opts = json.loads((out / "options.json").read_text())
    rows[-1]["recipe"] = {k: opts.get(k) for k in ("batch_size", "amp")} | {"widths": opts["config"].get("widths")}
    for name, widths in (("plain torch loop, MiLoPYP's widths 64,128,256, fp32, batch 128", "64,128,256"),
                         ("plain torch loop, the CLI's widths 32,64,128, fp32, batch 128", "32,64,128")):
        rows.append(run(name, [py, "-c", PLAIN, str(store), str(a.epochs), "128", widths, str(work / "plain.pt")],
                        env, a.bank_n * a.epochs))
    cli = rows[0]["patches_per_s_whole_command"]
    ratios = {r["name"]: round(cli / r["patches_per_s_whole_command"], 2) for r in rows[1:]}
    for k, v in ratios.items():
        log.info("cli / %s = %.2f", k, v)
    path = write_results(a.out, {"command": " ".join(sys.argv),
                                 "bank_n": a.bank_n, "bbox": a.bbox, "epochs": a.epochs, "rows": rows,
                                 "cli_over_plain": ratios, "load_avg_at_end": [round(v, 2) for v in os.getloadavg()]})
    print("wrote", path)


if __name__ == "__main__":
    main()
