"""`./strait launch`: every site from one command, or each site from its own
command (as in a real deployment) — the same job reaches the same bits."""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402  (distinct ports within this process)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(ROOT, "torch_ext", "python", "strait", "demo", "train.py")  # the demo's worker


def launch(args, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
    return subprocess.Popen([sys.executable, "-m", "strait.launch", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(p, timeout=240):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:] + out[-2000:]
    return out


def write_config(tmp):
    path = os.path.join(tmp, "job.yaml")
    with open(path, "w") as f:
        f.write(f"""job: {{id: launch-test}}
sites:
  - {{name: hangzhou, jurisdiction: CN, endpoint: "tcp://127.0.0.1:{free_port()}", workers: 2}}
  - {{name: singapore, jurisdiction: SG, endpoint: "tcp://127.0.0.1:{free_port()}", workers: 2}}
compression: {{pipeline: "topk(0.1) -> int8(rounding=stochastic)", seed: 7}}
transport: {{insecure: true, round_deadline_s: 60, hard_deadline_s: 120}}
""")
    return path


def params(tmp, prefix):
    out = {}
    for site in ("hangzhou", "singapore"):
        for rank in (0, 1):
            with open(os.path.join(tmp, f"{prefix}-{site}-{rank}.json")) as f:
                out[(site, rank)] = json.load(f)["params"]
    return out


def test_launch_all_sites_or_one_site_per_command_reaches_the_same_bits(tmp_path):
    tmp = str(tmp_path)
    config = write_config(tmp)
    cmd = ["--", sys.executable, TRAIN, "--steps", "20"]
    out = finish(launch([config, *cmd, "--out", os.path.join(tmp, "all-{site}-{rank}.json")]))
    assert "[hangzhou/0]" in out or out == ""  # workers' output is prefixed (train.py prints little)
    together = params(tmp, "all")
    first = together[("hangzhou", 0)]
    assert all(p == first for p in together.values()), "all four workers must hold the same parameters"

    # The same job, each site started by its own command.
    a = launch([config, "--site", "hangzhou", *cmd, "--out", os.path.join(tmp, "sep-{site}-{rank}.json")])
    b = launch([config, "--site", "singapore", *cmd, "--out", os.path.join(tmp, "sep-{site}-{rank}.json")])
    finish(a)
    finish(b)
    separate = params(tmp, "sep")
    assert all(p == first for p in separate.values()), "separate launches must reach the same bits"


def test_launch_refuses_an_unknown_site_and_a_missing_command(tmp_path):
    config = write_config(str(tmp_path))
    p = launch([config, "--site", "tokyo", "--", "true"])
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "site 'tokyo' is not in" in err
    p = launch([config])
    _, err = p.communicate(timeout=60)
    assert p.returncode != 0 and "no command" in err


def test_a_failing_worker_stops_the_job_with_its_status(tmp_path):
    config = write_config(str(tmp_path))
    script = "import os, sys, time; sys.exit(5) if os.environ['STRAIT_SITE'] == 'singapore' and os.environ['RANK'] == '1' else time.sleep(60)"
    p = launch([config, "--", sys.executable, "-c", script])
    _, err = p.communicate(timeout=60)
    assert p.returncode == 5, err
    assert "worker singapore/1 failed with status 5" in err
