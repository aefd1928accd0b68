"""Adaptive compression in real two-site jobs: replicas identical, the
chosen pipeline on record in the round log. (The controller's decisions on
given measurements are tested in C++: tests/cpp/core/codec/adaptive_test.cc.)"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def test_a_two_site_job_with_adaptive_compression_keeps_replicas_identical_and_learns():
    from test_two_sites import check, run_job

    extra = {"rules": ", adaptive: {min_density: 0.02, max_density: 0.2, min_bits: 4}"}
    check(run_job("every_step", "int8", steps=30, extra_config=extra))


def test_diloco_uses_the_controllers_pipeline_and_keeps_replicas_identical():
    # The config's pipeline is int8 (one byte per value); the controller
    # starts at its densest level, topk(0.2) -> int8: about a third of the
    # bytes, which the leaders' payload counts must show. Overlapped, in two
    # fragments, so its waits are for rounds that crossed behind inner steps.
    from test_two_sites import check, run_job

    sync = "sync: {mode: diloco, diloco: {sync_every: 10, fragments: 2, outer_lr: 0.7, outer_momentum: 0.5, " \
           "overlap: true}}"
    adaptive = run_job("diloco", "int8", steps=40, extra_config={
        "sync": sync, "rules": ", adaptive: {min_density: 0.02, max_density: 0.2, min_bits: 4}"})
    plain = run_job("diloco", "int8", steps=40, extra_config={"sync": sync})
    check(adaptive)
    for a, p in zip(adaptive, plain):
        if a["rank"] == 0:
            assert a["payload_bytes_sent"] < 0.5 * p["payload_bytes_sent"], (a, p)
