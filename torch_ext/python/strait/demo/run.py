"""`strait demo` (and `./strait demo`): a two-site job on this machine.

"hangzhou" (CN) and "singapore" (SG), two worker processes each (gloo inside
each site), train one model in every-step mode: gradients are compressed
(topk(0.05) -> int8 with error feedback) and cross between the sites'
gateways over CurveZMQ. Each site keeps its own digits, mostly of different
classes. The demo then compares the shared model with each site trained
alone, and the bytes that crossed with what fp32 gradients would have sent
(measured by running the same job uncompressed), and plots loss against bytes.
"""

import argparse
import json
import os
import subprocess
import sys
import time

from strait import tools
from strait.ports import free_port  # distinct ports within this process

from . import train

# The folder that holds the strait package: the workers import it from there,
# in a checkout and installed alike.
PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SITES = (("hangzhou", "CN"), ("singapore", "SG"))


def write_config(out, name, pipeline):
    path = os.path.join(out, f"{name}.yaml")
    lines = [f"job: {{id: digits-{name}}}", "sites:"]
    for site, jur in SITES:
        lines += [f"  - name: {site}", f"    jurisdiction: {jur}",
                  f"    endpoint: tcp://127.0.0.1:{free_port()}",
                  f"    public_key: keys/{site}.pub", f"    secret_key: keys/{site}.key", "    workers: 2"]
    lines += ["sync: {mode: every_step}",
              f'compression: {{pipeline: "{pipeline}", error_feedback: true}}',
              "transport: {round_deadline_s: 60, hard_deadline_s: 120}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def write_policies(out, tag):
    """Each site's own policy: what may leave it, and its signed audit log."""
    paths = {}
    os.makedirs(os.path.join(out, "audit"), exist_ok=True)
    for site, jur in SITES:
        log = os.path.join(out, "audit", f"{tag}-{site}.jsonl")
        if os.path.exists(log):
            os.remove(log)  # a fresh trail per demo run
        path = os.path.join(out, f"policy-{tag}-{site}.yaml")
        with open(path, "w") as f:
            f.write(f"site: {site}\njurisdiction: {jur}\negress: {{allow: [model_update, model_state, control]}}\n"
                    f"audit: {{log: audit/{tag}-{site}.jsonl, signing_key: keys/{site}.sign}}\n")
        paths[site] = path
    return paths


def verify_audit(out, tag):
    """Checks each site's audit log with its public key; returns summaries."""
    results = {}
    for site, _ in SITES:
        log = os.path.join(out, "audit", f"{tag}-{site}.jsonl")
        r = subprocess.run([tools.program("strait_audit"), "verify", log, "--key",
                            os.path.join(out, "keys", f"{site}.sign.pub"), "--json"], capture_output=True, text=True)
        try:
            results[site] = dict(json.loads(r.stdout), log=log)
        except ValueError:
            results[site] = {"ok": False, "problem": r.stderr.strip() or r.stdout.strip(), "log": log}
    return results


def run_job(config, out, tag, steps, progress, wan_profile=None):
    """Runs the job; with wan_profile, across a simulated border (root only).
    Returns every worker's result and what crossed the border (None without one)."""
    if not wan_profile:
        return run_workers(config, out, tag, steps, progress, None), None
    from strait import wan

    try:
        with wan.Border(wan_profile, [s for s, _ in SITES], log=lambda m: print(f"  border: {m}")) as border:
            results = run_workers(border.rewrite_config(config, out), out, tag, steps, progress, border)
        return results, border.total_bytes()
    except wan.WanError as e:
        raise SystemExit(f"demo: {e}")


def run_workers(config, out, tag, steps, progress, border):
    procs, outs = [], []
    for site, _ in SITES:
        port = free_port()
        for rank in range(2):
            res = os.path.join(out, f"{tag}-{site}-{rank}.json")
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                       OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", STRAIT_LOG="0",
                       PYTHONPATH=os.pathsep.join(filter(None, [PACKAGE_PARENT, os.environ.get("PYTHONPATH")])),
                       STRAIT_JSON_LOG=os.path.join(out, f"{tag}-rounds.jsonl"),
                       STRAIT_POLICY=os.path.join(out, f"policy-{tag}-{site}.yaml"))
            if border:
                env.update(border.env(site))
            cmd = (border.prefix(site) if border else []) + [
                sys.executable, "-m", "strait.demo.train", "--config", config, "--site", site,
                "--steps", str(steps), "--out", res]
            if progress and site == SITES[0][0] and rank == 0:
                cmd.append("--progress")
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL,
                                          stderr=None if "--progress" in cmd else subprocess.PIPE, text=True))
            outs.append(res)
    deadline = time.time() + 600
    for p in procs:
        try:
            _, err = p.communicate(timeout=max(1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise SystemExit("demo: a worker did not finish within 10 minutes")
        if p.returncode != 0:
            for q in procs:
                q.kill()
            raise SystemExit(f"demo: a worker failed:\n{(err or '')[-2000:]}")
    return [json.load(open(o)) for o in outs]


def alone(site_index, steps):
    """The same model trained on one site's rows only."""
    import torch
    import torch.nn as nn

    xtr, ytr, xte, yte = train.split()
    x, y = train.site_rows(xtr, ytr, site_index)
    m = train.model()
    opt = torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.5)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    return train.accuracy(m, xte, yte)


def crossed(results):
    """Bytes that crossed the border per step: both site leaders' payloads."""
    leaders = [r for r in results if r["rank"] == 0]
    return [sum(r["bytes_sent"][i] for r in leaders) for i in range(len(leaders[0]["bytes_sent"]))]


def plot(path, compressed, plain):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for res, label in ((compressed, "strait topk(0.05) -> int8"), (plain, "uncompressed fp32")):
        b = crossed(res)
        loss = [sum(r["losses"][i] for r in res) / len(res) for i in range(len(b))]
        ax.plot([v / 1e6 for v in b], loss, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("MB crossed between the sites (log scale)")
    ax.set_ylabel("training loss (mean over workers)")
    ax.set_title("Two sites, digits: loss against bytes across the border")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    root = tools.source_root()
    ap = argparse.ArgumentParser(prog="strait demo", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(root, "build", "demo") if root else "strait-demo",
                    help="where keys, configs, logs and the plot go (default: build/demo in a checkout, "
                         "./strait-demo otherwise)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--wan", metavar="PROFILE", help="run across a simulated border, e.g. 100mbit-150ms (root)")
    args = ap.parse_args(argv)
    out = os.path.abspath(args.out)
    for tag in ("compressed", "fp32"):
        if os.path.exists(os.path.join(out, f"{tag}-rounds.jsonl")):
            os.remove(os.path.join(out, f"{tag}-rounds.jsonl"))
    os.makedirs(os.path.join(out, "keys"), exist_ok=True)
    for site, _ in SITES:
        if not os.path.exists(os.path.join(out, "keys", f"{site}.sign")):
            subprocess.run([tools.program("strait_keys"), "generate", site, "--dir",
                            os.path.join(out, "keys")], check=True, stdout=subprocess.DEVNULL)

    print("strait demo: two sites (hangzhou CN, singapore SG), two workers each, CurveZMQ between them")
    print(f"training {args.steps} steps with compressed updates ...", flush=True)
    for tag in ("compressed", "fp32"):
        write_policies(out, tag)
    started = time.monotonic()
    compressed, wire_comp = run_job(write_config(out, "compressed", "topk(0.05) -> int8"), out, "compressed",
                                    args.steps, True, args.wan)
    took_comp = time.monotonic() - started
    print("the same job uncompressed (fp32), to measure what it would have sent ...", flush=True)
    started = time.monotonic()
    plain, wire_plain = run_job(write_config(out, "fp32", "fp32"), out, "fp32", args.steps, False, args.wan)
    took_plain = time.monotonic() - started
    print("each site trained alone ...", flush=True)
    alone_acc = [alone(i, args.steps) for i in range(len(SITES))]

    params = {json.dumps(r["params"]) for r in compressed}
    audit = verify_audit(out, "compressed")
    shared_acc = compressed[0]["test_accuracy"]
    b_comp, b_plain = crossed(compressed)[-1], crossed(plain)[-1]
    png = os.path.join(out, "loss_vs_bytes.png")
    plot(png, compressed, plain)
    summary = {"shared_accuracy": shared_acc, "alone_accuracy": dict(zip([s for s, _ in SITES], alone_acc)),
               "bytes_crossed": b_comp, "bytes_fp32": b_plain, "replicas_identical": len(params) == 1,
               "plot": png, "wan": args.wan, "seconds": {"compressed": took_comp, "fp32": took_plain},
               "wire_bytes": {"compressed": wire_comp, "fp32": wire_plain}, "audit": audit}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)

    print()
    print(f"test accuracy, shared model (both sites' data, no row left home): {shared_acc * 100:5.1f}%")
    for (site, _), acc in zip(SITES, alone_acc):
        print(f"test accuracy, {site} alone:{' ' * (42 - len(site))}{acc * 100:5.1f}%")
    print(f"bytes across the border: {b_comp / 1e6:.2f} MB (fp32 gradients: {b_plain / 1e6:.2f} MB, "
          f"{b_plain / max(1, b_comp):.0f}x more)")
    if args.wan:
        print(f"across the simulated border ({args.wan}), as the network saw it (framing and handshakes "
              f"included): {wire_comp / 1e6:.2f} MB vs {wire_plain / 1e6:.2f} MB; job time {took_comp:.0f} s vs "
              f"{took_plain:.0f} s")
    print(f"all four workers hold identical parameters: {'yes' if len(params) == 1 else 'NO'}")
    print(f"round log (one JSON object per round per site): {os.path.join(out, 'compressed-rounds.jsonl')}")
    print(f"plot: {png}")
    print(f"details: {os.path.join(out, 'summary.json')}; keys and configs in {out}")
    def shown(path):  # relative when under the working directory
        rel = os.path.relpath(path)
        return path if rel.startswith("..") else rel

    for site, a in audit.items():
        rel = shown(a["log"])
        if a.get("ok"):
            print(f"audit trail, {site}: {rel}: {a['records']} signed records, verified "
                  f"({'./strait' if root else 'strait'} audit verify {rel} "
                  f"--key {shown(os.path.join(out, 'keys', site + '.sign.pub'))})")
        else:
            print(f"audit trail, {site}: {rel}: VERIFY FAILED: {a.get('problem')}")


if __name__ == "__main__":
    main()
