#!/usr/bin/env bash
# Create (or reuse) the client environments used by the interoperability tests, one per client:
#   .venv-clients/<name>  from  config/clients/<name>.txt   (napari, copick)
# The clients pin versions that conflict with the project venv (copick 1.x needs zarr 2; napari is
# heavy), so each gets its own venv. An environment is rebuilt only when its requirement file
# changes (sha1 stamp). Prints "<name> <python>" per environment on stdout.
# Env vars: MILOTILE_CLIENT_ENVS (folder, default <repo>/.venv-clients), UV (uv binary),
#           PYTHON (interpreter for the venvs, default python3; must be >= 3.11).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
envs=${MILOTILE_CLIENT_ENVS:-$root/.venv-clients}
py=${PYTHON:-python3}
uv=${UV:-}
if [ -z "$uv" ]; then
  for cand in "$root/.tools/bin/uv" "$(command -v uv || true)"; do
    if [ -n "$cand" ] && [ -x "$cand" ]; then uv=$cand; break; fi
  done
fi
[ $# -gt 0 ] || set -- napari copick
mkdir -p "$envs"
for name in "$@"; do
  req="$root/config/clients/$name.txt"
  [ -f "$req" ] || { echo "[client-envs] no requirement file $req" >&2; exit 2; }
  venv="$envs/$name"
  want=$(sha1sum "$req" | cut -d' ' -f1)
  stamp="$venv/.milotile-client"
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x "$venv/bin/python" ]; then
    t0=$(date +%s)
    rm -rf "$venv"
    if [ -n "$uv" ]; then
      "$uv" venv -q -p "$py" "$venv" >&2
      "$uv" pip install -q -p "$venv/bin/python" -r "$req" >&2
    else
      "$py" -m venv "$venv" >&2
      "$venv/bin/python" -m pip install -q -r "$req" >&2
    fi
    echo "$want" > "$stamp"
    echo "[client-envs] created $venv in $(( $(date +%s) - t0 )) s" >&2
  fi
  echo "$name $venv/bin/python"
done
