#!/usr/bin/env bash
# strait as a user installs it, outside the checkout, on torch from the package
# index (the pinned torch of requirements.lock):
#   1. `pip install --no-build-isolation .[demo]` from a clean copy of the
#      repository into a fresh virtual environment that already has torch;
#   2. `pip wheel` of the same copy, installed into that environment once the
#      source install is uninstalled (a second environment would only
#      install the same torch again: 80 s).
# Each is then used from another folder: the ops, `strait env`, `strait keys`
# and `strait audit verify` on the trail of a `strait demo` (run once, by the
# source install: the wheel installs the same package).
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

# A fresh environment that already has the pinned torch, as a user's would.
# The checkout's environment (./strait test made it; STRAIT_PYTHON names
# another) lends its packages through a .pth file, so the 2.7 GB of torch's
# wheels are not unpacked a second time (100 s here): strait itself and its
# console script go into the fresh environment alone. The lent folder is
# reached through the copy's .venv/ (a link), so torch's headers have the
# same path, relative to the copy, as in the checkout: see the build below.
# Without a lender, torch is installed from the wheelhouse.
LENDER="${STRAIT_PYTHON:-$ROOT/.venv/bin/python}"
fresh_env() {  # DIR
  "$BASE" -m venv "$1"
  local want lent rel
  want="$(sed -n 's/^torch==\([^ ;]*\).*/\1/p' "$LOCK" | head -n 1)"
  if [ -x "$LENDER" ] && lent="$("$LENDER" -c 'import os, sys, sysconfig, torch
p = sysconfig.get_paths()["purelib"]
print(torch.__version__.split("+")[0], os.path.relpath(p, sys.prefix), p)' 2>/dev/null)" && [ "${lent%% *}" = "$want" ]; then
    lent="${lent#* }"
    rel="${lent%% *}"
    mkdir -p "$(dirname "$WORK/src/.venv/$rel")"
    ln -s "${lent#* }" "$WORK/src/.venv/$rel"
    "$1/bin/python" -c 'import sys, sysconfig; open(sysconfig.get_paths()["purelib"] + "/lent-by-checkout.pth", "w").write(sys.argv[1] + "\n")' "$WORK/src/.venv/$rel"
  else
    "$1/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" -c "$LOCK" \
      torch setuptools wheel
  fi
}

# What a user does with an installed strait, from a folder outside the checkout.
use_it() {  # VENV LABEL [demo]
  local venv="$1" label="$2" demo="${3:-}" use="$WORK/use-$2"
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
  if [ -n "$demo" ]; then
    "$venv/bin/strait" demo --steps 20 --out "$WORK/demo" >demo.log 2>&1 || { tail -n 40 demo.log; return 1; }
    "$venv/bin/python" -c "import json; s = json.load(open('$WORK/demo/summary.json')); assert s['replicas_identical'] and all(a['ok'] for a in s['audit'].values()), s"
  fi
  "$venv/bin/strait" audit verify "$WORK/demo/audit/compressed-hangzhou.jsonl" --key "$WORK/demo/keys/hangzhou.sign.pub" >/dev/null
  echo "installed strait ($label) works: $("$venv/bin/python" -c 'import strait; print(strait.library_path)') ($SECONDS s)"
  cd "$ROOT"
}

# The build folder sits where ./strait puts one in a checkout (build*/ of the
# copy), with the same generator and build type, and torch is seen under the
# copy's .venv/: then the compiler sees the same relative paths and flags as
# in the checkout's build/, and ccache (CCACHE_BASEDIR) serves what ./strait
# test just compiled instead of compiling the extension again (minutes on 2
# cores). Without ccache, or with another torch, it compiles: slower, same result.
VENV="$WORK/venv"
export CCACHE_BASEDIR="$WORK/src" CCACHE_NOHASHDIR=1 CMAKE_ARGS="-G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo"
export STRAIT_PIP_BUILD_DIR="$WORK/src/build-pip"

echo "pip install: a fresh environment with torch, then strait built from source ..."
fresh_env "$VENV"
echo "  environment ready ($SECONDS s)"
"$VENV/bin/pip" install -q --disable-pip-version-check \
  --no-build-isolation --no-index --find-links "$WHEELS" -c "$LOCK" "$WORK/src[demo]"
echo "  built and installed ($SECONDS s)"
use_it "$VENV" source demo

echo "pip wheel: the same copy as a wheel, installed in place of the source install ..."
# The same CMake build folder: the wheel packs what the source install just
# compiled (against the same torch), so nothing is compiled twice.
"$VENV/bin/pip" wheel -q --disable-pip-version-check --no-build-isolation --no-deps -w "$WORK/dist" "$WORK/src"
"$VENV/bin/pip" uninstall -q -y strait
if "$VENV/bin/python" -c "import strait" 2>/dev/null; then
  echo "pip uninstall left strait importable"; exit 1
fi
wheel="$(ls "$WORK"/dist/strait-*.whl)"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELS" -c "$LOCK" "$wheel[demo]"
use_it "$VENV" wheel
echo "2 passed, 0 failed"
