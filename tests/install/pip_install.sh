#!/usr/bin/env bash
# strait as a user installs it, outside the checkout, on torch from the package
# index (the pinned torch of requirements.lock):
#   1. `pip install --no-build-isolation .[demo]` from a clean copy of the
#      repository into a fresh virtual environment that already has torch;
#   2. `pip wheel` of the same copy, installed into that environment once the
#      source install is uninstalled (a second environment would only
#      install the same torch again: 80 s).
# Each is then used from another folder: the ops, `strait env`, `strait keys`,
# `strait demo` and `strait audit verify` on the demo's trail.
# Run by .ci/run after ./strait test (which fills the wheelhouse); no network.
# Prints "2 passed, 0 failed".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
LOCK="$ROOT/requirements.lock"
WHEELS="${STRAIT_WHEELHOUSE:-${XDG_CACHE_HOME:-$HOME/.cache}/strait/wheels}"
BASE="${STRAIT_BASE_PYTHON:-/usr/bin/python3}"
WORK="$(mktemp -d /tmp/strait-pip-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
  (cd "$ROOT" && xargs -0 tar cf - --ignore-failed-read 2>/dev/null) | (mkdir -p "$WORK/src" && tar xf - -C "$WORK/src")

# A fresh environment with the pinned torch from the wheelhouse, as a user's would be.
fresh_env() {  # DIR
  "$BASE" -m venv "$1"
  "$1/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" -c "$LOCK" \
    torch setuptools wheel
}

# What a user does with an installed strait, from a folder outside the checkout.
use_it() {  # VENV LABEL
  local venv="$1" label="$2" use="$WORK/use-$2"
  mkdir -p "$use"
  cd "$use"
  "$venv/bin/python" - "$venv" <<'PY'
import sys
import torch, strait
assert strait.library_path.startswith(sys.argv[1]), strait.library_path
x = torch.randn(1000)
y = strait.decode(strait.encode(x, "topk(0.1) -> int8"), x.shape)
assert (y != 0).sum().item() == 100
assert strait.build_info()["torch"] == torch.__version__.split("+")[0]
PY
  "$venv/bin/strait" env >env.json
  "$venv/bin/python" -c "import json; e = json.load(open('env.json')); assert e['extension']['path'].startswith('$venv'), e"
  "$venv/bin/strait" keys generate probe --dir keys >/dev/null
  test -s keys/probe.pub
  "$venv/bin/strait" demo --steps 20 --out demo >demo.log 2>&1 || { tail -n 40 demo.log; return 1; }
  "$venv/bin/python" -c "import json; s = json.load(open('demo/summary.json')); assert s['replicas_identical'] and all(a['ok'] for a in s['audit'].values()), s"
  "$venv/bin/strait" audit verify demo/audit/compressed-hangzhou.jsonl --key demo/keys/hangzhou.sign.pub >/dev/null
  echo "installed strait ($label) works: $("$venv/bin/python" -c 'import strait; print(strait.library_path)')"
  cd "$ROOT"
}

echo "pip install: a fresh environment with torch, then strait built from source (a few minutes on 2 cores) ..."
fresh_env "$WORK/venv-src"
STRAIT_PIP_BUILD_DIR="$WORK/build-src" "$WORK/venv-src/bin/pip" install -q --disable-pip-version-check \
  --no-build-isolation --no-index --find-links "$WHEELS" -c "$LOCK" "$WORK/src[demo]"
use_it "$WORK/venv-src" source

echo "pip wheel: the same copy as a wheel, installed in place of the source install ..."
# The same CMake build folder: the wheel packs what the source install just
# compiled (against the same torch), so nothing is compiled twice.
STRAIT_PIP_BUILD_DIR="$WORK/build-src" "$WORK/venv-src/bin/pip" wheel -q --disable-pip-version-check \
  --no-build-isolation --no-deps -w "$WORK/dist" "$WORK/src"
"$WORK/venv-src/bin/pip" uninstall -q -y strait
if "$WORK/venv-src/bin/python" -c "import strait" 2>/dev/null; then
  echo "pip uninstall left strait importable"; exit 1
fi
wheel="$(ls "$WORK"/dist/strait-*.whl)"
"$WORK/venv-src/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" -c "$LOCK" \
  "$wheel[demo]"
use_it "$WORK/venv-src" wheel
echo "2 passed, 0 failed"
