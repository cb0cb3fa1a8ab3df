#!/usr/bin/env bash
# The pipeline's GPU paths on one GPU in under 8 minutes, with figures (issue 26, item 5):
# explore train + embed, refine train + pick, tiled prediction of a 256x1024x1024 volume, AMP on and
# off, two Dask GPU workers when the machine has two GPUs. Writes gpu.json to $OUT (when set) or to
# benchmarks/results/. Without CUDA, or with --cpu-smoke, the same phases run on the CPU at small sizes.
#
#   benchmarks/gpu.sh                 # GPU machine
#   benchmarks/gpu.sh --cpu-smoke     # proves the script on a CPU-only machine
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py="$root/.venv/bin/python"
[ -x "$py" ] || py=$(command -v python3)
if ! "$py" -c "import milotile" 2>/dev/null; then
    echo "gpu.sh: milotile is not importable by $py; run scripts/setup_env.sh first" >&2
    exit 2
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,utilization.gpu --format=csv || true
export MILOTILE_PROGRESS=0
limit=${GPU_BENCH_TIMEOUT:-480}  # 8 minutes on a GPU; a CPU smoke run on a shared machine may need longer
case " $* " in *" --cpu-smoke "*) limit=${GPU_BENCH_TIMEOUT:-3600} ;; esac
exec timeout "$limit" "$py" "$root/benchmarks/gpu.py" "$@"
