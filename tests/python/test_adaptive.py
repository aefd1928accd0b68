"""Adaptive compression: the controller's decisions on given measurements
(deterministic), and a real two-site job with it on (replicas identical, the
chosen pipeline on record in the round log)."""

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from strait.adaptive import AdaptiveCompression  # noqa: E402


def test_levels_go_from_most_to_fewest_bytes_and_respect_the_floor():
    a = AdaptiveCompression(min_density=0.01, max_density=0.08, min_bits=4)
    assert a.pipeline == "topk(0.08) -> int8"  # starts with the most bytes
    densities = {d for d, _ in a.levels}
    assert densities == {0.08, 0.04, 0.02, 0.01}
    assert {b for _, b in a.levels} == {8, 4}  # never below min_bits
    cost = [d * (b + __import__("math").log2(1 / d) + 2) for d, b in a.levels]
    assert cost == sorted(cost, reverse=True)


def test_a_slow_exchange_makes_it_sparser_down_to_the_floor_and_a_fast_one_denser():
    a = AdaptiveCompression(min_density=0.01, max_density=0.08, min_bits=4)
    a.update(0.010, 0.050)  # the latency floor: 10 ms
    notes = []
    for _ in range(40):  # 40 ms beyond latency against 50 ms of compute: too much
        notes.append(a.update(0.050, 0.050))
    assert a.pipeline == "topk(0.01) -> int4"  # the floor, and it stays there
    changes = [n for n in notes if n]
    assert notes[:2] == [None, None]  # it waits for `patience` (3) steps of evidence
    assert changes[0].startswith("topk(0.08) -> int8 -> ") and "more than a tenth" in changes[0]
    assert len(changes) == len(a.levels) - 1 and notes[-1] is None
    for _ in range(40):  # nothing beyond latency: send more again
        a.update(0.010, 0.050)
    assert a.pipeline == "topk(0.08) -> int8"


def test_alternating_evidence_does_not_make_it_flip():
    a = AdaptiveCompression(min_density=0.01, max_density=0.08)
    a.update(0.010, 0.050)
    for k in range(30):
        assert a.update(0.050 if k % 2 else 0.010, 0.050) is None


def test_between_the_thresholds_it_holds():
    a = AdaptiveCompression(min_density=0.01, max_density=0.08)
    a.update(0.010, 0.100)
    a.level = 2
    assert a.update(0.015, 0.100) is None  # 5 ms beyond latency: between 2.5 and 10 ms
    assert a.level == 2


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="min_density"):
        AdaptiveCompression(min_density=0.5, max_density=0.1)
    with pytest.raises(ValueError, match="min_bits"):
        AdaptiveCompression(min_bits=3)


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
