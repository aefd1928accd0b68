"""Waiting for the processes of a test job: every process gets until one
deadline, and whatever they wrote to stderr comes back, also for those
that had to be killed."""

import subprocess
import time


def communicate_all(procs, timeout_s):
    """Waits for every process (one deadline for all), kills the ones still
    running; returns each one's stderr, in order."""
    deadline = time.monotonic() + timeout_s
    errors = []
    try:
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                err = f"(did not finish within {timeout_s} s)"
            errors.append(err)
    finally:
        for p in procs:
            p.kill()
        for i, p in enumerate(procs):
            if i >= len(errors):
                errors.append(p.communicate()[1])
    return errors
