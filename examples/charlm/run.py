#!/usr/bin/env python3
"""Runs the charlm example end to end: keys (when missing), the two-site
DiLoCo job through `./strait launch`, each site trained alone for comparison,
then a summary and a plot.

    examples/charlm/run.py [--steps N] [--wan 100mbit-150ms] [--out DIR]

Prints, per site, the held-out bits per byte of the shared model and of the
model the site trains alone on its own text (both measured on the site's own
held-out text, which never leaves it), and the bytes that crossed against
what plain data parallelism (fp32 gradients every step) would have sent.
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SITES = ("hangzhou", "singapore")


def prepare_sites(out, build):
    """Each site's dataset (its licence texts, with a manifest naming its
    jurisdiction) and its policy (datasets, signed audit log)."""
    sys.path.insert(0, os.path.join(ROOT, "torch_ext", "python"))
    sys.path.insert(0, HERE)
    import shutil

    import train
    from strait import data

    policies = {}
    for site, jur in (("hangzhou", "CN"), ("singapore", "SG")):
        d = os.path.join(out, "data", site)
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
        for path in train.site_files(site):
            shutil.copyfile(path, os.path.join(d, os.path.basename(path)))
        data.write_manifest(d, jur, name=f"licences-{site}")
        log = os.path.join(out, "audit", f"{site}.jsonl")
        if os.path.exists(log):
            os.remove(log)
        policies[site] = os.path.join(out, f"policy-{site}.yaml")
        with open(policies[site], "w") as f:
            f.write(f"site: {site}\njurisdiction: {jur}\ndata: [data/{site}]\n"
                    f"audit: {{log: audit/{site}.jsonl, signing_key: {os.path.join(HERE, 'keys', site + '.sign')}}}\n")
    return policies


def launch(config, out, args, extra, tag, policies):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "torch_ext", "python"))
    cmd = [sys.executable, "-m", "strait.launch", config]
    for site, path in policies.items():
        cmd += ["--policy", f"{site}={path}"]
    if args.wan and tag == "shared":
        cmd += ["--wan", args.wan]
    if tag == "shared":
        cmd += ["--json-log", os.path.join(out, "rounds.jsonl")]
    cmd += ["--", sys.executable, os.path.join(HERE, "train.py"), "--steps", str(args.steps),
            "--out", os.path.join(out, f"{tag}-{{site}}-{{rank}}.json"), *extra]
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:
        raise SystemExit(f"charlm: the {tag} run failed with status {r.returncode}")
    return {(s, k): json.load(open(os.path.join(out, f"{tag}-{s}-{k}.json"))) for s in SITES for k in (0, 1)}


def plot(path, shared, alone, scores):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    for site, style in zip(SITES, ("-", "--")):
        for res, label, color in ((shared, "shared (DiLoCo)", "C0"), (alone, "alone", "C1")):
            losses = res[(site, 0)]["losses"]
            smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
            ax.plot(smooth, style, color=color, label=f"{site}, {label}")
    ax.set_xlabel("inner step")
    ax.set_ylabel("training loss (nats/byte, 10-step mean)")
    ax.set_title("charlm: two sites, DiLoCo with low-bit pseudo-gradients")
    ax.legend()
    width = 0.8 / len(scores)
    for k, (label, per) in enumerate(scores.items()):
        bars.bar([i + k * width for i in range(len(SITES))], [per[s] for s in SITES], width, label=label)
    bars.set_xticks([i + width * (len(scores) - 1) / 2 for i in range(len(SITES))])
    bars.set_xticklabels([f"{s}'s held-out text" for s in SITES])
    bars.set_ylabel("bits per byte (lower is better)")
    bars.set_title("each model scored at each site")
    bars.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--wan", metavar="PROFILE", help="across a simulated border, e.g. 100mbit-150ms (root)")
    ap.add_argument("--out", default=os.path.join(ROOT, "build", "charlm"))
    ap.add_argument("--build", default=os.environ.get("STRAIT_BUILD_DIR", os.path.join(ROOT, "build")))
    args = ap.parse_args()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    keys = os.path.join(HERE, "keys")
    for site in SITES:
        if not os.path.exists(os.path.join(keys, f"{site}.sign")):
            subprocess.run([os.path.join(args.build, "transport", "strait_keys"), "generate", site, "--dir", keys],
                           check=True, stdout=subprocess.DEVNULL)
    if os.path.exists(os.path.join(out, "rounds.jsonl")):
        os.remove(os.path.join(out, "rounds.jsonl"))
    config = os.path.join(HERE, "config.yaml")
    policies = prepare_sites(out, args.build)

    print(f"charlm: {args.steps} steps, two sites of two workers, DiLoCo"
          + (f" across a simulated {args.wan} border" if args.wan else "") + " ...", flush=True)
    shared = launch(config, out, args, [], "shared", policies)
    print("charlm: each site alone, for comparison ...", flush=True)
    alone = launch(config, out, args, ["--alone"], "alone", policies)

    # Each site scores every model on its own held-out text: models cross
    # the border to be scored, the text never does.
    sys.path.insert(0, HERE)
    import torch
    import train

    models = {"shared": os.path.join(out, f"shared-{SITES[0]}-0.json.model.pt")}
    models.update({f"{s} alone": os.path.join(out, f"alone-{s}-0.json.model.pt") for s in SITES})
    scores = {}
    for s in SITES:
        held = train.site_text(s)[1]  # the site's own held-out text, read at the site
        for label, path in models.items():
            m = train.CharLM()
            m.load_state_dict(torch.load(path))
            scores.setdefault(label, {})[s] = train.bits_per_byte(m, held, m.context)
    digests = {r["param_digest"] for r in shared.values()}
    params = shared[(SITES[0], 0)]["parameters"]
    crossed = sum(shared[(s, 0)]["bytes_sent"] for s in SITES)
    fp32 = len(SITES) * params * 4 * args.steps  # every site's fp32 gradients, every step
    png = os.path.join(out, "loss.png")
    plot(png, shared, alone, scores)
    summary = {"steps": args.steps, "wan": args.wan, "parameters": params, "bytes_crossed": crossed,
               "bytes_fp32_every_step": fp32, "replicas_identical": len(digests) == 1,
               "held_out_bits_per_byte": scores,
               "seconds": {"shared": shared[(SITES[0], 0)]["seconds"], "alone": alone[(SITES[0], 0)]["seconds"]}}
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print()
    print("held-out bits per byte (lower is better); each site scores each model on its own held-out text:")
    print(f"  {'model':<18}" + "".join(f"{s:>12}" for s in SITES) + f"{'mean':>10}")
    for label, per in scores.items():
        print(f"  {label:<18}" + "".join(f"{per[s]:12.2f}" for s in SITES) + f"{sum(per.values()) / len(per):10.2f}")
    print(f"bytes across the border: {crossed / 1e6:.2f} MB; fp32 gradients every step would be "
          f"{fp32 / 1e6:.0f} MB ({fp32 / max(1, crossed):.0f}x more)")
    print(f"all four workers hold identical parameters: {'yes' if len(digests) == 1 else 'NO'}")
    for site in SITES:
        v = subprocess.run([os.path.join(args.build, "transport", "strait_audit"), "verify",
                            os.path.join(out, "audit", f"{site}.jsonl"), "--key", os.path.join(keys, f"{site}.sign.pub"),
                            "--json"], capture_output=True, text=True)
        verdict = json.loads(v.stdout) if v.stdout.startswith("{") else {"ok": False, "problem": v.stderr}
        summary.setdefault("audit", {})[site] = verdict
        print(f"audit log of {site}: {os.path.join(out, 'audit', site + '.jsonl')}: "
              + (f"{verdict['records']} signed records, verified" if verdict["ok"] else f"FAILED: {verdict['problem']}"))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(f"plot: {png}; round log: {os.path.join(out, 'rounds.jsonl')}; summary: {os.path.join(out, 'summary.json')}")


if __name__ == "__main__":
    main()
