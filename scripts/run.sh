#!/usr/bin/env bash
# Install, then run the main job: a small HF-FM federation (cloud, edges, devices as local
# processes on loopback). Extra arguments go to `hffm run`, e.g. --set method=star.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/hffm run --config configs/default.yaml "$@"   # -> runs/<run id>/ (hffm runs lists them)
