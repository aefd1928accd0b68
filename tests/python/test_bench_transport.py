"""`./strait bench transport --idle` in a reduced size: raw TCP and strait
exchange small payloads after idle gaps across the simulated border, under
every TCP setting the bench lists, and the JSON has the fields the docs
read. (The times are benchmarks, not assertions.) Needs root."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))


@pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces and tc need root")
def test_bench_transport_idle_measures_raw_tcp_and_strait_under_each_tcp_setting():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"), STRAIT_BUILD_DIR=BUILD)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "transport", "run.py"), "--build", BUILD,
                        "--json", "--idle", "--idle-wan", "1gbit-10ms", "--idle-rounds", "3", "--idle-gap-ms",
                        "200", "--idle-bytes", "5000", "--streams", "2"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout)
    allowed = open("/proc/sys/net/ipv4/tcp_allowed_congestion_control").read().split()
    assert list(out["settings"]) == ["namespace default"] + (
        ["reno, slow start after idle", "reno, no slow start after idle"] if "reno" in allowed else [])
    # The settings were in effect in both sites: read inside each namespace.
    expected = {"reno, slow start after idle": ["reno", "1"], "reno, no slow start after idle": ["reno", "0"]}
    for name, want in expected.items():
        if name in out["settings"]:
            assert out["settings"][name]["tcp"] == [want, want], out["settings"][name]["tcp"]
    for name, row in out["settings"].items():
        for key in ("raw_tcp_s", "strait_1_s", "strait_2_s"):
            # Rounds 2 and 3 of both processes (the first is left out).
            assert len(row[key + "_all"]) == 4, (name, key, row)
            assert all(0 < t < 60 for t in row[key + "_all"]), (name, key, row)
            assert row[key] == sorted(row[key + "_all"])[1] / 2 + sorted(row[key + "_all"])[2] / 2
