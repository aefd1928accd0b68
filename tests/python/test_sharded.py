"""The pieces of an FSDP2-sharded model inside one site (issue 14 item 1's
building block, core/shards.h): real processes, a real gloo group, real
fully_shard. Each rank's owned pieces come together whole and equal to the
full parameters, the results go back into every rank's shard, and the
split FSDP2 made is the one strait computes."""

import json
import os
import subprocess
import sys
import tempfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))

torch = pytest.importorskip("torch")
pytest.importorskip("torch.distributed.fsdp")
import strait  # noqa: E402,F401

TIMEOUT_S = 180


def run_site(world, piece):
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for rank in range(world):
            out = os.path.join(tmp, f"rank{rank}.json")
            procs.append((out, subprocess.Popen(
                [sys.executable, os.path.join(HERE, "sharded_worker.py"), "--store", os.path.join(tmp, "store"),
                 "--rank", str(rank), "--world", str(world), "--piece", str(piece), "--out", out],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
        results = []
        for out, p in procs:
            try:
                text, _ = p.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for _, q in procs:
                    q.kill()
                raise
            assert p.returncode == 0, text
            with open(out) as f:
                results.append(json.load(f))
        return results


@pytest.mark.parametrize("world", [2, 3])
def test_owned_pieces_come_together_whole_and_results_reach_every_shard(world):
    results = run_site(world, piece=4)
    for r in results:
        assert r["world"] == world
        assert r["gathered_right"], r
        assert r["scattered_right"], r
    # Every piece has exactly one owner in the site, and every rank holds part
    # of the model (the split is FSDP2's, not one of strait's own).
    owned = sorted(k for r in results for k in r["owned"])
    assert owned == list(range(results[0]["pieces"]))
    assert all(r["local_elements"] > 0 for r in results)


def test_a_shard_that_is_not_fsdp2s_is_a_clear_error():
    pieces = torch.classes.strait.ShardedPieces([[6, 4], [3]], 4, None)
    assert pieces.world() == 1 and list(pieces.owned()) == list(range(len(pieces.pieces())))
    with pytest.raises(Exception, match=r"parameter 0 has 20 elements on rank 0, but FSDP2's Shard\(0\) of its 24 "
                                        r"elements \(6 rows\) over 1 ranks gives it 24"):
        pieces.gather([torch.zeros(5, 4), torch.zeros(3)])
    # A site of one rank owns every piece whole: gather is the parameters.
    a, b = torch.randn(6, 4), torch.randn(3)
    got = pieces.gather([a, b])
    assert torch.equal(torch.cat(got), torch.cat([a.reshape(-1), b]))
