#!/usr/bin/env bash
# Issue 12 "Measure": every figure side by side with its naive counterpart, on a QUIET machine, in one run.
#
#   bash benchmarks/issue12_quiet.sh             # full run: 25 min cap (budgets 6 + 10.5 + 4.5 + 4 min); est. ~16 min on 2 idle cores
#   QUICK=1 bash benchmarks/issue12_quiet.sh     # tiny sizes, checks the script (~3 min on one busy core)
#
# Steps, in order, each under its own time budget (`timeout`; a step over budget is stopped, the run goes on;
# throughput.py and predict_scaling.py rewrite their JSON after every part/size, so a stopped step keeps
# what it measured). Estimated idle durations come from the tiny runs and probes at load ~4 (niced, so
# about 0.6 of the 2 cores) scaled by ~2 for an idle machine; see /work/coord/notes/session3-issue12-measure.md.
#   a. throughput.py      fraction-of-peak table (explore train/embed, refine train/predict; fp32, bf16,
#                         channels-last), explore-train RSS at CLI defaults vs old, preprocess/mine bytes/s
#                         vs a sequential read                                   est. ~3.5 min, budget 6 min
#   b. predict_scaling.py 128x256x256 and 256x1024x1024: tiled default vs one whole-volume pass (the
#                         256x1024x1024 whole pass needs ~40 GiB: measured on a 32-slice z-slab instead),
#                         voxels/s, halo overhead, fraction of peak            est. ~7.5 min, budget 10.5 min
#   c. collection.py      20 and 200 tomograms through the whole CLI; per-tomogram cost, metadata reads
#                         and listings per tomogram; naive one call per tomogram est. ~2.5 min, budget 4.5 min
#   d. preprocess.py      `milotile preprocess` + `milotile mine` (CLI, 2 commands) on one 256x512x512
#                         tomogram vs MiLoPYP's whole-volume float64 scipy script, same run
#                                                                                est. ~2.5 min, budget 4 min
# Outputs: benchmarks/results/<name>_quiet.json and <name>_quiet.log (QUICK=1: _quicktest).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-/work/main/.venv/bin/python}"
QUICK="${QUICK:-0}"
if [[ "$QUICK" == "1" ]]; then SUFFIX="${SUFFIX:-_quicktest}"; else SUFFIX="${SUFFIX:-_quiet}"; fi
RES="$ROOT/benchmarks/results"
mkdir -p "$RES"
cd "$ROOT"

# measure the defaults: no inherited thread limits; this checkout's sources; JSON names with the suffix
unset OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS MILOTILE_TORCH_THREADS MILOTILE_CPU_BF16 \
      MILOTILE_TRAIN_MEMORY_MB MILOTILE_TILE_MVOXELS MILOTILE_SMALL_JOB_MB MILOTILE_PEAK_GFLOPS
export PYTHONPATH="$ROOT/src" MILOTILE_BENCH_SUFFIX="$SUFFIX" MPLBACKEND=Agg MILOTILE_PROGRESS=0

SUMMARY="$RES/issue12${SUFFIX}.log"
: >"$SUMMARY"
say() { echo "$(date -u +%H:%M:%S) $*" | tee -a "$SUMMARY"; }

say "issue 12 measurement ($([[ "$QUICK" == "1" ]] && echo QUICK || echo full)); $(nproc) cores; $(uptime)"
say "git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'); python $PY"
load1=$(cut -d' ' -f1 /proc/loadavg)
if awk "BEGIN{exit !($load1 > 1.0)}"; then
  say "WARNING: 1-min load average $load1 > 1.0 at the start: figures will not be idle-machine figures"
fi

# run_step NAME BUDGET_S CMD...: run with a time budget, log to <name><suffix>.log, never abort the run
run_step() {
  local name="$1" budget="$2"; shift 2
  local log="$RES/${name}${SUFFIX}.log" t0 rc
  t0=$(date +%s)
  say "start $name (budget ${budget}s; load $(cut -d' ' -f1-3 /proc/loadavg)): $*"
  set +e
  timeout -k 20 "$budget" "$@" >"$log" 2>&1
  rc=$?
  set -e
  local dt=$(( $(date +%s) - t0 ))
  if [[ $rc -eq 0 ]]; then
    say "done  $name in ${dt}s (load $(cut -d' ' -f1-3 /proc/loadavg))"
  elif [[ $rc -eq 124 || $rc -eq 137 ]]; then
    say "TIMEOUT $name after ${dt}s (budget ${budget}s): partial results only, see $log"
  else
    say "FAILED $name rc=$rc after ${dt}s: see $log"
  fi
  # the compact table each script prints at its end (or the log tail when it stopped early)
  tail -n 24 "$log" | tee -a "$SUMMARY" || true
}

if [[ "$QUICK" == "1" ]]; then
  run_step throughput 300 "$PY" benchmarks/throughput.py --quick
  run_step predict_scaling 300 "$PY" benchmarks/predict_scaling.py --quick --whole-max-gib 0.2 --slab-max-slices 8
  run_step collection 300 "$PY" benchmarks/collection.py --quick
  run_step preprocess_cli 300 "$PY" benchmarks/preprocess.py --quick --cli --workers 2 --skip-extras \
    --out preprocess_cli_quick
else
  # a. ~3.5 min idle: explore train rows at batch 128 (16-32 is per-op-latency bound), embed batch 256,
  #    refine train 16 crops of 8x64x64 / predict 16x256x256 (CLI start_filts 16); >= 3 s per row
  run_step throughput 360 "$PY" benchmarks/throughput.py --train-batch 128 --embed-batch 256 \
    --refine-batch 16 --slab-xy 256 --bank-n 256 --min-seconds 3
  # b. ~7.5 min idle: 256x1024x1024 tiled ~4-5 min (~1 M voxels/s), its 32-slice whole-pass slab ~1 min,
  #    ingest of the 1 GiB volume ~1 min; 128x256x256 (whole, tiled, old tiles) ~45 s
  run_step predict_scaling 630 "$PY" benchmarks/predict_scaling.py --sizes 128,256,256 256,1024,1024 \
    --start-filts 16 --slab-max-slices 32 --old-max-mvox 40
  # c. ~2.5 min idle: ~20-30 s of CLI start-ups per collection size + ~0.3-0.6 s per tomogram over all stages
  run_step collection 270 "$PY" benchmarks/collection.py --sizes 20,200 --naive 4
  # d. ~2.5 min idle: synth + 2 ingests ~1 min, MiLoPYP script ~20 s, milotile in-process ~15 s, CLI ~20 s
  run_step preprocess_cli 240 "$PY" benchmarks/preprocess.py --size 256,512,512 --cli --workers 2 \
    --skip-extras --out preprocess_cli
fi
say "finished; JSON: $(ls "$RES"/*"${SUFFIX}".json 2>/dev/null | tr '\n' ' ')"
