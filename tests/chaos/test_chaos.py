"""The chaos suite (docs/RELIABILITY.md): real jobs, real processes, real
kill -9 and, as root, a real partition of the simulated border. Every
scenario asserts that the job finishes (or stops with a clear error), that
the replicas are bitwise identical, that each site's signed audit log
verifies, and that memory stays bounded. Recovery times are printed (run
with -s to see them); docs/RELIABILITY.md quotes them."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))
WORKER = os.path.join(ROOT, "tests", "chaos", "worker.py")
KEYS = os.path.join(BUILD, "transport", "strait_keys")
AUDIT = os.path.join(BUILD, "transport", "strait_audit")
PY = sys.executable  # the interpreter running the tests: the project environment
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))

from strait.ports import free_port, free_ports  # noqa: E402

SITES = (("alpha", "CN"), ("beta", "SG"))
# A worker of this job peaks near 720 MB on torch 2.11's CUDA build (importing
# it maps the CUDA libraries: ~620 MB before any work); a leak over the run would show.
MAX_RSS_KB = 1_200_000


def make_job(tmp, on_site_loss="continue", workers=1, hard_deadline=60, every=2, sync_every=5, mode="diloco",
             fragments=1, overlap=False, round_deadline=None, sharded=False, policy_extra="", transport_extra=""):
    """Two sites with CurveZMQ keys (plaintext is refused off loopback, so
    always), a policy with a signed audit log each, checkpoints every
    `every` syncs (a sync every sync_every steps: with fragments, each
    fragment syncs every sync_every * fragments steps). Returns (config
    path, {site: policy path})."""
    keys = os.path.join(tmp, "keys")
    for site, _ in SITES:
        if not os.path.exists(os.path.join(keys, f"{site}.key")):
            subprocess.run([KEYS, "generate", site, "--dir", keys], check=True, stdout=subprocess.DEVNULL)
    lines = ["job: {id: chaos}", "sites:"]
    for site, country in SITES:
        # sharded: a site's groups listen at its port + 1 + the group's number.
        port = free_ports(4) if sharded else free_port()
        n = workers[site] if isinstance(workers, dict) else workers
        lines.append(f"  - {{name: {site}, jurisdiction: {country}, endpoint: \"tcp://127.0.0.1:{port}\", "
                     f"workers: {n}, public_key: keys/{site}.pub, secret_key: keys/{site}.key}}")
    lines += ["sync:", f"  mode: {mode}"] + \
        ([f"  diloco: {{sync_every: {sync_every * fragments}, fragments: {fragments}, outer_lr: 0.7, "
          f"outer_momentum: 0.5, overlap: {str(overlap).lower()}}}"] if mode == "diloco" else [])
    lines += ["compression:", "  pipeline: \"topk(0.1) -> int8\"",
              f"transport: {{heartbeat_ms: 100, peer_timeout_ms: 1000, round_deadline_s: {round_deadline or min(20, hard_deadline)}, "
              f"hard_deadline_s: {hard_deadline}, on_site_loss: {on_site_loss}"
              # sharded: pieces of 1024 elements, so that each rank of a site owns some.
              + (", chunk_bytes: 4096" if sharded else "") + transport_extra + "}",
              f"checkpoint: {{dir: ckpt, every: {every}, keep: 3}}"]
    config = os.path.join(tmp, "job.yaml")
    with open(config, "w") as f:
        f.write("\n".join(lines) + "\n")
    policies = {}
    for site, country in SITES:
        policies[site] = os.path.join(tmp, f"{site}-policy.yaml")
        with open(policies[site], "w") as f:
            f.write(f"site: {site}\njurisdiction: {country}\n"
                    f"audit: {{log: audit/{site}.jsonl, signing_key: keys/{site}.sign}}\n{policy_extra}")
    return config, policies


_jobs = []  # launches of the current test, stopped after it whatever happened


@pytest.fixture(autouse=True)
def _stop_leftover_jobs():
    yield
    while _jobs:
        job = _jobs.pop()
        if job.poll() is None:
            # SIGINT first: the launcher then stops its workers and removes
            # its network namespaces; SIGKILL if it does not finish.
            try:
                os.killpg(job.pid, signal.SIGINT)
                job.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(job.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                job.wait()


def launch(tmp, config, policies, steps, extra=(), site=None, step_sleep=0.02, log_name="launch.log",
           mode="diloco", worker_args=()):
    args = [os.path.join(ROOT, "strait"), "launch", config, "--json-log", os.path.join(tmp, "events.jsonl")]
    if site:
        args += ["--site", site, "--policy", f"{site}={policies[site]}"]
    else:
        args += [a for s in policies for a in ("--policy", f"{s}={policies[s]}")]
    args += list(extra) + ["--", PY, WORKER, "--steps", str(steps), "--out", tmp, "--step-sleep", str(step_sleep),
                           "--mode", mode, *worker_args]
    log = open(os.path.join(tmp, log_name), "ab")
    env = dict(os.environ, STRAIT_BUILD_DIR=BUILD, STRAIT_WORKER_TIMEOUT="240")
    job = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    _jobs.append(job)
    return job


def worker_pids(tmp, site, rank=None):
    """Processes of this test's workers of `site` (found by their command
    line and STRAIT_SITE)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmd = open(f"/proc/{pid}/cmdline", "rb").read().split(b"\0")
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if WORKER.encode() in cmd and tmp.encode() in cmd and f"STRAIT_SITE={site}".encode() in env:
            if rank is None or f"RANK={rank}".encode() in env:
                out.append(int(pid))
    return out


def kill9(pids):
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def kill_launch(tmp, job, sites):
    """kill -9 of a launcher and every worker of `sites` it started."""
    os.killpg(job.pid, signal.SIGKILL)
    for site in sites:
        kill9(worker_pids(tmp, site))
    job.wait()


def hold_back(tmp, site):
    """Slows `site`'s steps (worker.py's pace) until the returned file is
    removed: a restarted site takes seconds to start (torch's import alone
    is ~3 s here), and a running site must not finish meanwhile."""
    path = os.path.join(tmp, f"{site}.slow")
    open(path, "w").close()
    return path


def syncs(tmp, site):
    path = os.path.join(tmp, f"{site}-syncs.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def wait_for(what, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def events(tmp):
    path = os.path.join(tmp, "events.jsonl")
    records = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
    return [r for r in records if "event" in r]


def finish(proc, tmp, timeout=240):
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError("the job did not finish in time:\n" + tail(tmp))
    return code


def tail(tmp, name=None, n=60):
    """The last lines of a launch log (all of this test's logs by default)."""
    names = [name] if name else sorted(os.path.basename(p) for p in glob.glob(os.path.join(tmp, "*.log")))
    out = []
    for each in names:
        path = os.path.join(tmp, each)
        if os.path.exists(path):
            out += [f"--- {each}"] + open(path, errors="replace").read().splitlines()[-n:]
    return "\n".join(out)


def results(tmp):
    return {os.path.basename(p)[:-5]: json.load(open(p)) for p in glob.glob(os.path.join(tmp, "*-[0-9].json"))}


def check_whole(tmp, expect_workers):
    """Every worker finished with the same global parameters, audit logs
    verify, memory bounded."""
    r = results(tmp)
    assert sorted(r) == sorted(expect_workers), (sorted(r), tail(tmp))
    hashes = {v["hash"] for v in r.values()}
    assert len(hashes) == 1, (r, tail(tmp))
    assert len({v["syncs"] for v in r.values()}) == 1, r
    for v in r.values():
        assert v["max_rss_kb"] < MAX_RSS_KB, v
    for site, _ in SITES:
        v = subprocess.run([AUDIT, "verify", os.path.join(tmp, "audit", f"{site}.jsonl"), "--key",
                            os.path.join(tmp, "keys", f"{site}.sign.pub")], capture_output=True, text=True)
        assert v.returncode == 0, (site, v.stdout, v.stderr)
    return r


def recovery_seconds(tmp, since, site):
    """Seconds from `since` to the site's last "joined" event, and from its
    join request to that event (the wait for a running site's round plus the
    state transfer)."""
    mine = [e for e in events(tmp) if e.get("site") == site]
    joined = [e for e in mine if e["event"].startswith("joined")]
    assert joined, tail(tmp)
    asked = [e for e in mine if e["event"].startswith("joining") and e["time"] <= joined[-1]["time"]]
    return joined[-1]["time"] - since, joined[-1]["time"] - asked[-1]["time"]


def said(seconds):
    total, join = seconds
    return f"{total:.1f} s ({join:.2f} s of it from the join request to the state verified)"


# ------------------------------------------------------------ scenarios ---

@pytest.mark.parametrize("fragments,overlap", [(1, False), (2, False), (2, True)])
def test_whole_job_killed_and_resumed_ends_bitwise_like_an_uninterrupted_run(tmp_path, fragments, overlap):
    # With two streaming fragments a checkpoint also holds the local
    # parameters of the fragment not synced last; with overlap it is
    # written once the round in flight has landed.
    straight = str(tmp_path / "straight")
    chaos = str(tmp_path / "chaos")
    for d in (straight, chaos):
        os.makedirs(d)
    config, policies = make_job(straight, on_site_loss="wait", fragments=fragments, overlap=overlap)
    assert finish(launch(straight, config, policies, steps=80, step_sleep=0), straight) == 0, tail(straight)
    expected = check_whole(straight, ["alpha-0", "beta-0"])["alpha-0"]["hash"]

    config, policies = make_job(chaos, on_site_loss="wait", fragments=fragments, overlap=overlap)
    job = launch(chaos, config, policies, steps=80)
    wait_for("sync 7 on both sites", lambda: min(len(syncs(chaos, s)) for s, _ in SITES) >= 7)
    kill_launch(chaos, job, [s for s, _ in SITES])  # the launcher and every worker of both sites
    held = {s: sorted(os.listdir(os.path.join(chaos, "ckpt", s))) for s, _ in SITES}
    assert all(held.values()), held

    assert finish(launch(chaos, config, policies, steps=80, extra=["--resume"]), chaos) == 0, tail(chaos)
    # A kill during a write leaves a temporary file; the resumed run removed it.
    assert not any(".tmp-" in n for s, _ in SITES for n in os.listdir(os.path.join(chaos, "ckpt", s)))
    r = check_whole(chaos, ["alpha-0", "beta-0"])
    assert {v["resumed"] for v in r.values()} == {"checkpoint"}
    resumed = [e["event"] for e in events(chaos) if e["event"].startswith("resumed from round")]
    assert len(resumed) == 2, resumed
    # Checkpoints hold everything the run depends on (parameters, momentum,
    # residuals, optimizer state): the resumed run ends with the same bits.
    assert r["alpha-0"]["hash"] == expected


def test_a_sharded_job_killed_whole_resumes_from_every_ranks_checkpoint_bitwise_like_an_uninterrupted_run(tmp_path):
    # FSDP2 inside each site (alpha 1 rank, beta 2): each rank writes its
    # own pieces, momentum, residuals and its shard's optimizer state.
    straight = str(tmp_path / "straight")
    chaos = str(tmp_path / "chaos")
    for d in (straight, chaos):
        os.makedirs(d)
    workers, sharded = {"alpha": 1, "beta": 2}, ["--sharded"]
    config, policies = make_job(straight, on_site_loss="wait", workers=workers, sharded=True)
    assert finish(launch(straight, config, policies, steps=80, step_sleep=0, worker_args=sharded), straight) == 0, \
        tail(straight)
    expected = check_whole(straight, ["alpha-0", "beta-0", "beta-1"])["alpha-0"]["hash"]

    config, policies = make_job(chaos, on_site_loss="wait", workers=workers, sharded=True)
    job = launch(chaos, config, policies, steps=80, worker_args=sharded)
    wait_for("sync 7 on both sites", lambda: min(len(syncs(chaos, s)) for s, _ in SITES) >= 7)
    kill_launch(chaos, job, [s for s, _ in SITES])
    held = {f"{s}/rank{k}": sorted(os.listdir(os.path.join(chaos, "ckpt", s, f"rank{k}")))
            for s, n in workers.items() for k in range(n)}
    assert all(held.values()), held

    assert finish(launch(chaos, config, policies, steps=80, extra=["--resume"], worker_args=sharded), chaos) == 0, \
        tail(chaos)
    assert not any(".tmp-" in n for d in held for n in os.listdir(os.path.join(chaos, "ckpt", d)))
    r = check_whole(chaos, ["alpha-0", "beta-0", "beta-1"])
    assert {v["resumed"] for v in r.values()} == {"checkpoint"}, r
    resumed = [e["event"] for e in events(chaos) if e["event"].startswith("resumed from round")]
    assert len(resumed) == 2, resumed
    assert r["alpha-0"]["hash"] == expected


def test_every_step_job_killed_and_resumed_ends_like_an_uninterrupted_run(tmp_path):
    straight = str(tmp_path / "straight")
    chaos = str(tmp_path / "chaos")
    for d in (straight, chaos):
        os.makedirs(d)
    config, policies = make_job(straight, on_site_loss="wait", every=10, mode="every_step")
    job = launch(straight, config, policies, steps=60, step_sleep=0, mode="every_step")
    assert finish(job, straight) == 0, tail(straight)
    straight_hash = check_whole(straight, ["alpha-0", "beta-0"])["alpha-0"]["hash"]

    config, policies = make_job(chaos, on_site_loss="wait", every=10, mode="every_step")
    job = launch(chaos, config, policies, steps=60, step_sleep=0.05, mode="every_step")
    def both_hold_step_20():
        # A finished checkpoint, not the temporary file it is written to
        # first (same prefix, ".tmp-PID" after it): killed while that is on
        # disk, the newest checkpoint both sites hold is step 10's.
        dirs = [os.path.join(chaos, "ckpt", s) for s, _ in SITES]
        return all(os.path.isdir(d) and any(n.startswith("round-00000020-") and ".tmp-" not in n
                                            for n in os.listdir(d)) for d in dirs)

    wait_for("a checkpoint of step 20 on both sites", both_hold_step_20)
    kill_launch(chaos, job, [s for s, _ in SITES])
    assert finish(launch(chaos, config, policies, steps=60, extra=["--resume"], mode="every_step"), chaos) == 0, \
        tail(chaos)
    r = check_whole(chaos, ["alpha-0", "beta-0"])
    assert all(v["resumed"] and v["resumed"] >= 20 for v in r.values()), r
    # The same bits as the uninterrupted run: a restarted DDP's first step
    # uses its initial buckets, not the rebuilt ones, and the hook regroups
    # them into the job's layout (from the checkpoint) before they cross, so
    # top-k picks from the same buckets as before the kill. The worker's
    # small buckets make the two layouts differ.
    assert r["alpha-0"]["hash"] == straight_hash, (r, straight_hash)
    assert "regrouped" not in open(os.path.join(chaos, "launch.log"), errors="replace").read()


@pytest.mark.parametrize("mode,workers", [("continue", 1), ("wait", 2)])
def test_an_every_step_site_killed_mid_run_rejoins_by_state_transfer_at_a_step_boundary(tmp_path, mode, workers):
    # The DDP hook with strait.Checkpoints, one launch per site. beta is
    # killed -9 and restarted with --resume while alpha trains on (held back
    # so it cannot finish first). Under wait alpha stops in the rounds of
    # the step beta died in, beta releases them without a contribution, and
    # takes alpha's state after that step (parameters, optimizer, residuals,
    # counters, bucket layout); under continue alpha goes on alone and sends
    # its state at the end of the step the request comes in. Every worker
    # of both sites must end with the same bits (with two workers a site,
    # every worker of the joining site takes the state and regroups).
    tmp = str(tmp_path)
    # Two rounds in flight at most, for three buckets a step: under wait the
    # running site also waits for a slot, and must answer meanwhile.
    config, policies = make_job(tmp, on_site_loss=mode, every=10, mode="every_step", workers=workers,
                                transport_extra=", max_rounds_in_flight: 2")
    alpha = launch(tmp, config, policies, steps=300, site="alpha", log_name="alpha.log", mode="every_step")
    beta = launch(tmp, config, policies, steps=300, site="beta", log_name="beta.log", mode="every_step")
    ckpt = os.path.join(tmp, "ckpt", "beta")
    wait_for("beta's first checkpoint", lambda: os.path.isdir(ckpt) and os.listdir(ckpt))
    slow = hold_back(tmp, "alpha")
    kill_launch(tmp, beta, ["beta"])
    time.sleep(2.5)
    beta = launch(tmp, config, policies, steps=300, site="beta", extra=["--resume"], log_name="beta-again.log",
                  mode="every_step")
    wait_for("beta's state transfer", lambda: "digest verified" in open(os.path.join(tmp, "beta-again.log"),
                                                                       errors="replace").read(), timeout=180)
    os.remove(slow)
    assert finish(alpha, tmp) == 0, tail(tmp)
    assert finish(beta, tmp) == 0, tail(tmp)
    ranks = [f"{site}-{rank}" for site, _ in SITES for rank in range(workers)]
    r = check_whole(tmp, ranks)  # the same final bits everywhere, both audit logs verify
    assert all(r[k]["syncs"] == 300 for k in ranks), r
    assert all(r[f"beta-{k}"]["resumed"] > 10 and r[f"alpha-{k}"]["resumed"] is None for k in range(workers)), r
    alpha_log = open(os.path.join(tmp, "alpha.log"), errors="replace").read()
    beta_log = open(os.path.join(tmp, "beta-again.log"), errors="replace").read()
    assert "site 'beta' asked to join: sending it the state of step" in alpha_log, tail(tmp)
    assert "joined: state of step" in beta_log, tail(tmp)
    if mode == "wait":
        # alpha waited in the rounds of a step for beta (with two slots for
        # three buckets, some not even started); beta released them.
        assert "rounds of this step not complete)" in alpha_log, tail(tmp)
        assert "rounds it waits in" in beta_log, tail(tmp)


@pytest.mark.parametrize("mode", ["every_step", "overlap"])
def test_a_site_restarted_into_a_running_job_without_state_transfer_is_told_it_cannot_join(tmp_path, mode):
    # A running site that cannot give its state: an every-step site whose
    # program has no strait.Checkpoints (which serves joins), and an
    # overlapped DiLoCo, whose state always has a round in flight. The
    # restarted site must stop with that message, not train on alone from
    # an old checkpoint.
    tmp = str(tmp_path)
    job = "every-step (without strait.Checkpoints, which serves joins)" if mode == "every_step" \
        else "overlapped DiLoCo"
    worker = "every_step" if mode == "every_step" else "diloco"
    config, policies = make_job(tmp, on_site_loss="continue", every=10, mode=worker, overlap=mode == "overlap")
    alpha = launch(tmp, config, policies, steps=300, site="alpha", log_name="alpha.log", mode=worker,
                   worker_args=["--no-checkpoints"] if mode == "every_step" else [])
    beta = launch(tmp, config, policies, steps=300, site="beta", log_name="beta.log", mode=worker)
    ckpt = os.path.join(tmp, "ckpt", "beta")
    wait_for("beta's first checkpoint", lambda: os.path.isdir(ckpt) and os.listdir(ckpt))
    slow = hold_back(tmp, "alpha")  # alpha must still be running when beta is back
    kill_launch(tmp, beta, ["beta"])
    time.sleep(2.5)
    beta = launch(tmp, config, policies, steps=300, site="beta", extra=["--resume"], log_name="beta-again.log",
                  mode=worker)
    assert finish(beta, tmp) == 3, tail(tmp)  # the worker's clean StraitError exit
    os.remove(slow)
    assert f"site 'alpha' is still running; a site cannot join a running {job} job" in \
        open(os.path.join(tmp, "beta-again.log"), errors="replace").read(), tail(tmp)
    assert finish(alpha, tmp) == 0, tail(tmp)
    alpha_log = open(os.path.join(tmp, "alpha.log"), errors="replace").read()
    assert f"site 'beta' asked to join; a running {job} job cannot take it in" in alpha_log
    assert results(tmp)["alpha-0"]["syncs"] == (300 if mode == "every_step" else 60)
    v = subprocess.run([AUDIT, "verify", os.path.join(tmp, "audit", "alpha.jsonl"), "--key",
                        os.path.join(tmp, "keys", "alpha.sign.pub")], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr


@pytest.mark.parametrize("mode", ["continue", "wait"])
def test_a_site_killed_mid_run_rejoins_by_state_transfer_without_restarting_the_other(tmp_path, mode):
    # One launch per site, as in a real deployment. beta is killed and stays
    # down for 2.5 s (beyond peer_timeout: alpha sees it gone), then starts
    # again with --resume while alpha keeps training.
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss=mode)
    alpha = launch(tmp, config, policies, steps=250, site="alpha", log_name="alpha.log")
    beta = launch(tmp, config, policies, steps=250, site="beta", log_name="beta.log")
    wait_for("sync 6", lambda: len(syncs(tmp, "beta")) >= 6)
    slow = hold_back(tmp, "alpha")  # under continue, alpha must not finish before beta is back
    kill_launch(tmp, beta, ["beta"])
    killed_at = time.time()
    time.sleep(2.5)
    beta = launch(tmp, config, policies, steps=250, site="beta", extra=["--resume"], log_name="beta-again.log")
    wait_for("beta's state transfer", lambda: "digest verified" in open(os.path.join(tmp, "beta-again.log"),
                                                                       errors="replace").read(), timeout=180)
    os.remove(slow)
    assert finish(alpha, tmp) == 0, tail(tmp)
    assert finish(beta, tmp) == 0, tail(tmp)
    r = check_whole(tmp, ["alpha-0", "beta-0"])
    assert r["beta-0"]["resumed"] == "running" and r["alpha-0"]["resumed"] is None
    alpha_log = open(os.path.join(tmp, "alpha.log"), errors="replace").read()
    beta_log = open(os.path.join(tmp, "beta-again.log"), errors="replace").read()
    assert "site 'beta' asked to join: sending it the state of round" in alpha_log
    assert "digest verified" in beta_log
    alpha_syncs = syncs(tmp, "alpha")
    if mode == "continue":
        # alpha went on without beta, and said so.
        assert any(s["missing"] == ["beta"] for s in alpha_syncs), alpha_syncs
        assert "continuing without beta" in alpha_log
    else:
        # alpha waited, naming beta; no round went without it.
        assert not any(s["missing"] for s in alpha_syncs), alpha_syncs
        assert "waiting for beta" in alpha_log
    # Every round beta applied, before its death and after its return, left
    # it with the same parameters as alpha.
    mine = {s["sync"]: s["hash"] for s in syncs(tmp, "beta")}
    theirs = {s["sync"]: s["hash"] for s in alpha_syncs}
    assert all(mine[k] == theirs[k] for k in mine), (mine, theirs)
    # No round applied twice: alpha's sync numbers are 1, 2, 3, ... once each.
    assert [s["sync"] for s in alpha_syncs] == list(range(1, len(alpha_syncs) + 1))
    print(f"\n[{mode}] beta rejoined {said(recovery_seconds(tmp, killed_at, 'beta'))} after kill -9, "
          f"2.5 s down and the start of its processes included")


@pytest.mark.parametrize("privacy", [False, True])
def test_a_sharded_site_of_two_ranks_killed_mid_run_rejoins_the_running_job(tmp_path, privacy):
    # FSDP2 inside each site (alpha 1 rank, beta 2): beta is killed -9 and
    # started again with --resume while alpha waits for it (on_site_loss:
    # wait). Each of beta's ranks takes its groups' pieces from alpha's
    # owner. With differential privacy beta's first round, without a
    # contribution, releases nothing.
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss="wait", workers={"alpha": 1, "beta": 2}, sharded=True,
                                policy_extra="privacy: {clip_norm: 1.0, noise_multiplier: 1.0, epsilon_budget: 1000}\n"
                                if privacy else "")
    sharded = ["--sharded"]
    alpha = launch(tmp, config, policies, steps=250, site="alpha", log_name="alpha.log", worker_args=sharded)
    beta = launch(tmp, config, policies, steps=250, site="beta", log_name="beta.log", worker_args=sharded)
    wait_for("sync 6", lambda: len(syncs(tmp, "beta")) >= 6)
    slow = hold_back(tmp, "alpha")
    kill_launch(tmp, beta, ["beta"])
    killed_at = time.time()
    time.sleep(2.5)
    beta = launch(tmp, config, policies, steps=250, site="beta", extra=["--resume"], log_name="beta-again.log",
                  worker_args=sharded)
    wait_for("beta's state transfer", lambda: "digests verified" in open(os.path.join(tmp, "beta-again.log"),
                                                                        errors="replace").read(), timeout=180)
    os.remove(slow)
    assert finish(alpha, tmp) == 0, tail(tmp)
    assert finish(beta, tmp) == 0, tail(tmp)
    # Every rank of both sites ends with the same full parameters; audit logs verify.
    r = check_whole(tmp, ["alpha-0", "beta-0", "beta-1"])
    assert r["beta-0"]["resumed"] == r["beta-1"]["resumed"] == "running" and r["alpha-0"]["resumed"] is None, r
    # The groups' own audit logs (a file per rank and group, both of beta's lives appended) verify too.
    groups = glob.glob(os.path.join(tmp, "audit", "*.group*"))
    assert {os.path.basename(g).split(".")[0] for g in groups} == {"alpha", "beta"}, groups
    for log in groups:
        site = os.path.basename(log).split(".")[0]
        v = subprocess.run([AUDIT, "verify", log, "--key", os.path.join(tmp, "keys", f"{site}.sign.pub")],
                           capture_output=True, text=True)
        assert v.returncode == 0, (log, v.stdout, v.stderr)
    alpha_log = open(os.path.join(tmp, "alpha.log"), errors="replace").read()
    assert "site 'beta' asked to join" in alpha_log and "waiting for beta" in alpha_log
    # Every round beta applied, before its death and after its return, left
    # it with alpha's parameters.
    mine = {s["sync"]: s["hash"] for s in syncs(tmp, "beta")}
    theirs = {s["sync"]: s["hash"] for s in syncs(tmp, "alpha")}
    assert all(mine[k] == theirs[k] for k in mine), (mine, theirs)
    print(f"\n[sharded{', privacy' if privacy else ''}] beta (2 ranks) rejoined {said(recovery_seconds(tmp, killed_at, 'beta'))} after kill -9, "
          f"2.5 s down and the start of its processes included")


@pytest.mark.parametrize("overlap", [False, True])
def test_wait_mode_stops_cleanly_at_the_hard_deadline_with_a_checkpoint(tmp_path, overlap):
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss="wait", hard_deadline=6, every=3, overlap=overlap)
    alpha = launch(tmp, config, policies, steps=400, site="alpha", log_name="alpha.log")
    beta = launch(tmp, config, policies, steps=400, site="beta", log_name="beta.log")
    wait_for("sync 4", lambda: len(syncs(tmp, "alpha")) >= 4)
    kill_launch(tmp, beta, ["beta"])
    started = time.monotonic()
    code = finish(alpha, tmp)
    took = time.monotonic() - started
    log = tail(tmp, "alpha.log")
    assert code == 3, log  # the worker's clean StraitError exit
    assert "waiting for beta" in log, log
    assert "no payload from beta within the hard deadline of 6.0 s" in log, log
    last = syncs(tmp, "alpha")[-1]["sync"]
    held = sorted(os.listdir(os.path.join(tmp, "ckpt", "alpha")))
    assert held and held[-1].startswith(f"round-{last:08d}-"), (held, last)
    assert took < 60, took
    v = subprocess.run([AUDIT, "verify", os.path.join(tmp, "audit", "alpha.jsonl"), "--key",
                        os.path.join(tmp, "keys", "alpha.sign.pub")], capture_output=True, text=True)
    assert v.returncode == 0, v.stdout + v.stderr


def test_a_lost_worker_fails_its_site_which_restarts_and_rejoins(tmp_path):
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss="continue", workers=2)
    job = launch(tmp, config, policies, steps=250, extra=["--restarts", "1"])
    wait_for("sync 6", lambda: len(syncs(tmp, "alpha")) >= 6)
    victims = worker_pids(tmp, "alpha", rank=1)
    assert len(victims) == 1
    killed_at = time.time()
    kill9(victims)
    assert finish(job, tmp) == 0, tail(tmp)
    r = check_whole(tmp, ["alpha-0", "alpha-1", "beta-0", "beta-1"])
    assert r["alpha-0"]["resumed"] == r["alpha-1"]["resumed"] == "running"
    log = open(os.path.join(tmp, "launch.log"), errors="replace").read()
    assert "worker alpha/1 failed with status -9; restarting site 'alpha'" in log
    print(f"\nalpha (2 workers) rejoined {said(recovery_seconds(tmp, killed_at, 'alpha'))} after losing a worker")


def _border_ns(tmp):
    """The border namespace of this test's job: found from the namespace its
    worker of site 1 runs in (other jobs may have namespaces of their own)."""
    for pid in worker_pids(tmp, SITES[1][0]):
        r = subprocess.run(["ip", "netns", "identify", str(pid)], capture_output=True, text=True)
        name = r.stdout.strip()
        if name.endswith("-s1"):
            return name[:-len("-s1")] + "-wan"
    return None


@pytest.mark.skipif(os.geteuid() != 0, reason="a partition of the simulated border needs root (network namespaces)")
@pytest.mark.parametrize("mode", ["continue", "wait"])
def test_a_partition_heals_and_the_replicas_agree_again(tmp_path, mode):
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss=mode)
    job = launch(tmp, config, policies, steps=900, extra=["--wan", "1gbit-10ms"])
    wait_for("sync 5", lambda: len(syncs(tmp, "beta")) >= 5)
    ns = _border_ns(tmp)
    assert ns, subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "s1", "down"], check=True)
    cut_at = time.time()
    time.sleep(4)  # beyond peer_timeout: each side sees the other go silent
    subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "s1", "up"], check=True)
    healed_at = time.time()
    assert finish(job, tmp) == 0, tail(tmp)
    r = check_whole(tmp, ["alpha-0", "beta-0"])
    log = open(os.path.join(tmp, "launch.log"), errors="replace").read()
    if mode == "continue":
        # Both sides went on alone. When alpha is heard again in the same
        # life, beta (the side without the lowest-index site) gives way: a
        # new gateway incarnation, then the join protocol, without a restart.
        assert "is back after a silence (same incarnation" in log, tail(tmp)
        assert gave_way(log, "beta"), tail(tmp)
        joined = [s for s, _ in SITES if r[f"{s}-0"]["resumed"] == "running"]
        assert joined == ["beta"], (r, tail(tmp))
        assert "restarting site" not in log
        print(f"\n[continue] partition of {healed_at - cut_at:.1f} s; {joined[0]} agreed again "
              f"{said(recovery_seconds(tmp, healed_at, joined[0]))} after the link came back")
    else:
        alpha = syncs(tmp, "alpha")
        assert not any(s["missing"] for s in alpha), alpha
        stalled = max(b["time"] - a["time"] for a, b in zip(alpha, alpha[1:]))
        print(f"\n[wait] partition of {healed_at - cut_at:.1f} s; the longest pause between syncs was {stalled:.1f} s")


# ---------------------------------------------------------------- freezes ---
# A frozen, not dead, site (a GC pause, a slow disk, a migrated VM): SIGSTOP
# for a multiple of peer_timeout (1 s), then SIGCONT. The other site goes on
# (continue) or waits (wait); afterwards both must hold the same parameters
# again, whatever the round counters did meanwhile (issue 16, defect 4).

def gave_way(log, site):
    """Whether `site` gave way to the side holding 'alpha' (the lowest
    index), by either of the two signs that can come first: the gateway's
    parting notice, or the next sync's base digests differing from
    alpha's (seen first under load in CI)."""
    return any(line.startswith(f"[{site}/0] ") and (
        "this site gives way and fetches the state of the side with 'alpha'" in line or
        "this site's global parameters differ from those of alpha" in line) for line in log.splitlines())


def freeze(tmp, site, seconds, other):
    """SIGSTOP every worker of `site` for `seconds`, the other site running
    at full speed meanwhile (held back again after: see hold_back); the
    time it woke. Under `continue` the other site runs many rounds ahead."""
    pids = worker_pids(tmp, site)
    assert pids, tail(tmp)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    os.remove(os.path.join(tmp, f"{other}.slow"))
    try:
        time.sleep(seconds)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        hold_back(tmp, other)
    return time.time()


def agree_since(tmp, since):
    """Both sites applied a sync after `since`, and at the latest sync number
    both applied they hold the same parameters."""
    a = {s["sync"]: s["hash"] for s in syncs(tmp, "alpha") if s["time"] > since}
    b = {s["sync"]: s["hash"] for s in syncs(tmp, "beta") if s["time"] > since}
    common = set(a) & set(b)
    return bool(common) and a[max(common)] == b[max(common)]


@pytest.mark.parametrize("mode", ["continue", "wait"])
def test_frozen_sites_of_half_to_five_peer_timeouts_leave_the_replicas_identical(tmp_path, mode):
    # peer_timeout 1 s, round deadline 5 s, hard deadline 15 s: every freeze
    # here is shorter than the hard deadline, so under both modes the job
    # goes on and the sites agree again after each.
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss=mode, hard_deadline=15, round_deadline=5)
    slow = [hold_back(tmp, "alpha"), hold_back(tmp, "beta")]  # the job outlasts the freezes
    job = launch(tmp, config, policies, steps=1500)
    wait_for("sync 3", lambda: len(syncs(tmp, "beta")) >= 3 and len(syncs(tmp, "alpha")) >= 3)
    took = []
    for site, factor in [("beta", 0.5), ("beta", 1), ("beta", 2), ("beta", 5), ("alpha", 5)]:
        woke = freeze(tmp, site, factor * 1.0, "alpha" if site == "beta" else "beta")
        started = time.monotonic()
        wait_for(f"the sites to agree after {site} was frozen for {factor} s", lambda: agree_since(tmp, woke),
                 timeout=90)
        took.append(f"{site} {factor} s: {time.monotonic() - started:.1f} s")
    for path in slow:
        os.remove(path)
    assert finish(job, tmp) == 0, tail(tmp)
    check_whole(tmp, ["alpha-0", "beta-0"])
    if mode == "wait":
        alpha, beta = syncs(tmp, "alpha"), syncs(tmp, "beta")
        assert not any(s["missing"] for s in alpha + beta), tail(tmp)
    print(f"\n[{mode}] agreed again after each freeze in: " + "; ".join(took))


@pytest.mark.parametrize("mode", ["continue", "wait"])
def test_a_site_frozen_past_the_hard_deadline_rejoins_or_both_stop_with_a_named_error(tmp_path, mode):
    # 20 x peer_timeout, beyond the hard deadline (15 s): under continue alpha
    # trained alone and beta, awake, takes alpha's state; under wait both
    # sites stop with the hard deadline's error, neither trains on alone.
    tmp = str(tmp_path)
    config, policies = make_job(tmp, on_site_loss=mode, hard_deadline=15, round_deadline=5)
    slow = [hold_back(tmp, "alpha"), hold_back(tmp, "beta")]
    job = launch(tmp, config, policies, steps=1500)
    wait_for("sync 3", lambda: len(syncs(tmp, "beta")) >= 3 and len(syncs(tmp, "alpha")) >= 3)
    woke = freeze(tmp, "beta", 20.0, "alpha")
    log = os.path.join(tmp, "launch.log")
    if mode == "continue":
        wait_for("the sites to agree after beta was frozen for 20 s", lambda: agree_since(tmp, woke), timeout=90)
        for path in slow:
            os.remove(path)
        assert finish(job, tmp) == 0, tail(tmp)
        check_whole(tmp, ["alpha-0", "beta-0"])
        assert gave_way(open(log).read(), "beta"), tail(tmp)
    else:
        for path in slow:
            os.remove(path)
        assert finish(job, tmp) != 0, tail(tmp)
        text = open(log, errors="replace").read()
        assert "within the hard deadline of 15.0 s" in text, tail(tmp)
        # Neither site went on past the freeze: no sync applied after it without the other.
        assert not any(s["missing"] for s in syncs(tmp, "alpha") + syncs(tmp, "beta")), tail(tmp)
        assert not results(tmp), (results(tmp), tail(tmp))
