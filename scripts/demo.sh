#!/usr/bin/env bash
# Create the environment if missing, then run the whole milotile pipeline on generated data.
# Usage: scripts/demo.sh [--out DIR] [other `milotile demo` options]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup_env.sh"
exec env -u PYTHONDONTWRITEBYTECODE "$root/.venv/bin/milotile" demo "$@"
