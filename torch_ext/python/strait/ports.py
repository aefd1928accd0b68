"""Free TCP ports for local jobs, tests and benchmarks."""

import os
import random
import socket
import tempfile
import time

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


_CLAIMS = os.path.join(tempfile.gettempdir(), "strait-ports")
_CLAIM_SECONDS = 600


def _claim(port):
    """Claims `port` for this process against other processes that pick
    ports here (parallel test runs, the chaos suite beside the Python tests):
    a file per port, taken with O_EXCL; claims older than ten minutes lapse
    (by then the job that took the port has bound it, or is gone)."""
    try:
        os.makedirs(_CLAIMS, exist_ok=True)
        path = os.path.join(_CLAIMS, str(port))
        try:
            if time.time() - os.stat(path).st_mtime > _CLAIM_SECONDS:
                os.unlink(path)
        except OSError:
            pass
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        return True
    except FileExistsError:
        return False
    except OSError:
        return True  # no shared directory to claim in: bindable is all we know


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago, that this process has not handed
    out before (two sites of one job must never share an endpoint) and that
    no other process on this machine took from here in the last ten minutes.

    It is taken from just below the kernel's ephemeral range: a port from
    inside it (what binding port 0 returns) can be taken by an outgoing
    connection before the job binds it — even by a peer's own attempts to
    dial it (a local connect whose source port happens to equal the
    unbound destination port connects to itself) — which made a gateway
    fail with "Address already in use" in CI."""
    for port in _candidates(host):
        if port not in _given and _claim(port):
            _given.add(port)
            return port


def free_ports(n, host="127.0.0.1"):
    """The first of n ports in a row, each as free_port() gives one: a
    sharded job's groups listen at its site's port + 1 + the group's number."""
    for base in _candidates(host):
        run = range(base, base + n)
        if base + n > 65536 or any(p in _given for p in run) or not all(_bindable(host, p) for p in run[1:]):
            continue
        claimed = []
        for p in run:
            if not _claim(p):
                break
            claimed.append(p)
        if len(claimed) == n:
            _given.update(run)
            return base
        for p in claimed:
            try:
                os.unlink(os.path.join(_CLAIMS, str(p)))
            except OSError:
                pass


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
