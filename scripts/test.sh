#!/usr/bin/env bash
# Create the environment if missing, then run the test suite (CPU only, small generated data).
# Usage: scripts/test.sh [pytest options]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$root/scripts/setup_env.sh"
cd "$root"
exec env -u PYTHONDONTWRITEBYTECODE MPLBACKEND=Agg "$root/.venv/bin/python" -m pytest -q "$@"
