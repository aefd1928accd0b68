"""Sovereignty end to end: dataset residency, each site's policy reaching only
its own workers, the egress policy and the privacy budget stopping a real job,
and the audit log of a real run failing verification after any edit, deletion
or reordering of any record."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))
TRAIN = os.path.join(ROOT, "torch_ext", "python", "strait", "demo", "train.py")  # the demo's worker
AUDIT = os.path.join(BUILD, "transport", "strait_audit")
KEYS = os.path.join(BUILD, "transport", "strait_keys")
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))

import strait  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402  (distinct ports within this process)
from strait import data  # noqa: E402

SITES = (("hangzhou", "CN"), ("singapore", "SG"))


# ------------------------------------------------------------- residency ---

def test_a_dataset_from_another_jurisdiction_is_refused_naming_both(tmp_path, monkeypatch):
    monkeypatch.delenv("STRAIT_DATA", raising=False)
    d = tmp_path / "hz"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("text held in China")
    (d / "sub" / "b.bin").write_bytes(bytes(10))
    data.write_manifest(str(d), "CN", name="hz-text")
    ds = data.open_dataset(str(d), jurisdiction="CN")
    assert ds.name == "hz-text" and ds.jurisdiction == "CN"
    assert [os.path.relpath(f, d) for f in ds.files] == ["a.txt", os.path.join("sub", "b.bin")]

    with pytest.raises(strait.PolicyViolation, match=r"'hz-text' .* held under jurisdiction CN; site .* is in SG"):
        data.open_dataset(str(d), jurisdiction="SG")
    with pytest.raises(strait.PolicyViolation, match="has no STRAIT-MANIFEST.json"):
        data.open_dataset(str(tmp_path), jurisdiction="CN")
    # The launcher's list of the site's datasets: anything else is refused.
    monkeypatch.setenv("STRAIT_DATA", str(tmp_path / "elsewhere"))
    with pytest.raises(strait.PolicyViolation, match="is not one of the datasets of site"):
        data.open_dataset(str(d), jurisdiction="CN")
    monkeypatch.setenv("STRAIT_DATA", str(d))
    data.open_dataset(str(d), jurisdiction="CN")
    # Content that changed after the manifest was written.
    (d / "a.txt").write_text("text edited later")
    with pytest.raises(strait.StraitError, match="a.txt changed since its manifest"):
        data.open_dataset(str(d), jurisdiction="CN")
    data.write_manifest(str(d), "CN", name="hz-text")
    (d / "extra.txt").write_text("added")
    with pytest.raises(strait.StraitError, match="extra.txt is not in its manifest"):
        data.open_dataset(str(d), jurisdiction="CN")


def test_data_command_writes_and_verifies_manifests(tmp_path):
    d = tmp_path / "sg"
    d.mkdir()
    (d / "x.csv").write_text("1,2\n")
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
    run = lambda *a: subprocess.run([sys.executable, "-m", "strait.data", *a], env=env, capture_output=True,  # noqa
                                    text=True)
    r = run("manifest", str(d), "--jurisdiction", "SG")
    assert r.returncode == 0 and "'sg', SG, 1 files, 4 bytes" in r.stdout, r.stderr
    assert run("verify", str(d)).returncode == 0
    (d / "x.csv").write_text("1,3\n")
    r = run("verify", str(d))
    assert r.returncode == 1 and "x.csv changed" in r.stderr
    r = run("manifest", str(d), "--jurisdiction", "Singapore")
    assert r.returncode == 1 and "alpha-2" in r.stderr


# ---------------------------------------------------------- policies, jobs ---

def job(tmp, extra_transport=""):
    """A two-site job on loopback, each site with keys and its own policy
    file (audit log, datasets); returns (config, {site: policy path})."""
    keys = os.path.join(tmp, "keys")
    for site, _ in SITES:
        subprocess.run([KEYS, "generate", site, "--dir", keys], check=True, stdout=subprocess.DEVNULL)
    config = os.path.join(tmp, "job.yaml")
    with open(config, "w") as f:
        f.write("job: {id: sovereignty-test}\nsites:\n")
        for site, jur in SITES:
            f.write(f"  - {{name: {site}, jurisdiction: {jur}, endpoint: \"tcp://127.0.0.1:{free_port()}\", "
                    f"workers: 2, public_key: keys/{site}.pub, secret_key: keys/{site}.key}}\n")
        f.write('compression: {pipeline: "topk(0.1) -> int8", seed: 5}\n')
        f.write(f"transport: {{round_deadline_s: 10, hard_deadline_s: 20{extra_transport}}}\n")
    return config


def write_policy(tmp, site, jur, extra=""):
    os.makedirs(os.path.join(tmp, "data", site), exist_ok=True)
    path = os.path.join(tmp, f"{site}-policy.yaml")
    with open(path, "w") as f:
        f.write(f"site: {site}\njurisdiction: {jur}\n"
                f"audit: {{log: audit/{site}.jsonl, signing_key: keys/{site}.sign}}\n"
                f"data: [data/{site}]\n{extra}")
    return path


def launch(config, policies, command, timeout=240):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
    args = [config]
    for site, path in policies.items():
        args += ["--policy", f"{site}={path}"]
    return subprocess.run([sys.executable, "-m", "strait.launch", *args, "--", *command], env=env,
                          capture_output=True, text=True, timeout=timeout)


def verify(tmp, site, log=None):
    return subprocess.run([AUDIT, "verify", log or os.path.join(tmp, "audit", f"{site}.jsonl"), "--key",
                           os.path.join(tmp, "keys", f"{site}.sign.pub")], capture_output=True, text=True)


def test_each_site_gets_only_its_own_policy_and_datasets(tmp_path):
    tmp = str(tmp_path)
    config = job(tmp)
    policies = {s: write_policy(tmp, s, j) for s, j in SITES}
    probe = "import os; print('SEES', os.environ['STRAIT_SITE'], os.environ['STRAIT_POLICY'], os.environ['STRAIT_DATA'])"
    r = launch(config, policies, [sys.executable, "-c", probe])
    assert r.returncode == 0, r.stderr
    seen = [l.split("SEES ")[1].split() for l in r.stdout.splitlines() if "SEES" in l]
    assert len(seen) == 4
    for site, policy, datasets in seen:
        assert policy == policies[site]
        assert datasets == os.path.join(tmp, "data", site)


def test_a_real_runs_audit_log_fails_verify_after_any_edit_deletion_or_reordering(tmp_path):
    tmp = str(tmp_path)
    config = job(tmp)
    policies = {s: write_policy(tmp, s, j) for s, j in SITES}
    r = launch(config, policies, [sys.executable, TRAIN, "--steps", "4", "--out", os.path.join(tmp, "r-{site}-{rank}.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    for site, _ in SITES:
        ok = verify(tmp, site)
        assert ok.returncode == 0 and "OK" in ok.stdout, ok.stdout + ok.stderr
    # The bytes on record are the bytes the sessions sent.
    results = [json.load(open(os.path.join(tmp, f"r-{s}-0.json"))) for s, _ in SITES]
    log = os.path.join(tmp, "audit", "hangzhou.jsonl")
    lines = open(log).read().splitlines()
    records = [json.loads(l) for l in lines]
    out_update = sum(x["bytes"] for x in records if x["event"] == "out" and x["kind"] == "model_update")
    assert out_update == results[0]["bytes_sent"][-1]
    assert {x["peer_jurisdiction"] for x in records if x["event"] in ("out", "in")} == {"SG"}

    tampered = os.path.join(tmp, "tampered.jsonl")

    def fails(new_lines):
        with open(tampered, "w") as f:
            f.write("".join(l + "\n" for l in new_lines))
        v = verify(tmp, "hangzhou", tampered)
        return v.returncode == 1 and "FAILED at line" in v.stdout

    for i in range(len(lines)):
        if i < len(lines) - 1:  # the last one: see --head below
            assert fails(lines[:i] + lines[i + 1:]), f"deleting record {i} went unnoticed"
        edited = records[i].copy()
        edited["time"] = edited["time"].replace("2", "3", 1)
        assert fails(lines[:i] + [json.dumps(edited, separators=(",", ":"))] + lines[i + 1:]), f"edit of {i}"
        if i + 1 < len(lines):
            assert fails(lines[:i] + [lines[i + 1], lines[i]] + lines[i + 2:]), f"swap of {i} and {i + 1}"
    # Deleting the last record is found against the head printed before.
    head = verify(tmp, "hangzhou").stdout.split("head ")[1].split()[0]
    with open(tampered, "w") as f:
        f.write("".join(l + "\n" for l in lines[:-1]))
    v = subprocess.run([AUDIT, "verify", tampered, "--key", os.path.join(tmp, "keys", "hangzhou.sign.pub"),
                        "--head", head], capture_output=True, text=True)
    assert v.returncode == 1 and "missing at the end" in v.stdout
    key = os.path.join(tmp, "keys", "hangzhou.sign.pub")

    def cli(*args):
        return subprocess.run([AUDIT, "verify", *args, "--key", key], capture_output=True, text=True)

    # The head is a digest the user types: any case is the same head.
    assert cli(log, "--head", head.upper()).returncode == 0
    # Never OK on what is not a log: a directory, an empty file.
    d = cli(tmp)
    assert d.returncode == 2 and "not a regular file" in d.stderr, d.stdout + d.stderr
    empty = os.path.join(tmp, "empty.jsonl")
    open(empty, "w").close()
    e = cli(empty)
    assert e.returncode == 1 and "empty" in e.stdout, e.stdout
    # One encoding per record: an upper-cased signature is an edit, found on its own line.
    for at in (2, len(lines) - 1):
        sig = lines[at].rindex('"sig":"') + 7
        upper = lines[at][:sig] + lines[at][sig:].upper()
        with open(tampered, "w") as f:
            f.write("".join(l + "\n" for l in lines[:at] + [upper] + lines[at + 1:]))
        u = cli(tampered)
        assert u.returncode == 1 and f"FAILED at line {at + 1}:" in u.stdout, (at, u.stdout)
    # --json is JSON whatever the input, and a malformed --head is a usage error.
    j = cli(tampered, "--json")
    assert j.returncode == 1 and json.loads(j.stdout)["line"] == len(lines)
    q = cli(log, "--json", "--head", 'ab"cd')
    assert q.returncode == 2 and "64 hex characters" in q.stderr, q.stdout + q.stderr


def test_a_kind_the_policy_does_not_allow_stops_the_job_and_is_on_record(tmp_path):
    tmp = str(tmp_path)
    config = job(tmp)
    policies = {"hangzhou": write_policy(tmp, "hangzhou", "CN"),
                "singapore": write_policy(tmp, "singapore", "SG", "egress: {allow: [model_update, model_state]}\n")}
    r = launch(config, policies, [sys.executable, TRAIN, "--steps", "4", "--out", os.path.join(tmp, "r-{site}-{rank}.json")])
    assert r.returncode != 0
    assert "of site 'singapore' does not allow 'control' to leave" in r.stdout + r.stderr, r.stdout[-3000:]
    v = verify(tmp, "singapore")
    assert v.returncode == 0 and "refused by the egress or privacy policy: 1" in v.stdout, v.stdout
    records = [json.loads(l) for l in open(os.path.join(tmp, "audit", "singapore.jsonl"))]
    assert not [x for x in records if x["event"] == "out"], "something left singapore"


def test_differential_privacy_runs_is_on_record_and_its_budget_stops_the_job(tmp_path):
    tmp = str(tmp_path)
    config = job(tmp)
    # A generous budget: the job finishes, replicas agree, epsilon is on record.
    policies = {s: write_policy(tmp, s, j, "privacy: {clip_norm: 5.0, noise_multiplier: 0.05, epsilon_budget: 1e9}\n")
                for s, j in SITES}
    r = launch(config, policies, [sys.executable, TRAIN, "--steps", "3", "--out", os.path.join(tmp, "r-{site}-{rank}.json")])
    assert r.returncode == 0, r.stderr[-3000:]
    params = {json.dumps(json.load(open(os.path.join(tmp, f"r-{s}-{k}.json")))["params"]) for s, _ in SITES
              for k in (0, 1)}
    assert len(params) == 1
    v = verify(tmp, "hangzhou")
    assert v.returncode == 0 and "differential privacy spent: epsilon" in v.stdout, v.stdout

    # sigma 1: one release costs epsilon 4.7 at delta 1e-5, two cost 7.2 > 6.
    tmp2 = os.path.join(tmp, "tight")
    os.makedirs(tmp2)
    config = job(tmp2)
    policies = {"hangzhou": write_policy(tmp2, "hangzhou", "CN",
                                         "privacy: {clip_norm: 1.0, noise_multiplier: 1.0, epsilon_budget: 6}\n"),
                "singapore": write_policy(tmp2, "singapore", "SG")}
    r = launch(config, policies, [sys.executable, TRAIN, "--steps", "4", "--out", os.path.join(tmp2, "r-{site}-{rank}.json")])
    assert r.returncode != 0
    assert "privacy budget of site 'hangzhou' exhausted" in r.stdout + r.stderr, r.stdout[-3000:]
    assert verify(tmp2, "hangzhou").returncode == 0
