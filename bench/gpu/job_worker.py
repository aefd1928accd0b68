"""One worker of `./strait gpu-check`'s two-site job: a small MLP on CUDA
tensors, DDP over NCCL inside its site (one worker), strait across sites in
every-step mode or DiLoCo. Writes OUT/SITE.json: the parameters' hash."""

import argparse
import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn

import strait


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["every_step", "diloco"], required=True)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    torch.cuda.set_device(0)
    dist.init_process_group("nccl")
    session = strait.init()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10)).cuda()
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0])
    g = torch.Generator(device="cuda").manual_seed(100 + session.site_index)
    x = torch.randn(512, 256, device="cuda", generator=g)
    y = torch.randint(0, 10, (512,), device="cuda", generator=g)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    diloco = strait.DiLoCo(model, opt, session) if args.mode == "diloco" else None
    if diloco is None:
        ddp.register_comm_hook(session, strait.ddp_hook)
    for step in range(args.steps):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x), y)
        loss.backward()
        opt.step()
        if diloco:
            diloco.step()
        session.log(step + 1, loss.item(), every=10)
    if diloco:
        diloco.flush()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu()
    with open(os.path.join(args.out, f"{session.site}.json"), "w") as f:
        json.dump({"site": session.site, "hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
                   "loss": loss.item()}, f)
    del ddp
    dist.destroy_process_group()
    session.close()


if __name__ == "__main__":
    main()
