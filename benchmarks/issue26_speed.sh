#!/usr/bin/env bash
# Issue 26 items 2 and 3 on a QUIET machine, in one run: the picker's F1-versus-time curve, the pick speed
# (CLI and in-process), and the demo's time to result next to the previous default.
#
#   bash benchmarks/issue26_speed.sh                    # est. ~30 min on 2 idle cores (budgets 16 + 5 + 14 min)
#   COMPARE=/work/main bash benchmarks/issue26_speed.sh # the demo of that checkout in the same run (default)
#   SEEDS="0" bash benchmarks/issue26_speed.sh          # one seed of the curve (~half of step a)
#
# a. refine_hard.py --curve   hard preset, big species, 6 labels: one training per seed checkpointed at 6, 8, 10,
#                             12 and 20 epochs; every budget picked with TTA 1 + bf16, the 20-epoch picker also
#                             with the previous default (TTA 4, fp32) and TTA 1 fp32 / TTA 2 bf16 / TTA 4 bf16:
#                             F1 at the automatic threshold, train and pick wall + CPU seconds, voxels/s
# b. refine_pick.py --speed   `milotile refine pick` as a whole command and in-process on seed 0's store with
#                             the 20-epoch picker: checkpoint default, TTA 4 fp32, TTA 1 bf16, TTA 2 bf16
# c. time_to_result.py        `milotile demo` of this checkout and of $COMPARE: wall + CPU per stage, start-up
# Every figure comes with the load average; a WARNING is logged when the machine is not idle at the start.
# Outputs: benchmarks/results/refine_curve.json, refine_pick_speed.json, time_to_result.json, issue26_speed.log.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
SEEDS="${SEEDS:-0 1}"
COMPARE="${COMPARE:-/work/main}"
WORK="${WORK:-/tmp/issue26_speed}"
RES="$ROOT/benchmarks/results"
mkdir -p "$RES" "$WORK"
cd "$ROOT"
unset OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS MILOTILE_TORCH_THREADS MILOTILE_CPU_BF16
export MPLBACKEND=Agg

LOG="$RES/issue26_speed.log"
: >"$LOG"
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
say "issue 26 speed ($(nproc) cores; $(uptime)); git $(git rev-parse --short HEAD)"
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN{exit !($load1 > 1.0)}"; then
  say "WARNING: 1-min load average $load1 > 1.0 at the start: figures will not be idle-machine figures"
fi

step() {  # step NAME BUDGET_S CMD...: run with a time budget; never abort the run
  local name=$1 budget=$2; shift 2
  say "start $name (budget ${budget}s; load $(cut -d' ' -f1-3 /proc/loadavg))"
  if timeout "$budget" "$@" >"$WORK/$name.log" 2>&1; then say "done $name"; else say "FAILED or over budget: $name (see $WORK/$name.log)"; fi
  tail -n 20 "$WORK/$name.log" >>"$LOG"
}

# shellcheck disable=SC2086
step curve 960 "$PY" benchmarks/refine_hard.py --curve --seeds $SEEDS --species big --labels 6 --threads 2 \
  --budgets 6 8 10 12 20 --curve-picks tta1_bf16 --curve-picks-last tta4_fp32 tta1_fp32 tta2_bf16 tta4_bf16 \
  --workdir "$WORK/rh" --json "$RES/refine_curve.json"
CKPT="$WORK/rh/curve_s${SEEDS%% *}_big_6/epoch20.pt"
if [[ -f "$CKPT" ]]; then
  step pick_speed 300 "$PY" benchmarks/refine_pick.py --speed "$WORK/rh/hard_s${SEEDS%% *}/store.zarr" "$CKPT" \
    --speed-variants checkpoint,tta4_fp32,tta1_bf16,tta2_bf16 --workdir "$WORK/pick"
fi
cmp=()
if [[ -x "$COMPARE/.venv/bin/milotile" ]]; then cmp=(--compare "$COMPARE"); fi
step demo 840 "$PY" benchmarks/time_to_result.py "${cmp[@]}" --workdir "$WORK/demo"
say "finished ($(uptime))"
