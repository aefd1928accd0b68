"""One Python worker of an interop job (tests/python/test_interop.py): the
twin of the libtorch program examples/cpp/train.cc — the same model,
initialised by the same formula, the same synthetic data, the same
optimizer — so a site running either trains the same bits. The config's
sync.mode decides: every_step (DDP with strait.ddp_hook) or diloco.

Environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT (one world per site)."""

import argparse
import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import yaml

import strait


def model():
    net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for k, p in enumerate(net.parameters()):
            p.copy_((torch.sin(torch.arange(p.numel(), dtype=torch.float32) * 0.37 + k) * 0.2).view(p.shape))
    return net


def site_data(site):
    i = torch.arange(256, dtype=torch.float32).view(256, 1)
    j = torch.arange(16, dtype=torch.float32).view(1, 16)
    x = torch.sin(i * 0.13 + j * 0.71 + float(site) * 0.5)
    return x, x[:, :4].argmax(1)


def fnv(params):
    """FNV-1a of the parameters' bytes, as examples/cpp/train.cc computes it."""
    data = torch.cat([p.detach().reshape(-1) for p in params]).contiguous().numpy().tobytes()
    h = 1469598103934665603
    for b in data:
        h = ((h ^ b) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def main():
    faulthandler.dump_traceback_later(200, exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    with open(args.config) as f:
        diloco_mode = yaml.safe_load(f)["sync"]["mode"] == "diloco"
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    session = strait.init(args.config, site=args.site)
    x, y = site_data(session.site_index)
    x, y = x[session.rank::session.size], y[session.rank::session.size]
    net = model()
    ddp = nn.parallel.DistributedDataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2 if diloco_mode else 0.5)
    diloco = strait.DiLoCo(net, opt, session) if diloco_mode else None
    if not diloco_mode:
        ddp.register_comm_hook(session, strait.ddp_hook)
    for step in range(1, args.steps + 1):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        if diloco:
            diloco.step()
        session.log(step, loss.item())
    if diloco:
        diloco.flush()
    with open(args.out, "w") as f:
        json.dump({"site": args.site, "rank": session.rank, "hash": fnv(net.parameters()),
                   "payload_bytes_sent": session.bytes_sent, "syncs": diloco.syncs if diloco else 0}, f)
    dist.barrier()
    del ddp
    dist.destroy_process_group()
    session.close()


if __name__ == "__main__":
    try:
        main()
    except RuntimeError as e:
        print(f"strait error: {e}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(3)
    sys.stdout.flush()
    os._exit(0)
