"""Free TCP ports for local jobs, tests and benchmarks."""

import random
import socket

_given = set()
_rng = random.SystemRandom()  # not the global generator, which programs seed


def _ephemeral_range():
    """The kernel's range for the source ports of outgoing connections."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def _bindable(host, port):
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago and that this process has not handed
    out before (two sites of one job must never share an endpoint).

    It is taken from just below the kernel's ephemeral range: a port from
    inside it (what binding port 0 returns) can be taken by an outgoing
    connection before the job binds it — even by a peer's own attempts to
    dial it (a local connect whose source port happens to equal the
    unbound destination port connects to itself) — which made a gateway
    fail with "Address already in use" in CI."""
    for port in _candidates(host):
        if port not in _given:
            _given.add(port)
            return port


def _candidates(host):
    """Bindable ports: random ones just below the ephemeral range, then (no
    room there, or all tried were busy) whatever the kernel gives."""
    lo, _ = _ephemeral_range()
    first = max(1024, lo - 12000)
    if lo - first >= 1000:
        for _ in range(200):
            port = _rng.randint(first, lo - 1)
            if _bindable(host, port):
                yield port
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            yield s.getsockname()[1]
