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



def test_processes_picking_ports_at_once_never_get_the_same_one():
    # The chaos suite runs beside the Python tests, each in processes of its
    # own: a port one process picked (and has not bound yet) is not handed
    # to another (CI: "cannot listen on tcp://127.0.0.1:25723: Address
    # already in use" in a tutorial test).
    import subprocess
    code = ("import sys; sys.path.insert(0, %r); from strait.ports import free_port; "
            "print(' '.join(str(free_port()) for _ in range(300)))"
            % os.path.join(os.path.dirname(__file__), "..", "..", "torch_ext", "python"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    picked = [set(map(int, p.communicate(timeout=120)[0].split())) for p in procs]
    assert all(len(s) == 300 for s in picked)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not picked[i] & picked[j], (i, j, sorted(picked[i] & picked[j]))
