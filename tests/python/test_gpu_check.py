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
    """`./strait gpu-check --rehearse`: bundles into gpu/ (the build's
    extension and its Debian libraries, as for a lent machine) and runs the
    script with it."""
    out = tmp_path_factory.mktemp("gpu-check")
    r = subprocess.run([os.path.join(ROOT, "strait"), "gpu-check", "--rehearse", "--sizes", "1,4099,65536",
                        "--out", str(out)], env=ENV, capture_output=True, text=True, timeout=600)
    return r, json.load(open(out / "gpu-check.json")), (out / "gpu-check.txt").read_text()


def device_codecs_built():
    import strait

    info = strait.build_info()
    return bool(info["cuda"]) and int(info.get("device_codecs", 0)) == 1 and "90" in info["cuda_archs"].split(",")


def test_every_section_runs_and_passes(rehearsal):
    r, report, _ = rehearsal
    assert report["rehearsal"] is True
    assert list(report["sections"]) == ["what runs", "identity", "GPU tests", "job every_step", "job diloco",
                                        "throughput"]
    sections = {k: v["ok"] for k, v in report["sections"].items()}
    # A bundle for a GPU must hold device codecs for sm_90: without the CUDA
    # toolkit here the build has none, and the rehearsal says so.
    assert sections.pop("what runs") == device_codecs_built(), (r.stdout + r.stderr)[-4000:]
    assert all(sections.values()), (r.stdout + r.stderr)[-4000:]
    assert report["ok"] is device_codecs_built() and r.returncode == (0 if device_codecs_built() else 1)
    assert report["info"]["torch"] == torch.__version__


def test_the_bundle_supplies_every_library_the_extension_needs(rehearsal):
    _, report, table = rehearsal
    info = report["info"]
    assert info["bundle"] is True and info["built_for_torch"] == torch.__version__
    assert info["library"].endswith(os.path.join("gpu", "lib", "libstrait_torch.so"))
    names = {os.path.basename(p).split(".so")[0] for p in info["libraries_from_its_folder"]}
    assert {"libstrait_torch", "libzmq", "libprotobuf", "libsodium", "libyaml-cpp"} <= names
    assert info["libraries_from_elsewhere"] == [], info["libraries_from_elsewhere"]
    assert "loaded from the bundle" in table and "NOT FROM THE BUNDLE" not in table
    if not device_codecs_built():
        assert "NO DEVICE CODECS" in table or "NOT BUILT FOR sm_90" in table


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
            # A 64-wide MLP (0.1 MiB): what strait itself holds on the host
            # while training it 40 steps (3-4 MiB measured) is bounded.
            assert r["device"] == "cpu" and r["steps"] == 40 and 0 < r["model_bytes"] < 2**20
            assert r["host_growth_bytes"] < 64 * 2**20, r


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
