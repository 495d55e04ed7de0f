#!/usr/bin/env bash
# Wheels for the image, prepared on the host so the image builds with no network inside the build.
# Pinned to what .venv resolved (build/wheels/requirements.txt); torch is the local CPU build here
# (override TORCH_SPEC for a GPU image, e.g. TORCH_SPEC=torch==2.13.0 with a CUDA index).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/wheels
PY=.venv/bin/python
mkdir -p "$OUT"
# hffm's runtime dependencies, pinned to the versions installed in .venv
$PY - <<'PY' > "$OUT/requirements.txt.new"
import importlib.metadata as md, re
reqs = md.requires("hffm") or []
# the runtime plus the easy-vqa extra (a small wheel: the image runs data.source=easy-vqa offline)
names = sorted({re.split(r"[ ;<>=!\[]", r)[0] for r in reqs if "extra ==" not in r or '"easy-vqa"' in r})
for n in names:
    print(f"{n}=={md.version(n)}")
PY
# ... and everything they pull in, pinned to the same environment
$PY -m pip freeze --exclude-editable 2>/dev/null | grep -vE "^(pytest|pytest-timeout|ruff|iniconfig|pluggy|kubernetes-validate)=" \
  > "$OUT/constraints.txt"
if [ -f "$OUT/requirements.txt" ] && cmp -s "$OUT/requirements.txt" "$OUT/requirements.txt.new" \
   && [ -f "$OUT/.complete" ]; then
  rm "$OUT/requirements.txt.new"; echo "wheels up to date in $OUT"; exit 0
fi
mv "$OUT/requirements.txt.new" "$OUT/requirements.txt"
rm -f "$OUT/.complete"
$PY -m pip download -q --disable-pip-version-check --only-binary=:all: -d "$OUT" -r "$OUT/requirements.txt" -c "$OUT/constraints.txt" 2>&1 \
  | grep -v "is ignored: it is neither" || true
touch "$OUT/.complete"
echo "wheels in $OUT: $(ls "$OUT"/*.whl | wc -l)"
