"""The `./strait bench codecs --json` contract: one JSON object with the fields
tools rely on, for every codec, with the PyTorch baseline measured in the
same run. Runs the real benchmark binary on a small buffer (no timing is
asserted, only the shape and the wire sizes)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))
BINARY = os.path.join(BUILD, "bench", "strait_bench_codecs")


@pytest.fixture(scope="module")
def report():
    if not os.path.exists(BINARY):
        pytest.fail(f"{BINARY} is missing: build with ./strait build first")
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "bench", "codecs", "run.py"), "--binary", BINARY,
         "--json", "--n", "65536", "--reps", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


def test_top_level_fields(report):
    assert report["n"] == 65536
    assert report["threads"] == 1
    assert report["memcpy_gbps"] > 0
    assert report["simd"] in ("avx2", "generic")


def test_every_codec_has_strait_and_torch_figures(report):
    names = [r["codec"] for r in report["results"]]
    for expected in ["fp16", "bf16", "int8", "int4", "int2", "qsgd", "topk", "randomk", "sign",
                     "lowrank", "topk(0.01) -> int8", "lowrank(4) -> fp16"]:
        assert expected in names
    for r in report["results"]:
        for key in ("encode_gbps", "decode_gbps", "torch_encode_gbps", "bits_per_value"):
            assert r[key] > 0, (r["codec"], key)


def test_payload_sizes_match_the_formats(report):
    size = {r["codec"]: r["payload_bytes"] for r in report["results"]}
    bits = {r["codec"]: r["bits_per_value"] for r in report["results"]}
    n = report["n"]
    header = 16 + 8  # payload header + value section header
    assert size["fp16"] == header + 2 * n
    assert size["int8"] == header + 4 * (n // 256) + n
    assert size["int4"] == header + 4 * (n // 256) + n // 2
    assert size["sign"] == header + 4 * (n // 256) + n // 8
    assert bits["int8"] == pytest.approx(8 * size["int8"] / n, abs=1e-4)
    assert bits["topk(0.01) -> int8"] < 0.2
