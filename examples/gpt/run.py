#!/usr/bin/env python3
"""Runs the gpt example: keys (when missing), then the two-site sharded
DiLoCo job through `./strait launch` (hangzhou: 1 worker, singapore: 2,
FSDP2 inside each), then a summary: per rank the pieces it exchanged, its
sync times, bytes sent and peak memory, and whether every rank of both
sites ends with the same parameters.

    examples/gpt/run.py [--steps N] [--wan 1gbit-150ms] [--streams N] [--out DIR]
                        [--restart-after SYNC]

--restart-after K: singapore's rank 1 kills itself (SIGKILL) after sync K;
the launcher restarts singapore with --resume and it rejoins the running
job, each rank taking only its own pieces' state from hangzhou's owners.
The summary says how long that took.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SITES = (("hangzhou", 1), ("singapore", 2))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--wan", metavar="PROFILE", help="across a simulated border, e.g. 1gbit-150ms (root)")
    ap.add_argument("--streams", type=int, help="transport.streams (default: the config's, else strait's default)")
    ap.add_argument("--every-step", action="store_true",
                    help="every-step mode instead of DiLoCo: strait.fsdp_hook, each step's gradients exchanged")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "gpt"), help="results directory")
    ap.add_argument("--restart-after", type=int, metavar="SYNC",
                    help="kill singapore's rank 1 after that sync; the site restarts and rejoins")
    ap.add_argument("--build", default=os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build")))
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    marker = os.path.join(args.out, "crashed")  # train.py writes it as it kills itself
    if os.path.exists(marker):
        os.remove(marker)
    keys = os.path.join(HERE, "keys")
    for site, _ in SITES:
        if not os.path.exists(os.path.join(keys, f"{site}.key")):
            subprocess.run([os.path.join(args.build, "transport", "strait_keys"), "generate", site, "--dir", keys],
                           check=True, stdout=subprocess.DEVNULL)
    config = os.path.join(HERE, "config.yaml")
    changed = args.streams or args.every_step
    if changed:
        # The same job with another number of streams or mode: a copy next to the keys it names.
        with open(config) as f:
            text = f.read()
        if args.streams:
            text = text.replace("transport:\n", f"transport:\n  streams: {args.streams}\n", 1)
        if args.every_step:
            # The diloco section goes with the mode (the config refuses it otherwise).
            head, rest = text.split("sync:\n", 1)
            text = head + "sync:\n  mode: every_step\n" + rest[rest.index("\ncompression:"):]
        fd, config = tempfile.mkstemp(prefix=".config-", suffix=".yaml", dir=HERE)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    try:
        env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
        cmd = [sys.executable, "-m", "strait.launch", config]
        if args.wan:
            cmd += ["--wan", args.wan]
        if args.restart_after is not None:
            cmd += ["--restarts", "1"]
        cmd += ["--", sys.executable, os.path.join(HERE, "train.py"), "--steps", str(args.steps), "--width",
                str(args.width), "--layers", str(args.layers), "--out", os.path.join(args.out, "{site}-{rank}.json")]
        if args.restart_after is not None:
            cmd += ["--crash", f"singapore/1@{args.restart_after}"]
        if args.every_step:
            cmd += ["--every-step"]
        r = subprocess.run(cmd, env=env)
    finally:
        if changed:
            os.remove(config)
    if r.returncode != 0:
        raise SystemExit(f"gpt: the job failed with status {r.returncode}")
    results = [json.load(open(os.path.join(args.out, f"{s}-{k}.json"))) for s, w in SITES for k in range(w)]
    first = results[0]
    print(f"\ngpt: {first['parameters'] / 1e6:.1f}M parameters, {first['steps']} "
          + (f"steps, every-step mode (each step's exchange inside its step time)" if args.every_step else
             f"inner steps, {len(first['sync_seconds'])} syncs")
          + f"{', across ' + args.wan if args.wan else ''}"
          f"{f', {args.streams} streams' if args.streams else ''}")
    print(f"  {'rank':<13} {'holds':>8} {'groups':>6} {'step s':>7} {'sync s (each)':>18} {'sent MB':>8} {'peak RSS MB':>11}")
    for x in results:
        syncs = ", ".join(f"{s:.2f}" for s in x["sync_seconds"])
        print(f"  {x['site'] + '/' + str(x['rank']):<13} {x['local_elements'] / 1e6:>7.1f}M {x['groups']:>6} "
              f"{statistics.median(x['step_seconds']):>7.1f} {syncs:>18} {x['bytes_sent'] / 1e6:>8.1f} "
              f"{x['peak_rss_mb']:>11.0f}")
    # A sync's cost beyond compute: from the last rank reaching it to the
    # last rank done with it (a rank that arrives early waits for the others'
    # local steps, which is not the exchange's doing). Syncs every rank took
    # part in (a restarted site's ranks miss those while it was down).
    critical = []
    common = sorted(set.intersection(*(set(x["sync_ids"]) for x in results)))
    for k in common:
        walls = [x["sync_walls"][x["sync_ids"].index(k)] for x in results]
        critical.append(max(e for _, e in walls) - max(s for s, _ in walls))
    print("each sync from the last rank reaching it to the last one done: "
          + ", ".join(f"{c:.2f} s" for c in critical))
    rejoin = None
    if args.restart_after is not None:
        killed = float(open(marker).read())
        back = [x for x in results if x["resumed"] == "running"]
        if len(back) != 2:
            raise SystemExit(f"gpt: singapore's ranks did not rejoin the running job: {[x['resumed'] for x in results]}")
        rejoin = {"killed_after_sync": args.restart_after,
                  "seconds_to_rejoined": max(x["ready_wall"] for x in back) - killed,
                  "seconds_to_processes_started": min(x["started_wall"] for x in back) - killed}
        print(f"singapore killed after sync {args.restart_after}: its restarted processes began "
              f"{rejoin['seconds_to_processes_started']:.1f} s later and had joined (state of their pieces taken "
              f"from hangzhou, the waiting round done) {rejoin['seconds_to_rejoined']:.1f} s after the kill")
    print("resident memory after each sync (MB): "
          + "; ".join(f"{x['site']}/{x['rank']} " + ", ".join(f"{m:.0f}" for m in x["rss_after_sync_mb"])
                      for x in results))
    same = len({x["param_digest"] for x in results}) == 1
    print(f"every rank of both sites holds the same parameters: {'yes' if same else 'NO'}")
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump({"wan": args.wan, "streams": args.streams, "every_step": args.every_step, "identical": same, "sync_critical_seconds": critical,
                   "rejoin": rejoin, "ranks": results}, f, indent=1)
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
