"""`./strait gpu-check` rehearsed on the CPU: the script that a lent GPU
machine runs has never had one, so every section of it runs here with the
CPU as the "device" (gloo groups, a small model). The GPU's own figures are
not asserted (there are none here); the report's shape, the identity rows of
every codec at every size, the two-site jobs' identical replicas and the
table file are."""

import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUILD = os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build"))
CHECK = os.path.join(ROOT, "bench", "gpu", "check.py")
ENV = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"), STRAIT_BUILD_DIR=BUILD)

sys.path.insert(0, os.path.join(ROOT, "bench", "gpu"))


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run([sys.executable, CHECK, "--rehearse", "--sizes", "1,4099,65536", "--out", str(out)],
                       env=ENV, capture_output=True, text=True, timeout=600)
    return r, json.load(open(out / "gpu-check.json")), (out / "gpu-check.txt").read_text()


def test_every_section_runs_and_passes(rehearsal):
    r, report, _ = rehearsal
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    assert report["ok"] is True and report["rehearsal"] is True
    assert list(report["sections"]) == ["what runs", "identity", "GPU tests", "throughput", "job every_step",
                                        "job diloco"]
    assert all(s["ok"] for s in report["sections"].values()), report["sections"]
    assert report["info"]["torch"] == torch.__version__


def test_identity_covers_every_codec_at_every_size(rehearsal):
    import check

    _, report, _ = rehearsal
    cases = {(row["pipeline"], row["n"]) for row in report["identity"]}
    for n in (1, 4099, 65536):
        for pipeline in check.PIPELINES:
            if pipeline.startswith("lowrank") and n == 1:
                continue  # no matrix in one value
            assert (pipeline, n) in cases
    for row in report["identity"]:
        assert not row.get("error"), row
        assert row["encode_same_bytes"] and row["decode_same_bits"] and row["accumulate_same_bits"], row
    lowrank = [row for row in report["identity"] if row["pipeline"].startswith("lowrank")]
    assert [row["shape"] for row in lowrank] == [[64, 64], [256, 256]]


def test_the_jobs_end_with_identical_replicas_and_report_host_memory(rehearsal):
    _, report, _ = rehearsal
    for mode in ("every_step", "diloco"):
        job = report["jobs"][mode]
        assert job["identical"] and job["returncode"] == 0, job
        assert sorted(r["site"] for r in job["results"]) == ["a", "b"]
        for r in job["results"]:
            assert r["device"] == "cpu" and r["model_bytes"] > 0 and r["host_growth_bytes"] >= 0


def test_the_throughput_rows_name_the_issue_targets(rehearsal):
    _, report, _ = rehearsal
    t = report["throughput"]
    assert [row["case"] for row in t["rows"]] == ["int8 encode", "topk(0.01) -> int8 encode",
                                                  "int8 decode-accumulate"]
    for row in t["rows"]:
        assert row["op_gbs"] > 0 and row["torch_gbs"] > 0 and row["copy_gbs"] > 0
        assert row["case"] in t["targets"]
        # The profiler ran; with no GPU it recorded no device time.
        assert "profiler_error" not in row and row["kernels_gbs"] is None


def test_the_table_file_holds_what_was_printed(rehearsal):
    r, _, table = rehearsal
    assert table.splitlines() == [line for line in r.stdout.splitlines() if line.startswith("gpu-check")]
    assert "identity: " in table and "two-site diloco job" in table and "all checks passed" in table


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_and_without_rehearse_it_says_so_and_fails(tmp_path):
    r = subprocess.run([sys.executable, CHECK, "--out", str(tmp_path)], env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2
    assert "no GPU here" in r.stdout and "--rehearse" in r.stdout
    assert json.load(open(tmp_path / "gpu-check.json"))["ok"] is False
