"""PyTorch's own DDP tutorial ported to strait as a new user would port it
(tests/python/tutorial_worker.py): two sites of two workers, 100 steps, the
tutorial's teardown. Each run must end, with identical replicas; a model
built without a seed is refused in every-step mode on every worker."""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402

# The tutorial's teardown once hung a DiLoCo worker in 7 of 28 runs: a run
# that does not end within this is a failure.
RUN_TIMEOUT_S = 150


def run(tmp, mode, unseeded=False, strait_makes_the_group=False):
    config = os.path.join(tmp, "job.yaml")
    sync = "sync: {mode: diloco, diloco: {sync_every: 7}}" if mode == "diloco" else "sync: {mode: every_step}"
    with open(config, "w") as f:
        f.write(f"""job: {{id: tutorial}}
sites:
  - {{name: hangzhou, jurisdiction: CN, endpoint: "tcp://127.0.0.1:{free_port()}", workers: 2}}
  - {{name: singapore, jurisdiction: SG, endpoint: "tcp://127.0.0.1:{free_port()}", workers: 2}}
{sync}
compression: {{pipeline: "int8", error_feedback: true}}
transport: {{insecure: true, heartbeat_ms: 100, peer_timeout_ms: 3000, round_deadline_s: 30, hard_deadline_s: 60}}
""")
    out = os.path.join(tmp, "out")
    os.makedirs(out, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
    cmd = [sys.executable, "-m", "strait.launch", config, "--", sys.executable, os.path.join(HERE, "tutorial_worker.py"),
           "--mode", mode, "--out", out] + (["--unseeded"] if unseeded else []) + \
        (["--strait-makes-the-group"] if strait_makes_the_group else [])
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return p, [json.load(open(os.path.join(out, n))) for n in sorted(os.listdir(out))]


@pytest.mark.parametrize("mode,runs", [("diloco", 3), ("every_step", 2)])
def test_the_ddp_tutorial_ported_to_strait_ends_every_run_with_identical_replicas(tmp_path, mode, runs):
    for k in range(runs):
        tmp = str(tmp_path / f"run{k}")
        os.makedirs(tmp)
        p, results = run(tmp, mode, strait_makes_the_group=k == 1)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
        assert len(results) == 4 and len({r["hash"] for r in results}) == 1, results
        assert sorted(r["job_rank"] for r in results) == [0, 1, 2, 3] and {r["job_size"] for r in results} == {4}


def test_an_unseeded_model_in_every_step_mode_is_refused_naming_the_digests(tmp_path):
    p, _ = run(str(tmp_path), "every_step", unseeded=True)
    assert p.returncode != 0
    assert "the sites start from different parameters (ddp.b0 digests: hangzhou " in p.stdout, p.stdout[-3000:]
