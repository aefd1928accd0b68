"""`./strait demo` in a reduced size: the shared model beats each site alone,
far fewer bytes cross than fp32 gradients would need, and every worker of
both sites ends with the same parameters."""

import json
import os
import subprocess
import sys


def test_demo_job_learns_from_both_sites_with_a_sliver_of_the_bytes(tmp_path):
    out = subprocess.run([sys.executable, "-m", "strait.demo", "--steps", "40", "--out", str(tmp_path)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    s = json.load(open(tmp_path / "summary.json"))
    assert s["replicas_identical"]
    for site, acc in s["alone_accuracy"].items():
        assert s["shared_accuracy"] > acc, (site, acc, s["shared_accuracy"])
    assert s["bytes_crossed"] < s["bytes_fp32"] / 10, (s["bytes_crossed"], s["bytes_fp32"])
    assert os.path.getsize(s["plot"]) > 10000
    assert "test accuracy, shared model" in out.stdout
