"""PyTorch's DDP tutorial (ToyModel, setup/cleanup as the tutorial writes
them), ported to strait as a new user would: one worker of a job started
by `strait launch`. --mode every_step (the DDP hook) or diloco
(sync_every 7: 100 steps are not a multiple of it). --unseeded builds the
model without a seed, as the tutorial does. The teardown is the
tutorial's: dist.destroy_process_group() right after training, DDP still
alive, no barrier; the process must still exit, and soon, also when
strait.init made the group the user's cleanup() destroys."""

import argparse
import hashlib
import json
import os

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.optim as optim
from torch.nn.parallel import DistributedDataParallel as DDP

import strait


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.net1 = nn.Linear(10, 10)
        self.relu = nn.ReLU()
        self.net2 = nn.Linear(10, 5)

    def forward(self, x):
        return self.net2(self.relu(self.net1(x)))


def setup():
    dist.init_process_group("gloo")


def cleanup():
    dist.destroy_process_group()


def demo_basic(args):
    if not args.strait_makes_the_group:
        setup()
    session = strait.init()  # makes the process group when there is none
    if not args.unseeded:
        torch.manual_seed(0)
    model = ToyModel()
    ddp_model = DDP(model)
    torch.manual_seed(1000 + session.job_rank)  # each worker of the job its own data
    loss_fn = nn.MSELoss()
    optimizer = optim.SGD(ddp_model.parameters(), lr=0.001)
    diloco = None
    if args.mode == "every_step":
        ddp_model.register_comm_hook(session, strait.ddp_hook)
    else:
        diloco = strait.DiLoCo(model, optimizer, session)
    for step in range(args.steps):
        optimizer.zero_grad()
        outputs = ddp_model(torch.randn(20, 10))
        labels = torch.randn(20, 5)
        loss_fn(outputs, labels).backward()
        optimizer.step()
        if diloco:
            diloco.step()
        session.log(step + 1, every=10)
    if diloco:
        diloco.flush()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    with open(os.path.join(args.out, f"{session.site}-{session.rank}.json"), "w") as f:
        json.dump({"hash": hashlib.sha256(flat.numpy().tobytes()).hexdigest(), "job_rank": session.job_rank,
                   "job_size": session.job_size}, f)
    cleanup()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=["every_step", "diloco"], required=True)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--unseeded", action="store_true")
    ap.add_argument("--strait-makes-the-group", action="store_true",
                    help="no setup(): strait.init makes the process group, and cleanup() still destroys it")
    ap.add_argument("--out", required=True)
    demo_basic(ap.parse_args())
