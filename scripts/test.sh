#!/usr/bin/env bash
# Install, lint, then run the whole test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/system-deps.sh   # Prometheus/promtool for the metrics tests (Debian packages)
.venv/bin/ruff check .
rc=0
# two workers (pytest-xdist), each test file on one of them (its module fixtures made once): many tests wait
# on processes, deadlines and sockets, and two at a time keep both cores busy (178 % CPU through a run here):
# 23 minutes against 25-31 in one process. HFFM_TEST_WORKERS=0 runs it in one process.
.venv/bin/python -m pytest -n "${HFFM_TEST_WORKERS:-2}" --dist loadfile "$@" || rc=$?
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: failing on purpose" >&2
  exit 1
fi
exit "$rc"
