#!/usr/bin/env python3
"""`./strait bench hook [--json]`: what the strait DDP hook costs per step.

Same model, batch and number of processes (two, one per core here):
  (a) plain DDP: one site with two gloo workers, PyTorch's own all-reduce;
  (b) strait: two sites of one worker each, the DDP hook with
      topk(0.01) -> int8 and error feedback, cross-site exchange over CurveZMQ
      on loopback.
Reports the median step time of each and the ratio (b)/(a).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "torch_ext", "python"))
from strait.ports import free_port  # noqa: E402  (distinct ports within this process)

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(args):
    import torch
    import torch.distributed as dist
    import torch.nn as nn

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    ddp = nn.parallel.DistributedDataParallel(model)
    if args.mode == "strait":
        import strait
        session = strait.init(args.config, site=args.site)
        ddp.register_comm_hook(session, strait.ddp_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
    x = torch.randn(64, 784)
    y = torch.randint(0, 10, (64,))
    times = []
    for step in range(args.steps):
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    print(json.dumps({"median_s": statistics.median(times[5:])}))


def run(procs):
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        if p.returncode != 0:
            raise SystemExit(f"bench hook: worker failed: {err[-1500:]}")
        outs.append(json.loads(out.strip().splitlines()[-1]))
    return max(o["median_s"] for o in outs)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--keys-bin", required=False)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    ap.add_argument("--site", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    me = [sys.executable, os.path.abspath(__file__), "--worker", "--steps", str(args.steps)]
    print("plain DDP, one site of two workers ...", file=sys.stderr, flush=True)
    port = free_port()
    env = lambda rank, port: dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(port), OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
    plain = run([subprocess.Popen(me + ["--mode", "plain"], env=env(r, port), stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for r in range(2)])

    print("strait hook, two sites of one worker, CurveZMQ on loopback ...", file=sys.stderr, flush=True)
    with tempfile.TemporaryDirectory(prefix="strait-bench-hook-") as tmp:
        for s in ("hangzhou", "singapore"):
            subprocess.run([args.keys_bin, "generate", s, "--dir", tmp], check=True, capture_output=True)
        config = os.path.join(tmp, "job.yaml")
        with open(config, "w") as f:
            f.write(f"""job: {{id: bench-hook}}
sites:
  - {{name: hangzhou, jurisdiction: CN, endpoint: "tcp://127.0.0.1:{free_port()}",
     public_key: hangzhou.pub, secret_key: hangzhou.key}}
  - {{name: singapore, jurisdiction: SG, endpoint: "tcp://127.0.0.1:{free_port()}",
     public_key: singapore.pub, secret_key: singapore.key}}
compression: {{pipeline: "topk(0.01) -> int8", error_feedback: true}}
""")
        procs = []
        for site in ("hangzhou", "singapore"):
            e = dict(os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            procs.append(subprocess.Popen(me + ["--mode", "strait", "--config", config, "--site", site], env=e,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        hooked = run(procs)

    res = {"plain_ddp_step_ms": plain * 1e3, "strait_hook_step_ms": hooked * 1e3, "ratio": hooked / plain,
           "params": 784 * 512 + 512 + 512 * 512 + 512 + 512 * 10 + 10, "batch": 64, "processes": 2}
    if args.json:
        print(json.dumps(res))
    else:
        print(f"MLP with {res['params']} parameters, batch 64, two processes")
        print(f"  plain DDP (one site, two gloo workers)      {res['plain_ddp_step_ms']:7.2f} ms/step")
        print(f"  strait hook (two sites, topk->int8, Curve)  {res['strait_hook_step_ms']:7.2f} ms/step"
              f"  ({res['ratio']:.2f}x)")


if __name__ == "__main__":
    main()
