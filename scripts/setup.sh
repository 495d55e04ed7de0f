#!/usr/bin/env bash
# Create .venv and install hffm with what it needs. torch is pinned to the local CPU build
# (an unpinned torch would pull gigabytes of CUDA packages); GPU images bring their own torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# pip's noise about absent index mirrors is filtered; pip's own failure still fails this script
.venv/bin/python -m pip install -q --disable-pip-version-check "torch==${HFFM_TORCH_VERSION:-2.13.0}" -e '.[test,easy-vqa,datasets,tracking]' 2>&1 \
  | { grep -v "is ignored: it is neither a file nor a directory" || true; }
.venv/bin/python -m services.rpc >/dev/null   # build the gRPC code from proto/
