#!/usr/bin/env bash
# Two `milotile refine train` commands started at once on 2 cores (issue 26: "two stages started at once"),
# each timed as the user runs it, next to one alone, with the thread governor on and off
# (MILOTILE_ADAPT_THREADS=1/0, milotile.runtime.adapt_threads). Default data: the hard preset's seed-0 store and
# 6 labels of the radius-12 species, as benchmarks/refine_hard.py leaves them under WORK.
#   bash benchmarks/two_pickers.sh [WORK=/tmp/q/rh] [OUT=benchmarks/results/contention_two_pickers.json]
set -euo pipefail
WORK=${1:-/tmp/q/rh}; OUT=${2:-$(dirname "$0")/results/contention_two_pickers.json}
ROOT=$(cd "$(dirname "$0")/.." && pwd); M=$ROOT/.venv/bin/milotile
S=$WORK/hard_s0/store.zarr; L=$WORK/run_s0_big_6_defaults/labels.parquet
T=$(mktemp -d); trap 'rm -rf "$T"' EXIT
t() { local s e; s=$(date +%s.%N); "$@" > /dev/null 2>&1; e=$(date +%s.%N); echo "$e - $s" | bc; }
load0=$(cut -d' ' -f1 /proc/loadavg)
alone=$(t "$M" refine train "$S" --labels "$L" --bbox 24 --out "$T/alone")
declare -A R
for g in 1 0; do
  MILOTILE_ADAPT_THREADS=$g t "$M" refine train "$S" --labels "$L" --bbox 24 --out "$T/a$g" > "$T/ta$g" &
  MILOTILE_ADAPT_THREADS=$g t "$M" refine train "$S" --labels "$L" --bbox 24 --out "$T/b$g" > "$T/tb$g" &
  wait
  R[$g]="$(cat "$T/ta$g") $(cat "$T/tb$g")"
done
python3 - "$OUT" "$alone" "${R[1]}" "${R[0]}" "$load0" "$(nproc)" <<'PY'
import json, sys
out, alone, on, off, load0, cpus = sys.argv[1:]
on, off = [float(v) for v in on.split()], [float(v) for v in off.split()]
res = {"benchmark": "contention_two_pickers", "cpus": int(cpus), "load_avg_1m_at_start": float(load0),
       "command": "milotile refine train STORE --labels 6-big-labels --bbox 24 (hard preset seed 0, defaults)",
       "alone_s": round(float(alone), 1), "pair_governor_on_s": [round(v, 1) for v in on],
       "pair_governor_off_s": [round(v, 1) for v in off],
       "pair_on_over_alone": round(max(on) / float(alone), 2), "pair_off_over_alone": round(max(off) / float(alone), 2),
       "fair_share_over_alone": 2.0}
open(out, "w").write(json.dumps(res, indent=1) + "\n"); print(json.dumps(res, indent=1))
PY
