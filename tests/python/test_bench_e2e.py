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
def test_bench_e2e_quick_time_to_quality_runs_every_mode_and_reports_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"), STRAIT_BUILD_DIR=BUILD)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e", "run.py"), "--build", BUILD, "--json",
                        "--quick", "--sync-every", "3", "--fragments", "3", "--wan", "100mbit-20ms",
                        "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    # The default rows (the plain overlapped run only with --only); DDP,
    # PowerSGD and every-step ran side by side, each across its own border.
    names = ["ddp", "powersgd", "strait", "diloco", "streaming", "sparseloco", "alone"]
    assert [x["name"] for x in out["runs"]] == names
    by = {x["name"]: x for x in out["runs"]}
    assert by["ddp"]["beside"] == ["powersgd", "strait"] and by["diloco"]["beside"] == [], by["ddp"]["beside"]
    # The budget is DDP's time for its steps; every other run trained at
    # least that long and then stopped at a step (DiLoCo: a sync) that both
    # of its sites reached.
    assert out["budget_from"] == "ddp, 4 steps" and by["ddp"]["steps"] == 4, out["budget_from"]
    assert out["budget_s"] == pytest.approx(by["ddp"]["seconds"])
    for x in out["runs"][1:]:
        assert x["seconds"] >= out["budget_s"], (x["name"], x["seconds"], out["budget_s"])
    for x in out["runs"]:
        for key in ("steps", "step_s", "seconds", "bytes_total", "held_out_bits_per_byte", "held_out_accuracy",
                    "final_loss", "seconds_to_ddp_final", "curve", "at_budget"):
            assert key in x, (x["name"], key)
        assert x["curve"] and x["curve"][-1]["step"] == x["steps"], x
        assert all(a["seconds"] <= b["seconds"] and a["bytes"] <= b["bytes"]
                   for a, b in zip(x["curve"], x["curve"][1:])), x["curve"]
        if x["name"] in ("diloco", "streaming", "sparseloco"):
            assert x["steps"] % 3 == 0, x  # whole sync periods
    assert by["alone"]["bytes_total"] == 0  # nothing crossed: the border counts what it forwards
    assert by["strait"]["bytes_total"] / by["strait"]["steps"] < by["ddp"]["bytes_total"] / by["ddp"]["steps"]
    # DDP's last point is the target itself: reached at the end, or sooner.
    assert 0 < by["ddp"]["seconds_to_ddp_final"] <= by["ddp"]["curve"][-1]["seconds"]
    assert out["ddp_final_held_out_bits_per_byte"] == by["ddp"]["held_out_bits_per_byte"]
    assert os.path.getsize(out["plot"]) > 10000


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_bench_e2e_sharded_quick_compares_streams_and_modes_and_reports_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"), STRAIT_BUILD_DIR=BUILD)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "e2e", "run.py"), "--build", BUILD, "--json",
                        "--sharded", "--quick", "--wan", "1gbit-20ms", "--out", str(tmp_path)],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    assert out["wan"] == "1gbit-20ms"
    assert [(x["mode"], x["streams"]) for x in out["sharded"]] == [("diloco", 1), ("diloco", "default"),
                                                                      ("every_step", "default")]
    every = out["sharded"].pop()
    assert every["identical"] is True and every["steps"] == 3, every
    assert sorted(every["bytes_per_step"]) == ["hangzhou/0", "singapore/0", "singapore/1"], every
    assert every["bytes_per_step"]["hangzhou/0"] > 0 and all(s > 0 for s in every["median_step_s"].values()), every
    for x in out["sharded"]:
        assert x["identical"] is True, x
        assert x["syncs"] == 2 and len(x["sync_critical_s"]) == 2 and all(s >= 0 for s in x["sync_critical_s"]), x
        assert sorted(x["bytes_per_sync"]) == ["hangzhou/0", "singapore/0", "singapore/1"], x
        assert x["bytes_per_sync"]["hangzhou/0"] > 0, x
