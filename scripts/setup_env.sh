#!/usr/bin/env bash
# Create the project environment in .venv if it is missing (or out of date), with uv.
# torch is installed first as torch==2.13.0 from the local wheel folder when one is present,
# so that no CUDA packages are pulled; elsewhere pip's/uv's normal torch build is used.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
venv="$root/.venv"
stamp="$venv/.milotile-installed"
want=$(cat pyproject.toml | sha1sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
py=${PYTHON:-python3}
links=${PIP_FIND_LINKS:-/opt/wheels}
uvbin="$root/.tools/bin/uv"
if [ ! -x "$uvbin" ]; then
  echo "[setup] installing uv into .tools" >&2
  "$py" -m venv "$root/.tools"
  "$root/.tools/bin/python" -m pip install -q uv
fi
[ -x "$venv/bin/python" ] || "$uvbin" venv -q -p "$py" "$venv"
fl=()
if [ -d "$links" ] && ls "$links"/torch-2.13.0*.whl >/dev/null 2>&1; then
  fl=(--find-links "$links")
  echo "[setup] torch==2.13.0 from $links" >&2
  "$uvbin" pip install -q -p "$venv/bin/python" "${fl[@]}" "torch==2.13.0"
fi
echo "[setup] installing milotile and its dependencies (uv)" >&2
"$uvbin" pip install -q -p "$venv/bin/python" "${fl[@]}" -e ".[test,dashboard,ngff,tsne,cluster]"
echo "$want" > "$stamp"
