"""strait.ports.free_port: distinct ports, outside the kernel's ephemeral
range (where outgoing connections could take them before a job binds)."""

import os
import socket
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "torch_ext", "python"))
from strait import ports  # noqa: E402


def test_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    lo, _ = ports._ephemeral_range()
    got = [ports.free_port() for _ in range(50)]
    assert len(set(got)) == len(got)
    if lo - max(1024, lo - 12000) >= 1000:
        assert all(p < lo for p in got), (lo, got)
    for p in got[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))

