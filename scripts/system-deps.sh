#!/usr/bin/env bash
# Debian packages the tests use, installed when missing and we can (root + apt-get); otherwise the
# tests that need them skip with a reason:
#   prometheus (prometheus + promtool)        metrics and dashboard tests
#   docker.io, docker-compose, debootstrap    compose testbed, images built offline
#   kubectl                                   Kubernetes manifests (kustomize)
set -uo pipefail
declare -A want=([prometheus]=promtool [docker.io]=dockerd [docker-compose]=docker-compose
                 [debootstrap]=debootstrap [kubectl]=kubectl)
need=()
for pkg in "${!want[@]}"; do
  command -v "${want[$pkg]}" >/dev/null || need+=("$pkg")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null; then
  echo "system-deps: cannot install ${need[*]} (need root and apt-get); dependent tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# Packages must not start services (Debian's prometheus would start its own; hffm starts its own):
# policy-rc.d's "101" tells the packages' scripts not to, for this install only. No process running
# on the machine is touched.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
fi
apt-get update -qq >/dev/null 2>&1 || true
for pkg in "${need[@]}"; do  # one at a time: one unavailable package must not block the others
  apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null 2>&1 \
    || echo "system-deps: apt-get install $pkg failed; the tests that need it will skip" >&2
done
[ "$made_policy" = 1 ] && rm -f "$policy"
exit 0
