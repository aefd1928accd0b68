#!/usr/bin/env python3
"""`./strait bench e2e [--json]`: the same training job across a simulated
border (default 100 Mbit/s, 150 ms round trip), run several ways, side by
side. By default, *time to quality*: every method trains for the same
wall-clock budget (what DDP needs for 200 steps; `--budget` sets it), and the
table reports the held-out loss each reached and when each first reached
DDP's final held-out loss; the plot is held-out loss against time and
against bytes. `--steps N`: the older table, every method N steps.
`--quick`: time to quality in seconds, a test of the output only.

  (a) ddp       torch DDP, one gloo world spanning both sites, uncompressed
  (b) powersgd  torch DDP with PyTorch's PowerSGD hook (rank 4, error feedback)
  (c) strait    strait every-step mode, the config's topk -> int8, error feedback
  (d) diloco    strait DiLoCo, low-bit pseudo-gradients every H steps
  (e) overlap   the same, each exchange overlapped with the next H inner steps
                (only with --only: streaming overlaps as well)
  (f) streaming the same in F fragments, one syncing every H/F steps, overlapped
  (g) sparseloco strait SparseLoCo: chunk-wise top-k at 2 bits of an error-feedback
                buffer that replaces outer momentum, every H steps
  (-) alone     each site's compute only, no communication (the time floor)

The job: examples/charlm's byte-level transformer (471k parameters), each site
its own licence texts, one worker per site, AdamW, the same seed and batches.
Bytes are counted by the border itself (IP bytes, both directions, headers
included). Quality is scored on both sites' held-out text. Needs root (network
namespaces and tc); prints a table, writes a PNG, and with --json one object.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402  (distinct ports within this process)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
sys.path.insert(0, os.path.join(ROOT, "examples", "charlm"))

SITES = (("hangzhou", "CN"), ("singapore", "SG"))
RUNS = [("ddp", "(a) torch DDP, fp32"), ("powersgd", "(b) DDP + PowerSGD hook"),
        ("strait", "(c) strait every-step"), ("diloco", "(d) strait DiLoCo"),
        ("overlap", "(e) strait DiLoCo, overlapped"), ("streaming", "(f) streaming DiLoCo, overlapped"),
        ("sparseloco", "(g) strait SparseLoCo"), ("alone", "compute alone")]


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def write_config(out, args):
    path = os.path.join(out, "e2e.yaml")
    lines = ["job: {id: e2e}", "sites:"]
    for i, (site, jur) in enumerate(SITES):
        lines += [f"  - {{name: {site}, jurisdiction: {jur}, endpoint: \"tcp://127.0.0.1:{7700 + i}\", workers: 1, "
                  f"public_key: keys/{site}.pub, secret_key: keys/{site}.key}}"]
    lines += ["sync: {mode: every_step}",
              f'compression: {{pipeline: "{args.every_step_pipeline}", error_feedback: true, seed: 1}}',
              "transport: {round_deadline_s: 120, hard_deadline_s: 300}"]
    every_step = "\n".join(lines) + "\n"
    if args.adaptive:
        every_step = every_step.replace("error_feedback: true, seed: 1}",
                                        f"error_feedback: true, seed: 1, adaptive: {{{args.adaptive}}}}}")
    with open(path, "w") as f:
        f.write(every_step)
    diloco = os.path.join(out, "e2e-diloco.yaml")
    adaptive = f", adaptive: {{{args.adaptive}}}" if args.adaptive else ""
    with open(diloco, "w") as f:
        f.write("\n".join(lines).replace(
            "sync: {mode: every_step}",
            f"sync: {{mode: diloco, diloco: {{sync_every: {args.sync_every}, outer_lr: {args.outer_lr}, "
            f"outer_momentum: {args.outer_momentum}, nesterov: {str(args.nesterov).lower()}}}}}").replace(
            f'pipeline: "{args.every_step_pipeline}", error_feedback: true, seed: 1}}',
            f'pipeline: "{args.diloco_pipeline}", error_feedback: true, seed: 1, rules: [{{match: "*bias", '
            f'pipeline: "{args.diloco_small}"}}, {{match: "*norm*", pipeline: "{args.diloco_small}"}}, '
            f'{{match: "position", pipeline: "{args.diloco_small}"}}]{adaptive}}}') + "\n")
    overlap = os.path.join(out, "e2e-overlap.yaml")
    streaming = os.path.join(out, "e2e-streaming.yaml")
    for name, fragments in ((overlap, 1), (streaming, args.fragments)):
        with open(diloco) as f, open(name, "w") as g:
            g.write(f.read().replace("diloco: {", f"diloco: {{overlap: true, fragments: {fragments}, "))
    # SparseLoCo fixes every tensor's pipeline and has no outer momentum
    # (and no adaptive compression): its own sync line, the same H.
    sparseloco = os.path.join(out, "e2e-sparseloco.yaml")
    with open(sparseloco, "w") as f:
        f.write("\n".join(lines).replace(
            "sync: {mode: every_step}",
            f"sync: {{mode: diloco, diloco: {{sync_every: {args.sync_every}, sparseloco: {{{args.sparseloco}}}}}}}")
            + "\n")
    return path, diloco, overlap, streaming, sparseloco


# Runs whose step is bound by the link, not the CPU (DDP's step here is
# 0.069 s of compute in 0.69 s): time to quality runs them side by side,
# each across a border of its own, unless --sequential.
LINK_BOUND = ("ddp", "powersgd", "strait")


def run_mode(mode, args, out, configs, steps=None, snapshot_at=(), period=1, budget=None):
    """Runs `mode` across a border of its own. With `budget` (a callable
    giving the seconds each run trains, or None while they are not yet
    known), the run trains until site 0 has trained that long, then stops
    at the next period's end that neither site has reached (the workers read
    it from a stop file); `steps` is then only a cap."""
    from strait import wan

    steps = steps or args.steps
    results = []
    samples = []  # (time, bytes crossed so far)
    for name in [f"{mode}-rounds.jsonl", f"{mode}.stop"] + [f"{mode}-{site}.{kind}" for site, _ in SITES
                                                            for kind in ("json", "progress")]:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))
    stop_file = os.path.join(out, f"{mode}.stop")
    progress = [os.path.join(out, f"{mode}-{site}.progress") for site, _ in SITES]
    tag = f"{os.getpid() % 100000}-{[m for m, _ in RUNS].index(mode)}"  # runs side by side: borders of their own
    with wan.Border(args.wan, [s for s, _ in SITES], log=lambda m: None, tag=tag, sysctls=args.site_sysctl) as border:
        config = None
        if mode in configs:
            config = border.rewrite_config(configs[mode], out)
        port = free_port()
        procs = []
        for i, (site, _) in enumerate(SITES):
            env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"), OMP_NUM_THREADS="1",
                       OPENBLAS_NUM_THREADS="1", **border.env(site))
            if mode in ("ddp", "powersgd"):  # one world across the border
                env.update(RANK=str(i), WORLD_SIZE="2", MASTER_ADDR=border.site_addr(0), MASTER_PORT=str(port))
            else:
                env.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            res = os.path.join(out, f"{mode}-{site}.json")
            env["STRAIT_JSON_LOG"] = os.path.join(out, f"{mode}-rounds.jsonl")
            cmd = border.prefix(site) + [sys.executable, os.path.join(HERE, "worker.py"), "--mode", mode, "--site",
                                         site, "--site-index", str(i), "--steps", str(steps), "--out", res,
                                         "--period", str(period), "--progress", progress[i],
                                         "--snapshot-at", ",".join(f"{t:g}" for t in snapshot_at)]
            if budget:
                cmd += ["--stop-file", stop_file]
            if config:
                cmd += ["--config", config]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=None if i == 0 else subprocess.PIPE, text=True))
            results.append(res)
        done = threading.Event()

        def sample():
            while not done.is_set():
                b = border.snapshot()
                if b is not None:
                    samples.append((time.time(), b))
                done.wait(0.25)

        stop_failed = []

        def stop():
            try:
                while not done.wait(0.05):
                    seconds, where = budget(), [read_progress(p) for p in progress]
                    if seconds is None or None in where or time.time() - where[0][0] < seconds:
                        continue
                    # Past the furthest site (DiLoCo's sites wait for each other
                    # at syncs, overlapped ones a period later; DDP and
                    # every-step go in step) by what it makes in half a second
                    # (at least 2 steps: this thread may be slow to write),
                    # rounded up to the period: a step neither site reached.
                    start, end, furthest = max(where, key=lambda w: w[2])
                    margin = max(2, math.ceil(0.5 * furthest / max(end - start, 1e-3)))
                    at = -(-(furthest + margin) // period) * period
                    with open(stop_file + ".tmp", "w") as f:
                        f.write(str(at))
                    os.replace(stop_file + ".tmp", stop_file)
                    return
            except Exception as e:  # the run would train on to its timeout: end it now, saying why
                stop_failed.append(repr(e))
                for p in procs:
                    p.kill()

        threads = [threading.Thread(target=sample, daemon=True)]
        if budget:
            threads.append(threading.Thread(target=stop, daemon=True))
        for t in threads:
            t.start()
        deadline = time.monotonic() + args.timeout
        failed = None
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                failed = f"did not finish within {args.timeout} s"
                break
            if p.returncode != 0:
                failed = f"worker failed ({p.returncode}): {(err or '')[-1500:]}"
                break
        done.set()
        for t in threads:
            t.join()
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if stop_failed:
            raise SystemExit(f"bench e2e: {mode}: stopping the run at the budget failed: {stop_failed[0]}")
        if failed:
            raise SystemExit(f"bench e2e: {mode}: {failed}")
    data = [json.load(open(r)) for r in results]
    return data, border.total_bytes(), samples


def read_progress(path):
    """(training start, last step's end, steps done) from a worker's
    progress file, or None before its first step."""
    try:
        with open(path) as f:
            start, end, done = f.read().split()
        return float(start), float(end), int(done)
    except (OSError, ValueError):
        return None


def score(model_path, batches=8):
    """Mean held-out bits per byte and next-byte accuracy over both sites' texts."""
    import torch
    import torch.nn as nn
    import train as charlm

    m = charlm.CharLM()
    m.load_state_dict(torch.load(model_path))
    bpb, acc = [], []
    with torch.no_grad():
        for site, _ in SITES:
            held = charlm.site_text(site)[1]
            g = torch.Generator().manual_seed(1234)
            loss = correct = total = 0.0
            for _ in range(batches):
                x, y = charlm.batch(held, 32, m.context, g)
                logits = m(x)
                loss += nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)).item()
                correct += (logits.argmax(-1) == y).sum().item()
                total += y.numel()
            bpb.append(loss / batches / math.log(2))
            acc.append(correct / total)
    return sum(bpb) / len(bpb), sum(acc) / len(acc)


def plot(path, runs, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_bytes, by_time) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        losses = r["curve"]["loss"]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        if r["name"] != "alone":
            by_bytes.plot([max(b, 1) / 1e6 for b in r["curve"]["bytes"]], smooth, label=r["label"])
        by_time.plot(r["curve"]["seconds"], smooth, label=r["label"])
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("MB crossed the border (IP bytes, log scale)")
    by_time.set_xlabel("wall time (s)")
    for ax in (by_bytes, by_time):
        ax.set_ylabel("training loss (nats/byte, 10-step mean)")
        ax.legend()
    fig.suptitle(f"charlm across a simulated {args.wan} border, {args.steps} steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def written(path, everything, summary, as_json):
    """Writes every figure to path; with --json prints the summary and says
    the table is not wanted."""
    with open(path, "w") as f:
        json.dump(everything, f)
    if as_json:
        print(json.dumps(summary))
    return as_json


def bytes_at(samples, t):
    before = [b for when, b in samples if when <= t]
    return before[-1] if before else 0


def score_all(paths, batches, timeout):
    """Scores the models at `paths`, two at a time (the machine's two cores;
    scoring starts after every run has ended), and removes them; a scorer
    that dies or hangs fails the bench after `timeout` seconds."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(2, initializer=_one_thread) as pool:
        try:
            scores = pool.starmap_async(score, [(p, batches) for p in paths]).get(timeout=timeout)
        except multiprocessing.TimeoutError:
            raise SystemExit(f"bench e2e: scoring {len(paths)} snapshots did not finish within {timeout:.0f} s")
    for p in paths:
        os.remove(p)
    return dict(zip(paths, scores))


def _one_thread():
    import torch

    torch.set_num_threads(1)


def time_to_quality(args, out, configs, modes):
    """Every method trains for the same wall-clock budget across the border:
    what DDP takes for 200 steps (or --budget). DDP runs its 200 steps; every
    other run trains until it has had the budget and then stops at its next
    sync (a stop file the driver writes; no pilot runs). Site 0 keeps a
    snapshot of its model at marks that are dense early (every 3 s to 30 s,
    then every 10 s; DiLoCo: the first sync at or after each). Each
    snapshot's held-out loss, against the time and the bytes that had
    crossed by then, gives the curves, the loss at the budget and the time
    each method first reached DDP's final held-out loss."""
    quick = args.quick
    if quick:
        marks = [0.5 * k for k in range(1, 240)]
    else:
        marks = [3.0 * k for k in range(1, 10)] + [30.0 + 10 * k for k in range(180)]
    diloco_like = ("diloco", "overlap", "streaming", "sparseloco")
    ddp_steps = 4 if quick else 200
    if not args.budget and "ddp" not in modes:
        raise SystemExit("bench e2e: without the ddp run, say --budget SECONDS")
    budget_s = [args.budget]
    labels = dict(RUNS)
    ddp_progress = os.path.join(out, f"ddp-{SITES[0][0]}.progress")
    if os.path.exists(ddp_progress):  # an earlier bench's, not to be read as this one's
        os.remove(ddp_progress)

    def budget_now():
        """The seconds every run trains: --budget, or DDP's time for its
        steps as soon as it has made them (None before)."""
        if budget_s[0] is None:
            p = read_progress(ddp_progress)
            if p and p[2] >= ddp_steps:
                return p[1] - p[0]
        return budget_s[0]

    def budget_run(mode, beside):
        """Trains `mode` for the budget; its snapshots are scored later, so
        that scoring does not share the CPU with runs still training."""
        label = labels[mode]
        period = args.sync_every if mode in diloco_like else 1
        timed = mode != "ddp" or args.budget
        log(f"bench e2e: {label} across {args.wan}, " +
            (f"{ddp_steps} steps (the budget is the time they take)" if not timed else
             f"{budget_s[0]:.0f} s" if budget_s[0] else "as long as DDP's 200 steps take") +
            (f", beside {', '.join(labels[m] for m in beside)}" if beside else "") + " ...")
        try:
            data, total, samples = run_mode(mode, args, out, configs, steps=10 ** 7 if timed else ddp_steps,
                                            snapshot_at=marks, period=period,
                                            budget=budget_now if timed else None)
        finally:
            if not timed:  # DDP's time for its steps is every run's budget (0: DDP failed, stop the others)
                budget_s[0] = budget_now() or 0
        return {"mode": mode, "beside": beside, "data": data, "total": total, "samples": samples}

    def score_run(raw, scores):
        mode, total, samples = raw["mode"], raw["total"], raw["samples"]
        site0 = raw["data"][0]
        steps, start, end = len(site0["ends"]), site0["start"], site0["ends"][-1]
        points = []  # (seconds, bytes, held-out bpb, accuracy, step)
        for step, when in site0["snapshots"]:
            bpb, acc = scores[os.path.join(out, f"{mode}-{SITES[0][0]}.json.snap{step}.pt")]
            points.append((when - start, bytes_at(samples, when), bpb, acc, step))
        bpb, acc = scores[os.path.join(out, f"{mode}-{SITES[0][0]}.json.model.pt")]
        points.append((end - start, total, bpb, acc, steps))
        # A run stops at its first sync past the budget: what it held at the
        # budget is read from its curve (the last point within it).
        within = [p for p in points if p[0] <= budget * 1.02] or points[:1]
        return {"name": mode, "label": labels[mode], "steps": steps, "step_s": (end - start) / steps,
                "beside": raw["beside"],
                "at_budget": {"seconds": within[-1][0], "bytes": within[-1][1],
                              "held_out_bits_per_byte": within[-1][2], "held_out_accuracy": within[-1][3]},
                "seconds": end - start, "bytes_total": total, "held_out_bits_per_byte": bpb,
                "held_out_accuracy": acc, "final_loss": sum(site0["losses"][-10:]) / min(10, steps),
                "curve": [{"seconds": t, "bytes": b, "held_out_bits_per_byte": q, "held_out_accuracy": a,
                           "step": k} for t, b, q, a, k in points]}

    # DDP first (its time is the budget), the link-bound runs beside it.
    order = sorted(modes, key=lambda m: m != "ddp")
    together = [] if args.sequential else [m for m in LINK_BOUND if m in modes]
    raws = {}
    if len(together) > 1:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(together)) as pool:
            futures = {m: pool.submit(budget_run, m, [o for o in together if o != m]) for m in together}
            raws = {m: f.result() for m, f in futures.items()}
    for m in order:
        if m not in raws:
            raws[m] = budget_run(m, [])
    budget = budget_s[0]
    log(f"bench e2e: scoring {sum(len(r['data'][0]['snapshots']) + 1 for r in raws.values())} snapshots ...")
    scores = score_all([os.path.join(out, f"{m}-{SITES[0][0]}.json.{name}") for m, r in raws.items()
                        for name in [f"snap{k}.pt" for k, _ in r["data"][0]["snapshots"]] + ["model.pt"]],
                       batches=2 if quick else 8, timeout=args.timeout)
    runs = [score_run(raws[m], scores) for m, _ in RUNS if m in modes]
    base = next((r for r in runs if r["name"] == "ddp"), None)
    target = base["held_out_bits_per_byte"] if base else None
    for r in runs:
        reached = [p["seconds"] for p in r["curve"] if target is not None and p["held_out_bits_per_byte"] <= target]
        r["seconds_to_ddp_final"] = reached[0] if reached else None  # None: never within the budget
    for r in runs:
        if base and r["seconds_to_ddp_final"]:
            r["times_sooner_than_ddp"] = base["seconds_to_ddp_final"] / r["seconds_to_ddp_final"]
        if base:
            r["bytes_ratio_vs_ddp"] = base["bytes_total"] / r["bytes_total"] if r["bytes_total"] else None
    png = os.path.join(out, "e2e-time-to-quality.png")
    plot_quality(png, runs, args, budget)
    result = {"wan": args.wan, "site_sysctls": args.site_sysctl, "budget_s": budget, "budget_from": "--budget" if args.budget else f"ddp, {ddp_steps} steps",
              "sync_every": args.sync_every,
              "ddp_final_held_out_bits_per_byte": target, "parameters": json.load(open(os.path.join(
                  out, f"{runs[0]['name']}-{SITES[0][0]}.json")))["parameters"], "plot": png,
              "runs": runs}
    if written(os.path.join(out, "e2e-time-to-quality.json"), result, result, args.json):
        return
    print(f"charlm ({result['parameters']} parameters), two sites of one worker, {budget:.0f} s each "
          f"across {args.wan}; DDP's final held-out loss {target if target is None else f'{target:.3f}'} bits/byte")
    print(f"{'run':<31}{'steps':>7}{'s/step':>8}{'ran s':>7}{'MB crossed':>11}{'held bpb':>9}{'acc %':>7}"
          f"{'to DDP final':>13}{'x sooner':>9}   (bpb, acc and MB at the budget)")
    for r in runs:
        to = r["seconds_to_ddp_final"]
        b = r["at_budget"]
        print(f"{r['label'] + (' *' if r['beside'] else ''):<31}{r['steps']:7d}{r['step_s']:8.3f}{r['seconds']:7.0f}{b['bytes'] / 1e6:11.2f}"
              f"{b['held_out_bits_per_byte']:9.3f}{100 * b['held_out_accuracy']:7.1f}"
              f"{'never' if to is None else f'{to:.1f} s':>13}"
              f"{r.get('times_sooner_than_ddp', float('nan')):9.1f}")
    if any(r["beside"] for r in runs):
        print("* ran side by side (link-bound: each across its own border, sharing the CPU; --sequential: one at "
              "a time)")
    print(f"plot: {png}; every figure: {os.path.join(out, 'e2e-time-to-quality.json')}")


def plot_quality(path, runs, args, budget):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_bytes) = plt.subplots(1, 2, figsize=(12, 4.5))
    for r in runs:
        t = [p["seconds"] for p in r["curve"]]
        q = [p["held_out_bits_per_byte"] for p in r["curve"]]
        by_time.plot(t, q, marker=".", label=r["label"])
        if r["name"] != "alone":
            by_bytes.plot([max(p["bytes"], 1) / 1e6 for p in r["curve"]], q, marker=".", label=r["label"])
    base = next((r for r in runs if r["name"] == "ddp"), None)
    for ax in (by_time, by_bytes):
        if base:
            ax.axhline(base["held_out_bits_per_byte"], color="grey", linestyle=":", linewidth=1)
        ax.set_ylabel("held-out loss (bits per byte)")
        ax.legend(fontsize=8)
    by_time.set_xlabel("wall time (s)")
    by_bytes.set_xscale("log")
    by_bytes.set_xlabel("MB crossed the border (IP bytes, log scale)")
    fig.suptitle(f"charlm across a simulated {args.wan} border, {budget:.0f} s a method")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def sharded(args, out):
    """examples/gpt across the border: DiLoCo with 1 stream and with the
    default (each sync from the last rank reaching it to the last one done:
    what the exchange adds to the slowest site's compute), then every-step
    mode (strait.fsdp_hook, default streams: each step's exchange inside its
    step time); bytes and memory per rank, whether the replicas are
    identical. --quick: a model of width 64 and 2 blocks (the schema, in
    seconds)."""
    rows = []
    for mode, streams in (("diloco", 1), ("diloco", None), ("every_step", None)):
        tag = f"gpt-{mode}-{streams or 'default'}-streams"
        log(f"bench e2e: examples/gpt sharded, {mode}, {streams or 'the default number of'} stream(s) across "
            f"{args.wan} ...")
        cmd = [sys.executable, os.path.join(ROOT, "examples", "gpt", "run.py"), "--wan", args.wan, "--out",
               os.path.join(out, tag), "--build", args.build]
        if streams:
            cmd += ["--streams", str(streams)]
        if mode == "every_step":
            cmd += ["--every-step", "--steps", "3"]
        if args.quick:
            cmd += ["--width", "64", "--layers", "2"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
        if r.returncode != 0:
            raise SystemExit(f"bench e2e: examples/gpt failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
        summary = json.load(open(os.path.join(out, tag, "summary.json")))
        ranks = summary["ranks"]
        row = {"mode": mode, "streams": streams or "default", "identical": summary["identical"],
               "parameters": ranks[0]["parameters"], "steps": ranks[0]["steps"],
               "median_step_s": {f"{x['site']}/{x['rank']}": statistics.median(x["step_seconds"]) for x in ranks},
               "rss_peak_mb": {f"{x['site']}/{x['rank']}": x["peak_rss_mb"] for x in ranks}}
        if mode == "diloco":
            row.update({"syncs": len(summary["sync_critical_seconds"]),
                        "sync_critical_s": summary["sync_critical_seconds"],
                        "bytes_per_sync": {f"{x['site']}/{x['rank']}": x["bytes_sent"] / max(1, len(x["sync_seconds"]))
                                           for x in ranks},
                        "rss_after_last_sync_mb": {f"{x['site']}/{x['rank']}": x["rss_after_sync_mb"][-1]
                                                   for x in ranks}})
        else:
            row["bytes_per_step"] = {f"{x['site']}/{x['rank']}": x["bytes_sent"] / max(1, x["steps"]) for x in ranks}
        rows.append(row)
    result = {"wan": args.wan, "sharded": rows}
    if written(os.path.join(out, "e2e-sharded.json"), result, result, args.json):
        return
    print(f"examples/gpt ({rows[0]['parameters'] / 1e6:.1f}M parameters, FSDP2: 1 rank + 2 ranks) across {args.wan}")
    print(f"{'mode':<12}{'streams':<9}{'median step s, per rank':>26}{'each sync (critical path), s':>30}"
          f"{'MB per sync or step, per rank':>32}{'identical':>11}")
    for row in rows:
        steps = ", ".join(f"{v:.2f}" for v in row["median_step_s"].values())
        crit = ", ".join(f"{c:.2f}" for c in row.get("sync_critical_s", [])) or "(inside each step)"
        sent = ", ".join(f"{v / 1e6:.1f}" for v in row.get("bytes_per_sync", row.get("bytes_per_step", {})).values())
        print(f"{row['mode']:<12}{str(row['streams']):<9}{steps:>26}{crit:>30}{sent:>32}"
              f"{'yes' if row['identical'] else 'NO':>11}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", required=True)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--wan", default=None,
                    help="border profile (default 100mbit-150ms; with --sharded 1gbit-150ms)")
    ap.add_argument("--sharded", action="store_true",
                    help="instead: examples/gpt's 100M-parameter model sharded with FSDP2 (a site of 1 rank, one "
                         "of 2), each sync's time with 1 stream and with the default")
    ap.add_argument("--steps", type=int, default=None,
                    help="the equal-steps table: every method trains this many steps (default: time to quality)")
    ap.add_argument("--budget", type=float, default=None,
                    help="time to quality: seconds every method trains (default: what DDP needs for 200 steps)")
    ap.add_argument("--quick", action="store_true",
                    help="time to quality in a few seconds a method: a test of the output, not a measurement")
    ap.add_argument("--sync-every", type=int, default=50, help="DiLoCo inner steps between syncs")
    ap.add_argument("--outer-lr", type=float, default=1.0, help="DiLoCo outer learning rate (default 1.0)")
    ap.add_argument("--outer-momentum", type=float, default=0.0, help="DiLoCo outer momentum (default 0)")
    ap.add_argument("--nesterov", action="store_true", help="DiLoCo: Nesterov outer momentum")
    ap.add_argument("--fragments", type=int, default=5,
                    help="streaming DiLoCo fragments in run (f), a divisor of --sync-every (default 5)")
    ap.add_argument("--every-step-pipeline", default="topk(0.01) -> int8")
    ap.add_argument("--diloco-pipeline", default="sign")
    ap.add_argument("--diloco-small", default="int8",
                    help="DiLoCo's pipeline for biases, norms and the position table (default int8)")
    ap.add_argument("--adaptive", metavar="SETTINGS",
                    help='adaptive compression for (c)-(f), e.g. "min_density: 0.01, max_density: 0.2"')
    ap.add_argument("--sparseloco", default="density: 0.03125, chunk: 4096, bits: 2, decay: 0.95",
                    help='run (g)\'s sync.diloco.sparseloco settings (default "density: 0.03125, chunk: 4096, '
                         'bits: 2, decay: 0.95")')
    ap.add_argument("--only",
                    help="comma-separated subset of ddp,powersgd,strait,diloco,overlap,streaming,sparseloco,alone "
                         "(default: all but overlap, which streaming also overlaps)")
    ap.add_argument("--sequential", action="store_true",
                    help="time to quality: run DDP, PowerSGD and every-step one at a time, not side by side "
                         "(each across its own border)")
    ap.add_argument("--site-sysctl", action="append", default=[], metavar="KEY=VALUE",
                    help="a net.* sysctl set in every site's namespace (repeatable), e.g. "
                         "net.ipv4.tcp_slow_start_after_idle=0: gateway hosts set up otherwise than this one")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per run")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "bench-e2e"))
    args = ap.parse_args()
    args.wan = args.wan or ("1gbit-150ms" if args.sharded else "100mbit-150ms")
    os.environ["STRAIT_BUILD_DIR"] = args.build
    from strait import wan

    try:
        wan.check_can_simulate()
    except wan.WanError as e:
        raise SystemExit(f"bench e2e: {e}")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    for site, _ in SITES:
        if not os.path.exists(os.path.join(out, "keys", f"{site}.key")):
            subprocess.run([os.path.join(args.build, "transport", "strait_keys"), "generate", site, "--dir",
                            os.path.join(out, "keys")], check=True, stdout=subprocess.DEVNULL)
    if args.fragments < 1 or args.sync_every % args.fragments:
        raise SystemExit(f"bench e2e: --fragments {args.fragments} must divide --sync-every {args.sync_every}")
    if args.sharded:
        return sharded(args, out)
    every_step, diloco, overlap, streaming, sparseloco = write_config(out, args)
    configs = {"strait": every_step, "diloco": diloco, "overlap": overlap, "streaming": streaming,
               "sparseloco": sparseloco}
    modes = [m for m, _ in RUNS if (m in args.only.split(",") if args.only else m != "overlap")]
    if args.steps is None:
        return time_to_quality(args, out, configs, modes)

    runs = []
    for mode, label in RUNS:
        if mode not in modes:
            continue
        log(f"bench e2e: {label}, {args.steps} steps across {args.wan} ...")
        data, total, samples = run_mode(mode, args, out, configs)
        site0 = data[0]
        seconds = [e - site0["start"] for e in site0["ends"]]
        # Bytes crossed by the end of each step, from the border's samples.
        curve_bytes = []
        for e in site0["ends"]:
            before = [b for t, b in samples if t <= e]
            curve_bytes.append(before[-1] if before else 0)
        losses = [sum(d["losses"][i] for d in data) / len(data) for i in range(args.steps)]
        # The busiest quarter second of the border (both directions): what
        # streaming fragments lower.
        rates = [(b1 - b0) / (t1 - t0) for (t0, b0), (t1, b1) in zip(samples, samples[1:]) if t1 > t0]
        peak = 8 * max(rates) / 1e6 if rates else 0.0
        model = os.path.join(out, f"{mode}-{SITES[0][0]}.json.model.pt")
        bpb, acc = score(model)
        extra = {}
        rounds_log = os.path.join(out, f"{mode}-rounds.jsonl")
        if mode in configs and args.adaptive and os.path.exists(rounds_log):
            records = [json.loads(l) for l in open(rounds_log)]
            mine = [r for r in records if r["site"] == SITES[0][0]]
            extra = {"adaptive_changes": sum(1 for r in mine if r.get("adaptive")),
                     "adaptive_final_pipeline": mine[-1].get("pipeline") if mine else None}
        runs.append({"name": mode, "label": label, "steps": args.steps, **extra,
                     "step_s": seconds[-1] / args.steps,
                     "bytes_per_step": total / args.steps, "bytes_total": total, "peak_mbit_s": peak,
                     "final_loss": sum(losses[-10:]) / 10, "held_out_bits_per_byte": bpb,
                     "held_out_accuracy": acc,
                     "curve": {"seconds": seconds, "bytes": curve_bytes, "loss": losses}})
    base = next((r for r in runs if r["name"] == "ddp"), None)
    alone = next((r for r in runs if r["name"] == "alone"), None)
    for r in runs:
        if base:
            r["bytes_ratio_vs_ddp"] = base["bytes_per_step"] / r["bytes_per_step"] if r["bytes_per_step"] else None
            r["time_ratio_vs_ddp"] = r["step_s"] / base["step_s"]
            r["loss_ratio_vs_ddp"] = r["final_loss"] / base["final_loss"]
            r["accuracy_points_vs_ddp"] = 100 * (r["held_out_accuracy"] - base["held_out_accuracy"])
        if alone:
            r["time_ratio_vs_alone"] = r["step_s"] / alone["step_s"]
    png = os.path.join(out, "e2e.png")
    plot(png, runs, args)
    result = {"wan": args.wan, "steps": args.steps, "parameters": json.load(open(os.path.join(
        out, f"{runs[0]['name']}-{SITES[0][0]}.json")))["parameters"], "sync_every": args.sync_every, "fragments": args.fragments,
        "every_step_pipeline": args.every_step_pipeline, "adaptive": args.adaptive, "diloco_pipeline": args.diloco_pipeline, "plot": png,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs]}
    if written(os.path.join(out, "e2e.json"), dict(result, curves={r["name"]: r["curve"] for r in runs}), result,
               args.json):
        return
    print(f"charlm ({result['parameters']} parameters), two sites of one worker, {args.steps} steps, "
          f"border {args.wan}")
    print(f"{'run':<31}{'s/step':>8}{'KB/step':>11}{'x fewer B':>11}{'final loss':>11}{'held bpb':>9}"
          f"{'acc %':>7}{'vs alone':>9}{'peak Mb/s':>10}")
    for r in runs:
        fewer = f"{r['bytes_ratio_vs_ddp']:.0f}" if base and r.get("bytes_ratio_vs_ddp") else "-"
        print(f"{r['label']:<31}{r['step_s']:8.3f}{r['bytes_per_step'] / 1e3:11.1f}{fewer:>11}"
              f"{r['final_loss']:11.3f}{r['held_out_bits_per_byte']:9.3f}{100 * r['held_out_accuracy']:7.1f}"
              f"{r.get('time_ratio_vs_alone', float('nan')):9.2f}{r['peak_mbit_s']:10.1f}")
    print(f"plot: {png}; every figure: {os.path.join(out, 'e2e.json')}")


if __name__ == "__main__":
    main()
