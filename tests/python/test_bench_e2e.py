"""`./strait bench e2e` in a reduced size: every run finishes across the
simulated border and the JSON has the fields the docs promise. (The figures
themselves are benchmarks, not assertions.) Needs root."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_bench_e2e_runs_every_mode_and_reports_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"), STRAIT_BUILD_DIR=BUILD)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e", "run.py"), "--build", BUILD, "--json",
                        "--steps", "6", "--sync-every", "3", "--fragments", "3", "--wan", "100mbit-20ms", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert [x["name"] for x in out["runs"]] == ["ddp", "powersgd", "strait", "diloco", "overlap", "streaming",
                                                  "sparseloco", "alone"]
    for x in out["runs"]:
        for key in ("step_s", "bytes_per_step", "final_loss", "held_out_bits_per_byte", "held_out_accuracy",
                    "time_ratio_vs_alone", "time_ratio_vs_ddp", "peak_mbit_s"):
            assert key in x, (x["name"], key)
    by = {x["name"]: x for x in out["runs"]}
    assert by["alone"]["bytes_per_step"] == 0  # nothing crossed: the border counts what it forwards
    assert by["ddp"]["bytes_per_step"] > 4 * out["parameters"]  # fp32 gradients cross both ways
    assert by["strait"]["bytes_per_step"] < by["ddp"]["bytes_per_step"]
    assert os.path.getsize(out["plot"]) > 10000
