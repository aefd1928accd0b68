"""One worker of `./strait gpu-check`'s two-site job: an MLP on CUDA tensors,
DDP over NCCL inside its site (one worker), strait across sites in
every-step mode or DiLoCo (`--device cpu`: gloo and CPU tensors, for a
rehearsal). Writes OUT/SITE.json: the parameters' hash, the model's size
and how far the process's peak host memory grew while strait trained it."""

import argparse
import hashlib
import json
import os
import resource

import torch
import torch.distributed as dist
import torch.nn as nn

import strait


def peak_host_bytes():
    """The process's peak resident memory so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["every_step", "diloco"], required=True)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=40)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("nccl" if cuda else "gloo")
    session = strait.init()
    torch.manual_seed(0)
    h = args.hidden
    with torch.device(args.device):  # built there: a host copy now would raise the peak the check starts from
        model = nn.Sequential(nn.Linear(256, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 10))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    g = torch.Generator(device=args.device).manual_seed(100 + session.site_index)
    x = torch.randn(512, 256, device=args.device, generator=g)
    y = torch.randint(0, 10, (512,), device=args.device, generator=g)
    # A warm-up step of the bare model (no DDP, no strait) loads the CUDA
    # context, cuBLAS and the kernels; DDP's constructor alone adds ~115 MiB
    # on the CPU (its imports): both before the peak is read.
    nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=[0] if cuda else None)
    base = peak_host_bytes()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
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
    if cuda:
        torch.cuda.synchronize()
    growth = peak_host_bytes() - base
    digest = hashlib.sha256()
    for p in model.parameters():  # one tensor at a time: no full-size host copy here either
        digest.update(p.detach().cpu().numpy().tobytes())
    with open(os.path.join(args.out, f"{session.site}.json"), "w") as f:
        json.dump({"site": session.site, "hash": digest.hexdigest(), "loss": loss.item(), "device": args.device,
                   "model_bytes": model_bytes, "host_peak_before_bytes": base, "host_growth_bytes": growth,
                   "steps": args.steps}, f)
    del ddp
    dist.destroy_process_group()
    session.close()


if __name__ == "__main__":
    main()
