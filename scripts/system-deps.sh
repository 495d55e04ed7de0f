#!/usr/bin/env bash
# Debian packages the tests use: Prometheus and promtool (the metrics/dashboard tests).
# Installed when missing and we can (root + apt-get); otherwise those tests skip with a reason.
set -uo pipefail
need=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || need+=(prometheus)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: cannot install ${need[*]} (need root and apt-get); dependent tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null 2>&1 || true
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1 \
  || echo "system-deps: apt-get install ${need[*]} failed; dependent tests will skip" >&2
# Debian's package may start its own service where an init system runs; hffm starts its own.
pkill -x prometheus 2>/dev/null || true
exit 0
