"""`./strait launch CONFIG [--site NAME] -- COMMAND ...`

Starts the workers of a job's sites on this machine. Each site gets its own
torch.distributed world: `workers` processes (from the config) with RANK,
WORLD_SIZE, MASTER_ADDR, MASTER_PORT, STRAIT_SITE and STRAIT_CONFIG set, the
same variables torchrun would set inside one site. Without --site every site
of the config starts here (a local simulation); with --site only that site's
workers start, for deployments where each site runs its own command in its
own country. Inside a site, MASTER_ADDR / MASTER_PORT from the environment are
kept when given (so it composes with a cluster scheduler); with every site
here, MASTER_PORT is the first site's port and each next site takes the
next port. RANK and WORLD_SIZE are per site: a worker's place in the whole
job is strait.init()'s session.job_rank of session.job_size.

Each site's own policy file (--policy SITE=PATH, or --policy PATH with
--site) reaches only that site's workers, as STRAIT_POLICY, together with
STRAIT_DATA: the dataset directories that policy lists, and no others.

With --wan PROFILE (root only) the sites run in network namespaces joined by a
simulated border: a rate-limited link with added latency (see strait/wan.py).

Output lines are prefixed with [site/rank]. If any worker fails, its output
to the last line is printed, the others are stopped (their output printed
too) and the launcher exits with that worker's status — unless
--restarts N allows that site to start again: then only its workers are
stopped and started anew with STRAIT_RESUME=1 (they rejoin the running
sites, docs/RELIABILITY.md) while the other sites go on.

--resume starts every worker with STRAIT_RESUME=1: sites take the state of
sites still running, or the newest checkpoint that every site holds.
"""

import argparse
import os
import selectors
import signal
import subprocess
import sys
import time

from .ports import free_port


def _sites(config):
    import yaml

    import strait  # noqa: F401  (loads the extension for validation)
    import torch

    try:
        torch.classes.strait.Library.validate_config(os.path.abspath(config))
    except RuntimeError as e:
        raise SystemExit(f"strait launch: {str(e).splitlines()[0]}")
    with open(config) as f:
        doc = yaml.safe_load(f)
    return [(s["name"], int(s.get("workers", 1))) for s in doc["sites"]]


def main(argv=None):
    ap = argparse.ArgumentParser(prog="strait launch", description=__doc__.splitlines()[0])
    ap.add_argument("config")
    ap.add_argument("--site", help="start only this site's workers")
    ap.add_argument("--timeout", type=float, default=0, help="stop everything after this many seconds (0: none)")
    ap.add_argument("--policy", action="append", default=[], metavar="SITE=PATH",
                    help="a site's policy file (egress, audit log, privacy, datasets); repeat per site")
    ap.add_argument("--json-log", metavar="PATH",
                    help="append one JSON object per round per site to PATH (sets STRAIT_JSON_LOG)")
    ap.add_argument("--resume", action="store_true",
                    help="continue the job: each site takes the state of sites still running, or the newest "
                         "checkpoint every site holds (sets STRAIT_RESUME=1)")
    ap.add_argument("--restarts", type=int, default=0, metavar="N",
                    help="when a worker fails, stop its site's workers and start the site again with --resume, "
                         "up to N times per site; the other sites keep running")
    ap.add_argument("--wan", metavar="PROFILE",
                    help="run the sites across a simulated border, e.g. 100mbit-150ms (needs root)")
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" is the workers' command, untouched by argparse.
    command = argv[argv.index("--") + 1:] if "--" in argv else []
    args = ap.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if not command:
        ap.error("no command: ./strait launch CONFIG [--site NAME] -- python3 train.py ...")
    sites = _sites(args.config)
    names = [n for n, _ in sites]
    if args.site and args.site not in names:
        raise SystemExit(f"strait launch: site '{args.site}' is not in {args.config}; its sites are: {', '.join(names)}")

    policies = _policies(args, names)
    border = None
    config = os.path.abspath(args.config)
    if args.wan:
        from . import wan
        if args.site:
            raise SystemExit("strait launch: --wan simulates the border between sites on this machine; with --site "
                             "the border is the real network between machines")
        try:
            border = wan.Border(args.wan, names, log=lambda m: print(f"strait launch: {m}", file=sys.stderr))
            border.__enter__()
            config = border.rewrite_config(config)
        except wan.WanError as e:
            if border is not None:
                border.close()
            raise SystemExit(f"strait launch: {e}")
    try:
        return _run(args, command, sites, config, border, policies)
    finally:
        if border is not None:
            border.close()
            print(f"strait launch: {border.summary()}", file=sys.stderr)


def _policies(args, names):
    """{site: (policy path, [dataset dirs])} from --policy arguments."""
    import yaml

    out = {}
    for item in args.policy:
        site, sep, path = item.partition("=")
        if not sep:
            if not args.site:
                raise SystemExit(f"strait launch: --policy {item}: say which site it governs (--policy SITE=PATH)")
            site, path = args.site, item
        if site not in names:
            raise SystemExit(f"strait launch: --policy {item}: '{site}' is not a site of {args.config}")
        if not os.path.exists(path):
            raise SystemExit(f"strait launch: policy file '{path}' does not exist")
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
        if doc.get("site") != site:
            raise SystemExit(f"strait launch: policy file '{path}' governs site '{doc.get('site')}', not '{site}'")
        base = os.path.dirname(os.path.abspath(path))
        data = [os.path.normpath(os.path.join(base, d)) for d in (doc.get("data") or [])]
        out[site] = (os.path.abspath(path), data)
    return out


def _run(args, command, sites, config, border, policies):
    procs = []  # (site, "site/rank", Popen), the current life of each site's workers
    sel = selectors.DefaultSelector()
    # Like torchrun: workers sharing this machine get an even share of its
    # cores for their math libraries, unless the environment says otherwise.
    started = sum(w for n, w in sites if not args.site or n == args.site)
    threads = str(max(1, (os.cpu_count() or 1) // max(1, started)))

    names = [n for n, _ in sites]

    def start_site(name, workers, resume):
        addr = os.environ.get("MASTER_ADDR", "127.0.0.1") if args.site else "127.0.0.1"
        # Each site is its own torch.distributed world: with every site on
        # this machine, MASTER_PORT (if set) is the first site's port and the
        # next sites take the ports after it.
        port = os.environ.get("MASTER_PORT")
        if port and not args.site:
            port = str(int(port) + names.index(name))
        port = port or str(free_port())
        for rank in range(workers):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(workers), MASTER_ADDR=addr, MASTER_PORT=port,
                       STRAIT_SITE=name, STRAIT_CONFIG=config)
            for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, threads)
            if args.json_log:
                env["STRAIT_JSON_LOG"] = os.path.abspath(args.json_log)
            if resume:
                env["STRAIT_RESUME"] = "1"
            # Only this site's policy and datasets; never another site's (an
            # inherited one would reach every site of a local launch).
            if not args.site:
                for var in ("STRAIT_POLICY", "STRAIT_DATA"):
                    env.pop(var, None)
            if name in policies:
                env["STRAIT_POLICY"] = policies[name][0]
                env["STRAIT_DATA"] = os.pathsep.join(policies[name][1])
            prefix = border.prefix(name) if border else []
            if border:
                env.update(border.env(name))
            p = subprocess.Popen(prefix + command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            procs.append((name, f"{name}/{rank}", p))
            sel.register(p.stdout, selectors.EVENT_READ, f"{name}/{rank}")

    for name, workers in sites:
        if not args.site or name == args.site:
            start_site(name, workers, args.resume)

    def stop(victims, sig=None, timeout=5):
        """Signals the workers still running (if sig), then waits for each,
        killing those that outlive the timeout."""
        for _, _, p in victims:
            if sig is not None and p.poll() is None:
                p.send_signal(sig)
        for _, _, p in victims:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    restarts = {name: args.restarts for name, _ in sites}
    deadline = time.monotonic() + args.timeout if args.timeout > 0 else None
    status = 0
    try:
        while any(p.poll() is None for _, _, p in procs) or sel.get_map():
            if deadline and time.monotonic() > deadline:
                print(f"strait launch: stopping after the {args.timeout:.0f} s timeout", file=sys.stderr)
                status = status or 124
                break
            for key, _ in sel.select(timeout=0.5):
                line = key.fileobj.readline()
                if not line:
                    sel.unregister(key.fileobj)
                    continue
                sys.stdout.write(f"[{key.data}] {line.decode(errors='replace')}")
                sys.stdout.flush()
            for site, tag, p in list(procs):
                if p.poll() in (None, 0):
                    continue
                code = p.returncode
                if restarts[site] > 0:
                    restarts[site] -= 1
                    print(f"strait launch: worker {tag} failed with status {code}; restarting site '{site}' with "
                          f"--resume ({args.restarts - restarts[site]} of {args.restarts})", file=sys.stderr)
                    mine = [x for x in procs if x[0] == site]
                    stop(mine, signal.SIGKILL)
                    for _, _, q in mine:
                        _drain(sel, q, procs)
                    procs[:] = [x for x in procs if x[0] != site]
                    start_site(site, dict(sites)[site], True)
                    break
                status = code if code > 0 else 128 - code
                _drain(sel, p, procs)  # its last words (the error) before ours
                print(f"strait launch: worker {tag} failed with status {code}; stopping the others",
                      file=sys.stderr)
                break
            if status:
                break
    except KeyboardInterrupt:
        status = 130
    finally:
        stop(procs, signal.SIGTERM if status else None, timeout=5 if status else 10)
        # Everything the workers wrote, to the last line: the one naming the
        # problem is often the last a failing worker writes.
        for _, _, p in procs:
            if p.stdout is not None and not p.stdout.closed:
                _drain(sel, p, procs)
        if not status:
            for _, tag, p in procs:
                if p.returncode:
                    status = p.returncode if p.returncode > 0 else 128 - p.returncode
                    print(f"strait launch: worker {tag} failed with status {p.returncode}", file=sys.stderr)
                    break
    return status


def _drain(sel, proc, procs):
    """Prints what a stopped worker still had to say and forgets its stream."""
    tag = next((t for _, t, p in procs if p is proc), "?")
    try:
        rest = proc.stdout.read()
    except (OSError, ValueError):
        rest = b""
    for line in rest.decode(errors="replace").splitlines():
        sys.stdout.write(f"[{tag}] {line}\n")
    try:
        sel.unregister(proc.stdout)
    except (KeyError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
