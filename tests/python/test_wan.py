"""The simulated border (`./strait launch --wan PROFILE`) and the round log.

The job test needs root (network namespaces, tc); CI runs as root. Without
root it is skipped, and the message a user gets instead is tested."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))
TRAIN = os.path.join(ROOT, "torch_ext", "python", "strait", "demo", "train.py")  # the demo's worker
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))

from strait import wan  # noqa: E402

IS_ROOT = os.geteuid() == 0


def test_profiles_parse_and_bad_ones_say_the_format():
    assert wan.parse_profile("100mbit-150ms") == (1e8, 0.15)
    assert wan.parse_profile("1gbit-40ms") == (1e9, 0.04)
    assert wan.parse_profile("512kbit-0ms") == (512e3, 0.0)
    for bad in ("fast", "100mbit", "100mbit-150", "100Mbit-150ms", "-150ms", "10kbit-10ms", "1gbit-20000ms"):
        with pytest.raises(wan.WanError) as e:
            wan.parse_profile(bad)
        assert repr(bad) in str(e.value)
        assert "100mbit-150ms" in str(e.value) or "must be" in str(e.value)


def test_without_root_it_says_why_and_how_to_run_without_it(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(wan.WanError) as e:
        wan.check_can_simulate()
    assert "needs root" in str(e.value) and "leave out --wan" in str(e.value)


def write_job(tmp, insecure=False):
    keys = os.path.join(tmp, "keys")
    lines = ["job: {id: wan-test}", "sites:"]
    for i, (site, jur) in enumerate((("hangzhou", "CN"), ("singapore", "SG"))):
        if not insecure:
            subprocess.run([os.path.join(BUILD, "transport", "strait_keys"), "generate", site, "--dir", keys],
                           check=True, stdout=subprocess.DEVNULL)
        lines.append(f"  - {{name: {site}, jurisdiction: {jur}, endpoint: \"tcp://127.0.0.1:{7400 + i}\", workers: 2"
                     + ("" if insecure else f", public_key: keys/{site}.pub, secret_key: keys/{site}.key") + "}")
    lines += ['compression: {pipeline: "topk(0.1) -> int8", seed: 3}',
              "transport: {round_deadline_s: 60, hard_deadline_s: 120" + (", insecure: true" if insecure else "") + "}"]
    path = os.path.join(tmp, "job.yaml")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def launch(args):
    """Runs the launcher; the result carries its pid, which names its namespaces."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
    with subprocess.Popen([sys.executable, "-m", "strait.launch", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True) as p:
        try:
            out, err = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    r = subprocess.CompletedProcess(p.args, p.returncode, out, err)
    r.pid = p.pid
    return r


def namespaces_of(r):
    """The network namespaces the launcher `r` made that are still there. Only
    its own: other tests (the chaos suite runs beside these) make theirs."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    prefix = f"strait{r.pid % 100000}-"
    return [l.split()[0] for l in out.splitlines() if l.startswith(prefix)]


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces and tc need root")
def test_a_job_across_the_simulated_border_logs_its_rounds_and_cleans_up(tmp_path):
    tmp = str(tmp_path)
    config = write_job(tmp)
    log = os.path.join(tmp, "rounds.jsonl")
    r = launch([config, "--wan", "100mbit-150ms", "--json-log", log, "--", sys.executable, TRAIN, "--steps", "4",
                "--out", os.path.join(tmp, "wan-{site}-{rank}.json")])
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    assert f"strait{r.pid % 100000}-s0" in r.stderr, r.stderr[-2000:]  # namespaces_of looks for the right names
    assert namespaces_of(r) == [], "the namespaces were not removed"

    records = [json.loads(l) for l in open(log)]
    assert sorted({(x["site"], x["step"]) for x in records}) == [(s, k) for s in ("hangzhou", "singapore")
                                                                for k in range(4)]
    for x in records:
        assert x["rounds"] >= 1 and x["bytes_out"] > 0 and x["bytes_in"] > 0 and x["missing"] == []
    # Rounds complete on receipt: a site that opens a round after the other
    # site's payload arrived waits for nothing, but in each step the site
    # that opened first waited for the other's payload to cross: at least
    # the one-way delay of the 150 ms round trip.
    for k in range(4):
        waited = max(x["round_s"] for x in records if x["step"] == k)
        assert waited >= 0.075 * 0.99, [x for x in records if x["step"] == k]
    # Human lines, one per step per site, prefixed by the launcher.
    for site in ("hangzhou", "singapore"):
        lines = [l for l in r.stdout.splitlines() if l.startswith(f"[{site}/0] strait {site} step ")]
        assert len(lines) == 4, r.stdout[-2000:]
    # The border saw at least what the sessions say they sent.
    summary = [l for l in r.stderr.splitlines() if "crossed the border" in l]
    assert summary, r.stderr[-2000:]
    crossed_mb = float(summary[0].split("strait launch: ")[1].split(" MB")[0])
    sent = sum(x["bytes_out"] for x in records)
    assert crossed_mb * 1e6 >= sent * 0.99, (crossed_mb, sent)

    # Every worker of both sites ends with the same parameters.
    params = {json.dumps(json.load(open(os.path.join(tmp, f"wan-{s}-{k}.json")))["params"])
              for s in ("hangzhou", "singapore") for k in (0, 1)}
    assert len(params) == 1


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces and tc need root")
def test_plaintext_configs_are_refused_across_the_border(tmp_path):
    tmp = str(tmp_path)
    r = launch([write_job(tmp, insecure=True), "--wan", "10mbit-20ms", "--", sys.executable, TRAIN])
    assert r.returncode != 0
    assert "insecure" in r.stderr and "keys generate" in r.stderr, r.stderr[-2000:]
    assert namespaces_of(r) == []


def test_wan_with_one_site_is_refused(tmp_path):
    r = launch([write_job(str(tmp_path), insecure=True), "--site", "hangzhou", "--wan", "100mbit-150ms", "--",
                sys.executable, TRAIN])
    assert r.returncode != 0 and "real network" in r.stderr, r.stderr[-2000:]


def test_a_border_refuses_a_sysctl_that_is_not_a_net_setting():
    for bad in ("kernel.panic=1", "net.ipv4.tcp_slow_start_after_idle", "net.ipv4.x=1; reboot", "=0"):
        with pytest.raises(wan.WanError, match="not KEY=VALUE with a net.. key"):
            wan.Border("100mbit-150ms", ["a", "b"], sysctls=[bad])


@pytest.mark.skipif(not IS_ROOT, reason="network namespaces and tc need root")
def test_a_borders_sysctls_hold_in_every_site_and_not_on_the_host():
    key = "net.ipv4.tcp_slow_start_after_idle"

    def read(prefix=()):
        return subprocess.run(list(prefix) + ["sysctl", "-n", key], capture_output=True, text=True,
                              check=True).stdout.strip()

    host = read()
    for value in ("0", "1"):  # both: a new namespace starts with one of them whatever the host has
        lines = []
        with wan.Border("100mbit-150ms", ["a", "b"], log=lines.append, tag=f"t{os.getpid() % 10000}",
                        sysctls=[f"{key}={value}"]) as border:
            assert [read(border.prefix(s)) for s in ("a", "b")] == [value, value]
            assert f"{key}={value}" in lines[-1], lines
        assert read() == host
