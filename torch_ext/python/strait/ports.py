"""Free TCP ports for local jobs, tests and benchmarks."""

import socket

_given = set()


def free_port(host="127.0.0.1"):
    """A port that was free a moment ago and that this process has not handed
    out before: asking twice in a row can otherwise return the same port (the
    kernel reuses a just-closed ephemeral port), and two sites of one job
    would then be given one endpoint."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _given:
            _given.add(port)
            return port
