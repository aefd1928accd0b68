"""examples/charlm in a reduced size: the DiLoCo job and the alone runs
finish, replicas agree, the shared model learned, and the bytes that crossed
are a small fraction of what fp32 gradients every step would be."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_charlm_reduced(tmp_path):
    out = str(tmp_path)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "charlm", "run.py"), "--steps", "50",
                        "--out", out], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    s = json.load(open(os.path.join(out, "summary.json")))
    assert s["replicas_identical"]
    # Two syncs of int4 pseudo-gradients against 50 steps of fp32 gradients.
    assert s["bytes_crossed"] * 100 < s["bytes_fp32_every_step"], s
    bpb = s["held_out_bits_per_byte"]
    for site in ("hangzhou", "singapore"):
        assert bpb["shared"][site] < 6.0, bpb  # an untrained model scores ~8.3
    assert os.path.getsize(os.path.join(out, "loss.png")) > 10000
    # Each site read its text through a manifest of its own jurisdiction, and
    # its signed audit log of the run verifies.
    for site, jur in (("hangzhou", "CN"), ("singapore", "SG")):
        assert json.load(open(os.path.join(out, "data", site, "STRAIT-MANIFEST.json")))["jurisdiction"] == jur
        assert s["audit"][site]["ok"] and s["audit"][site]["records"] > 2, s["audit"]
    assert "held-out bits per byte" in r.stdout
