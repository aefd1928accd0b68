#!/usr/bin/env bash
# `pip install --no-build-isolation .` from a clean copy of the repository into
# a fresh virtual environment (which sees Debian's torch), then use it from
# outside the repository. Run by .ci/run; prints "1 passed, 0 failed".
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
WORK="$(mktemp -d /tmp/strait-pip-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
git -C "$ROOT" ls-files -z | (cd "$ROOT" && xargs -0 tar cf -) | (mkdir -p "$WORK/src" && tar xf - -C "$WORK/src")
/usr/bin/python3 -m venv --system-site-packages "$WORK/venv"
echo "pip install: building the extension (a few minutes on 2 cores) ..."
STRAIT_PIP_BUILD_DIR="$WORK/build" "$WORK/venv/bin/pip" install --no-build-isolation --no-index -q "$WORK/src"
cd "$WORK"
"$WORK/venv/bin/python" - <<'PY'
import torch, strait
assert strait.library_path.startswith(__import__("sys").prefix), strait.library_path
x = torch.randn(1000)
y = strait.decode(strait.encode(x, "topk(0.1) -> int8"), x.shape)
assert (y != 0).sum().item() == 100
print("installed strait works:", strait.library_path)
PY
echo "1 passed, 0 failed"
