"""One job, two languages: site a runs the libtorch program
examples/cpp/train.cc (strait's C++ API), site b two Python workers
(tests/python/interop_worker.py, the same model and data). Both go through
the one engine in C++, so they speak one wire dialect: after training every
worker of both sites holds the same bits, and site a puts the same payload
bytes on the wire as a Python site a does in an all-Python job of the same
settings — in every-step mode and in DiLoCo (plain, streaming fragments,
overlapped)."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402
from strait.tools import build_dir  # noqa: E402

sys.path.insert(0, HERE)
from jobs import communicate_all  # noqa: E402

PROGRAM = os.path.join(build_dir() or os.path.join(ROOT, "build"), "examples", "cpp", "strait_example_cpp")
TIMEOUT_S = 240

MODES = {
    "every_step": "sync: {mode: every_step}",
    "diloco": "sync: {mode: diloco, diloco: {sync_every: 5, outer_lr: 0.7, outer_momentum: 0.5}}",
    "fragments": "sync: {mode: diloco, diloco: {sync_every: 6, fragments: 2, outer_lr: 0.7, outer_momentum: 0.5}}",
    "overlap": "sync: {mode: diloco, diloco: {sync_every: 6, fragments: 2, overlap: true, outer_lr: 0.7, "
               "outer_momentum: 0.5}}",
}


def write_config(tmp, sync):
    path = os.path.join(tmp, "job.yaml")
    with open(path, "w") as f:
        f.write(f"""job: {{id: interop}}
sites:
  - {{name: a, jurisdiction: CN, endpoint: "tcp://127.0.0.1:{free_port()}", workers: 1}}
  - {{name: b, jurisdiction: SG, endpoint: "tcp://127.0.0.1:{free_port()}", workers: 2}}
{sync}
compression: {{pipeline: "topk(0.3) -> int8", error_feedback: true}}
transport: {{insecure: true, heartbeat_ms: 100, peer_timeout_ms: 3000, round_deadline_s: 60, hard_deadline_s: 120}}
""")
    return path


def run(mode, cpp_site_a, steps=30):
    """The job; returns each worker's result: site a's first."""
    with tempfile.TemporaryDirectory(prefix="strait-interop-") as tmp:
        config = write_config(tmp, MODES[mode])
        procs, outs = [], []
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
        out = os.path.join(tmp, "a-0.json")
        if cpp_site_a:
            cmd = [PROGRAM, config, "a", "--steps", str(steps), "--out", out]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        else:
            port = free_port()
            cmd = [sys.executable, os.path.join(HERE, "interop_worker.py"), "--config", config, "--site", "a",
                   "--steps", str(steps), "--out", out]
            procs.append(subprocess.Popen(cmd, env=dict(env, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                                                        MASTER_PORT=str(port)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        outs.append(out)
        port = free_port()
        for rank in range(2):
            out = os.path.join(tmp, f"b-{rank}.json")
            cmd = [sys.executable, os.path.join(HERE, "interop_worker.py"), "--config", config, "--site", "b",
                   "--steps", str(steps), "--out", out]
            procs.append(subprocess.Popen(cmd, env=dict(env, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                                        MASTER_PORT=str(port)),
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
            outs.append(out)
        errors = communicate_all(procs, TIMEOUT_S)
        failed = [(i, p.returncode, errors[i][-2000:]) for i, p in enumerate(procs) if p.returncode != 0]
        assert not failed, "workers failed:\n" + "\n".join(f"#{i} rc={rc}: {e}" for i, rc, e in failed)
        return [json.load(open(o)) for o in outs]


@pytest.mark.skipif(not os.path.exists(PROGRAM), reason=f"the libtorch example is not built ({PROGRAM})")
@pytest.mark.parametrize("mode", list(MODES))
def test_a_libtorch_site_and_a_python_site_train_one_model_bitwise_alike(mode):
    mixed = run(mode, cpp_site_a=True)
    hashes = {r["hash"] for r in mixed}
    assert len(hashes) == 1, f"parameters differ between the C++ and the Python workers: {mixed}"
    python = run(mode, cpp_site_a=False)
    assert len({r["hash"] for r in python}) == 1, python
    # The same payload bytes on the wire from site a, whichever language runs it.
    assert mixed[0]["payload_bytes_sent"] == python[0]["payload_bytes_sent"] > 0, (mixed[0], python[0])
    assert mixed[1]["payload_bytes_sent"] == python[1]["payload_bytes_sent"], (mixed[1], python[1])
    # And the same model: one engine, the same arithmetic.
    assert mixed[0]["hash"] == python[0]["hash"], (mixed, python)
