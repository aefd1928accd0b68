"""A real two-site job: two sites, two gloo workers each, four processes on
loopback, in every-step mode (DDP hook) and in DiLoCo mode. After training,
every worker of every site must hold bitwise-identical parameters, and the
loss must have fallen."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402  (distinct ports within this process)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from jobs import communicate_all  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
JOB_TIMEOUT_S = int(os.environ.get("STRAIT_TEST_JOB_TIMEOUT", "240"))


def write_config(tmp, mode, pipeline, extra=None):
    extra = extra or {}
    workers = extra.get("workers", 2)
    p0, p1 = free_port(), free_port()
    path = os.path.join(tmp, "job.yaml")
    with open(path, "w") as f:
        f.write(f"""job: {{id: two-site-test}}
sites:
  - {{name: hangzhou, jurisdiction: CN, endpoint: "tcp://127.0.0.1:{p0}", workers: {workers}}}
  - {{name: singapore, jurisdiction: SG, endpoint: "tcp://127.0.0.1:{p1}", workers: 2}}
{extra.get("sync") or f"sync: {{mode: {mode}}}"}
compression: {{pipeline: "{pipeline}", error_feedback: true{extra.get("rules", "")}}}
transport: {{insecure: true, heartbeat_ms: 100, peer_timeout_ms: 3000, {extra.get("transport") or "round_deadline_s: 60, hard_deadline_s: 120"}}}
""")
    return path


def run_job(mode, pipeline, steps, extra_args=(), site_args=None, expect_ok=True, extra_config=None):
    with tempfile.TemporaryDirectory(prefix="strait-two-sites-") as tmp:
        config = write_config(tmp, mode, pipeline, extra_config or None)
        procs, outs = [], []
        for site in ("hangzhou", "singapore"):
            port = free_port()
            for rank in range(2):
                out = os.path.join(tmp, f"{site}-{rank}.json")
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
                cmd = [sys.executable, os.path.join(HERE, "two_site_worker.py"), "--config", config,
                       "--site", site, "--mode", mode, "--steps", str(steps), "--out", out, *extra_args,
                       *(site_args or {}).get(site, ())]
                procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                              text=True))
                outs.append(out)
        errors = communicate_all(procs, JOB_TIMEOUT_S)
        if not expect_ok:
            return [(p.returncode, errors[i]) for i, p in enumerate(procs)]
        failed = [(i, p.returncode, errors[i][-1500:]) for i, p in enumerate(procs) if p.returncode != 0]
        assert not failed, "workers failed:\n" + "\n".join(f"#{i} rc={rc}: {e}" for i, rc, e in failed)
        return [json.load(open(o)) for o in outs]


def check(results):
    hashes = {r["hash"] for r in results}
    assert len(hashes) == 1, f"parameters differ between workers/sites: {results}"
    for r in results:
        assert r["losses"][-1] < 0.7 * r["losses"][0], (r["site"], r["losses"][0], r["losses"][-1])


def test_every_step_mode_keeps_replicas_identical_and_learns():
    check(run_job("every_step", "topk(0.1) -> int8", steps=30))


def test_diloco_mode_keeps_replicas_identical_and_learns():
    check(run_job("diloco", "int4(rounding=stochastic)", steps=40, extra_args=("--sync-every", "10")))


def test_diloco_whose_step_count_is_not_a_multiple_of_sync_every_ends_with_identical_replicas():
    # 23 steps, a sync every 5: the last 3 steps are each site's own until
    # flush(), which gives every worker the global parameters.
    results = run_job("diloco", "int8", steps=23, extra_args=("--sync-every", "5"))
    assert len({r["hash"] for r in results}) == 1, results
    assert all(r["syncs"] == 4 for r in results), results


@pytest.mark.parametrize("options", [("--bucket-view",), ("--static-graph",), ("--bucket-view", "--static-graph")],
                         ids=lambda o: "+".join(a.strip("-") for a in o))
def test_every_step_mode_works_with_ddps_bucket_view_and_static_graph(options):
    # gradient_as_bucket_view: the hook's bucket *is* the parameters' .grad
    # storage; static_graph: DDP skips its bucket rebuild bookkeeping.
    check(run_job("every_step", "topk(0.1) -> int8", steps=30, extra_args=options))


@pytest.mark.parametrize("mode,args", [("every_step", ("--compile", "--bucket-view")),
                                       ("diloco", ("--compile", "aot_eager", "--sync-every", "10"))],
                         ids=["every_step", "diloco"])
def test_a_compiled_model_trains_two_site_with_identical_replicas(mode, args):
    # torch.compile generates the forward and backward; the cross-site
    # exchange stays outside the graph (the DDP hook, DiLoCo's step). 1.7 MB
    # of parameters in 1 MB buckets: two buckets a step. Every-step mode runs
    # inductor, whose compiled backward hands DDP the buckets. DiLoCo syncs
    # parameters after the optimizer, outside any graph, whatever the
    # backend: aot_eager (the same graphs, traced but not code-generated)
    # saves the two minutes inductor's C++ compile costs four processes on 2 cores.
    results = run_job(mode, "int8", steps=30, extra_args=("--hidden", "4096", "--bucket-cap-mb", "1") + args)
    check(results)
    for r in results:
        assert r["compiled_graphs"] >= 1, r  # the model really ran compiled
        if mode == "every_step":
            assert r["buckets"] >= 2, r  # every bucket of the split graph reached the hook


def test_diloco_with_overlap_keeps_replicas_identical_and_learns():
    # Each sync's exchange runs during the next inner steps; the outer step
    # lands one round late, the same on every worker of every site.
    extra = {"sync": "sync: {mode: diloco, diloco: {sync_every: 5, outer_lr: 0.7, outer_momentum: 0.5, overlap: true}}"}
    check(run_job("diloco", "int8", steps=40, extra_config=extra))


@pytest.mark.parametrize("overlap", [False, True])
def test_streaming_diloco_syncs_one_fragment_at_a_time_and_keeps_replicas_identical(overlap):
    # Two fragments, sync_every 10: a round every 5 steps, each carrying
    # about half the model; over the run the same bytes as plain DiLoCo.
    def job(fragments):
        sync = (f"sync: {{mode: diloco, diloco: {{sync_every: 10, fragments: {fragments}, outer_lr: 0.7, "
                f"outer_momentum: 0.5, overlap: {str(overlap).lower()}}}}}")
        return run_job("diloco", "int8", steps=40, extra_config={"sync": sync})

    streamed, plain = job(2), job(1)
    check(streamed)
    for s, p in zip(streamed, plain):
        assert s["syncs"] == 8 and p["syncs"] == 4, (s["syncs"], p["syncs"])
        if s["rank"] == 0:  # the leader sends; within the per-round headers of the extra rounds
            assert abs(s["payload_bytes_sent"] - p["payload_bytes_sent"]) < 0.05 * p["payload_bytes_sent"], (s, p)


def test_a_streaming_diloco_that_is_not_flushed_is_warned_about_at_close():
    sync = "sync: {mode: diloco, diloco: {sync_every: 10, fragments: 2, overlap: true}}"
    results = run_job("diloco", "int8", steps=20, extra_config={"sync": sync}, extra_args=("--no-flush",),
                      expect_ok=False)
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    warned = [err for _, err in results if "ended without diloco.flush(): a round in flight was not applied" in err]
    assert len(warned) == 2, results  # each site's leader


def test_sparseloco_keeps_replicas_identical_learns_and_sends_fewer_bytes_than_sign_diloco():
    # SparseLoCo from the config: chunk-wise top-k (5% of each 64 values)
    # at 2 bits of an error-feedback buffer that replaces outer momentum.
    sync = "sync: {mode: diloco, diloco: {sync_every: 10, sparseloco: {density: 0.05, chunk: 64, decay: 0.95}}}"
    sparse = run_job("diloco", "int8", steps=40, extra_config={"sync": sync})
    check(sparse)
    assert {r["sparseloco"] for r in sparse} == {"topk(ratio=0.05, chunk=64) -> int2(block=256, rounding=nearest), decay 0.95"}, sparse
    sign = run_job("diloco", "sign", steps=40,
                   extra_config={"sync": "sync: {mode: diloco, diloco: {sync_every: 10, outer_momentum: 0}}"})
    check(sign)
    leaders = [r for r in sparse if r["rank"] == 0], [r for r in sign if r["rank"] == 0]
    for s, g in zip(*leaders):
        assert s["payload_bytes_sent"] < g["payload_bytes_sent"], (s, g)


def test_sparseloco_from_the_constructor_and_its_contradictions_are_errors_everywhere():
    # Turned on by strait.DiLoCo(..., sparseloco=True) under a plain DiLoCo config.
    on = run_job("diloco", "int8", steps=40, extra_args=("--sparseloco", "--sync-every", "10"))
    check(on)
    assert {r["sparseloco"] for r in on} == {"topk(ratio=0.03125, chunk=4096) -> int2(block=256, rounding=nearest), decay 0.95"}
    # ... and a constructor's outer momentum against the config's SparseLoCo.
    sync = "sync: {mode: diloco, diloco: {sparseloco: {}}}"
    results = run_job("diloco", "int8", steps=5, extra_args=("--sync-every", "5"), extra_config={"sync": sync},
                      expect_ok=False)
    assert all(rc != 0 and "SparseLoCo has no outer momentum" in err for rc, err in results), results


def test_diloco_sites_that_start_from_different_weights_all_adopt_site_0s():
    check(run_job("diloco", "int8", steps=40, extra_args=("--sync-every", "10"), site_args={"singapore": ("--seed", "7")}))


def test_diloco_takes_its_settings_and_per_parameter_rules_from_the_config():
    # Biases travel as fp32, the first layer's weight at 2 bits, the rest at
    # the default; sync_every and the outer optimizer come from the config.
    extra = {"sync": "sync: {mode: diloco, diloco: {sync_every: 10, outer_lr: 0.7, outer_momentum: 0.5}}",
             "rules": ', rules: [{match: "*.bias", pipeline: fp32}, {match: "0.weight", pipeline: "int2(rounding=stochastic)"}]'}
    check(run_job("diloco", "int4(rounding=stochastic)", steps=40, extra_config=extra))


def test_diloco_schedules_that_differ_between_sites_are_a_clear_error_everywhere():
    # The config's sync.diloco is in the fingerprint the gateways compare;
    # DiLoCo's constructor arguments can still override it on one site.
    results = run_job("diloco", "int8", steps=5, site_args={"singapore": ("--sync-every", "5")}, expect_ok=False)
    for rc, err in results:
        assert rc == 3, err[-1500:]
        assert "schedule: sync_every 5, fragments 1, overlap False" in err, err[-1500:]


def test_every_step_mode_past_the_hard_deadline_raises_a_strait_error_in_the_training_loop():
    # singapore stops after 3 steps; hangzhou (on_site_loss: wait) waits for
    # its step-4 gradients until the hard deadline. The error must reach
    # loss.backward() as a StraitError, not as DDP's "Unable to cast ... to Tensor".
    results = run_job("every_step", "int8", steps=8, site_args={"singapore": ("--steps", "3")}, expect_ok=False,
                      extra_config={"transport": "on_site_loss: wait, round_deadline_s: 2, hard_deadline_s: 4"})
    for rc, err in results[:2]:
        assert rc == 3, err[-1500:]
        assert "strait error (StraitError)" in err and "hard deadline" in err, err[-1500:]
        assert "Unable to cast" not in err, err[-1500:]
    assert all(rc == 0 for rc, _ in results[2:]), results[2:]


@pytest.mark.parametrize("mode", ["every_step", "diloco"])
def test_a_model_that_differs_between_sites_is_a_clear_error_everywhere(mode):
    results = run_job(mode, "int8", steps=5, site_args={"singapore": ("--hidden", "33")}, expect_ok=False)
    for rc, err in results:
        assert rc == 3, err[-1500:]  # StraitError, on every worker of both sites
        assert "the model differs between sites" in err, err[-1500:]


def test_a_site_running_more_workers_than_its_config_says_is_told_so_on_every_worker():
    # And the other site, which waits for it (on_site_loss: wait), hears why
    # it stopped, rather than "never connected".
    results = run_job("every_step", "int8", steps=3, expect_ok=False, extra_config={
        "workers": 1, "transport": "on_site_loss: wait, round_deadline_s: 2, hard_deadline_s: 6"})
    why = "site 'hangzhou' runs 2 workers (its process group) but the config gives it workers: 1"
    for rc, err in results[:2]:
        assert rc == 3, err[-1500:]
        assert why in err, err[-1500:]
    for rc, err in results[2:]:
        assert rc == 3, err[-1500:]
        assert "(hangzhou: stopped: " in err and why in err, err[-1500:]
