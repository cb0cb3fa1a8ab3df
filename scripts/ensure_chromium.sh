#!/usr/bin/env bash
# Install Debian's chromium for the atlas app's browser test when it is missing (root + apt only).
# Measured on the dev machine: apt-get install -y chromium ~54 s (+ apt-get update). Never fails the
# caller: without chromium the browser test skips and says why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "[chromium] not installed and cannot apt-get here; the browser test will skip" >&2
  exit 0
fi
echo "[chromium] installing Debian's chromium for the browser test" >&2
start=$(date +%s)
if DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null 2>&1 \
   && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; then
  echo "[chromium] installed in $(( $(date +%s) - start )) s" >&2
else
  echo "[chromium] apt-get install chromium failed; the browser test will skip" >&2
fi
exit 0
