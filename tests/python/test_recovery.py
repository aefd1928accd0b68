"""Checkpoint files (strait/recovery.py) in process: atomic writes, a full
disk, damaged files, and the join protocol's messages. The multi-process
scenarios (kill -9, resume, rejoin, partitions) are in tests/chaos/."""

import errno
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))

import strait  # noqa: E402
from strait import recovery  # noqa: E402


def state(round_, flat):
    return {"round": round_, "global": flat, "momentum": torch.zeros_like(flat), "local_steps": round_ * 5}


def test_checkpoints_are_named_by_round_and_digest_and_only_the_newest_are_kept(tmp_path):
    store = recovery.CheckpointStore(str(tmp_path), "alpha", every=1, keep=2)
    assert store.held() == []
    flats = [torch.full((10,), float(r)) for r in range(4)]
    for r, flat in enumerate(flats):
        store.save(r, recovery.params_digest(flat), state(r, flat))
    held = store.held()
    assert [r for r, _ in held] == [2, 3]
    assert held[-1][1] == recovery.params_digest(flats[3])
    loaded = store.load(*held[-1])
    assert torch.equal(loaded["global"], flats[3]) and loaded["local_steps"] == 15
    assert sorted(os.listdir(tmp_path / "alpha")) == [f"round-{r:08d}-{d}.pt" for r, d in held]


def test_a_full_disk_is_a_clear_error_and_keeps_the_checkpoints_already_written(tmp_path, monkeypatch):
    store = recovery.CheckpointStore(str(tmp_path), "alpha", every=1, keep=2)
    flat = torch.ones(10)
    store.save(1, recovery.params_digest(flat), state(1, flat))

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)
    other = torch.zeros(10)
    with pytest.raises(strait.StraitError, match=r"checkpoint of round 2 to .*round-00000002-.*\.pt failed: "
                                                 r"No space left on device; round 1 is the newest intact one"):
        store.save(2, recovery.params_digest(other), state(2, other))
    assert [r for r, _ in store.held()] == [1]
    assert not [n for n in os.listdir(tmp_path / "alpha") if ".tmp-" in n]
    assert torch.equal(store.load(*store.held()[0])["global"], flat)


def test_a_crash_mid_write_leaves_a_temporary_file_that_the_next_start_removes(tmp_path):
    d = tmp_path / "alpha"
    d.mkdir()
    (d / "round-00000004-0123456789abcdef.pt.tmp-999").write_bytes(b"half a checkpoint")
    store = recovery.CheckpointStore(str(tmp_path), "alpha")
    assert store.held() == [] and os.listdir(d) == []


def test_a_damaged_or_renamed_checkpoint_is_refused_naming_the_file(tmp_path):
    store = recovery.CheckpointStore(str(tmp_path), "alpha")
    flat = torch.arange(10, dtype=torch.float32)
    digest = recovery.params_digest(flat)
    path = store.save(3, digest, state(3, flat))
    # The same bytes under another round's digest: the contents do not match the name.
    wrong = store.path(3, "0" * 16)
    os.rename(path, wrong)
    with pytest.raises(strait.StraitError, match=r"does not match its digest 0000000000000000"):
        store.load(3, "0" * 16)
    with open(wrong, "r+b") as f:
        f.truncate(40)
    with pytest.raises(strait.StraitError, match=r"round-00000003-0000000000000000\.pt cannot be read"):
        store.load(3, "0" * 16)


def test_join_messages_round_trip_and_hostile_ones_name_the_sender():
    header = {"status": "running", "round": 7, "sha256": "ab"}
    h, blob = recovery.unpack(recovery.pack(header, b"\x01\x02"), "beta")
    assert h == header and blob == b"\x01\x02"
    bad = [torch.zeros(3, dtype=torch.uint8),                                   # shorter than its length
           torch.tensor([255] * 8 + [1], dtype=torch.uint8),                     # length overruns
           recovery.pack({"status": "whatever"}),                                # no valid status
           torch.tensor([4, 0, 0, 0, 0, 0, 0, 0] + list(b"{no}"), dtype=torch.uint8)]  # not JSON
    for message in bad:
        with pytest.raises(strait.StraitError, match="site 'beta' sent a join message"):
            recovery.unpack(message, "beta")
    flat, momentum = torch.arange(4, dtype=torch.float32), torch.ones(4)
    back = recovery.blob_state(recovery.state_blob({"global": flat, "momentum": momentum}), "beta", 4, 9)
    assert torch.equal(back["global"], flat) and torch.equal(back["momentum"], momentum) and back["syncs"] == 9
    with pytest.raises(strait.StraitError, match="state sent by site 'beta' has 3 bytes; a model of 4 parameters"):
        recovery.blob_state(b"abc", "beta", 4, 9)
    nan = recovery.state_blob({"global": torch.full((4,), float("nan")), "momentum": momentum})
    with pytest.raises(strait.StraitError, match="state sent by site 'beta' holds non-finite values"):
        recovery.blob_state(nan, "beta", 4, 9)
