"""One worker of a sharded job (tests/python/test_sharded.py): the model
sharded with FSDP2 over its site's workers, its own site's data, and
strait.DiLoCo (or, with --every-step, strait.fsdp_hook) exchanging only the
pieces this rank owns. Writes a digest of the full parameters at the start
and the end to --out as JSON; with --every-step also how far they are from
plain SGD on the weighted mean of both sites' gradients, computed here
unsharded."""

import argparse
import faulthandler
import gc
import hashlib
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "torch_ext", "python"))
import strait  # noqa: E402


def full_digest(params):
    """Every rank gathers the full parameters (a collective) and hashes them."""
    h = hashlib.sha256()
    for p in params:
        h.update(p.full_tensor().detach().contiguous().numpy().tobytes())
    return h.hexdigest()


class Net(nn.Module):
    """Two sharded blocks, and a root unit whose own parameter (`scale`,
    registered first) comes after its child's (`head`) in FSDP2's order, not
    in the module's: the hook must follow FSDP2's."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, 10))
        self.body = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 10))
        self.head = nn.Linear(10, 10)

    def forward(self, x):
        return self.head(self.body(x) * self.scale)


def make_net():
    return Net()


def site_data(site):
    g = torch.Generator().manual_seed(7 + site)
    return torch.randn(64, 40, generator=g), torch.randint(0, 10, (64,), generator=g)


def from_reference(params, steps):
    """Plain SGD, unsharded, from site 0's initial values, on the mean of
    the two sites' gradients (each site's the mean over its whole batch, as
    FSDP2 averages its ranks' equal halves): the largest difference from
    the trained parameters."""
    torch.manual_seed(100)
    ref = make_net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for _ in range(steps):
        grads = []
        for site in (0, 1):
            ref.zero_grad()
            x, y = site_data(site)
            nn.functional.cross_entropy(ref(x), y).backward()
            grads.append([p.grad.clone() for p in ref.parameters()])
        for p, a, b in zip(ref.parameters(), *grads):
            p.grad = 0.5 * a + 0.5 * b
        opt.step()
    return max(float((p.full_tensor().detach() - r.detach()).abs().max()) for p, r in zip(params, ref.parameters()))


def train_diloco(net, opt, session, params, start, x, y, steps):
    diloco = strait.DiLoCo(net, opt, session)
    losses = []
    while diloco.local_steps < steps:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        diloco.step()
        losses.append(float(loss))
    diloco.flush()
    return {"site": session.site, "rank": session.rank, "sharded": diloco.sharded, "syncs": diloco.syncs,
            "groups": diloco._d.groups(), "start": start, "end": full_digest(params),
            "privacy_spent": list(diloco._d.privacy_spent()),
            "settings": [diloco.sync_every, diloco.outer_lr, diloco.outer_momentum, diloco.nesterov,
                         diloco.fragments == [list(range(len(params)))], diloco.overlap, diloco.sparseloco,
                         diloco.resumed],
            "bytes_sent": session._s.bytes_sent(), "first_loss": losses[0], "last_loss": losses[-1]}


def main():
    faulthandler.dump_traceback_later(200, exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--policy", default=None)
    ap.add_argument("--every-step", action="store_true")
    ap.add_argument("--unused", action="store_true", help="a trained parameter the forward pass does not use")
    ap.add_argument("--break-at", type=int, default=None,
                    help="every-step: at this step site b's first block starts reducing by a factor of its own, "
                         "which the hook refuses")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    session = strait.init(args.config, site=args.site, policy=args.policy)
    result = train(args, session)
    with open(args.out, "w") as f:
        json.dump(result, f)
    session.close()
    # The model's FSDP2 state holds the site's process group; freed here
    # (train()'s frame, and the cycles among modules and hooks), the group
    # ends with destroy_process_group, gloo's threads joined while Python
    # runs. Left to interpreter teardown, a gloo thread still letting go of
    # a finished all-gather's tensor aborted the process ("terminate called
    # without an active exception", 1 run in about 10 on a loaded machine).
    gc.collect()
    dist.destroy_process_group()


def train(args, session):
    # Each site its own initial values (DiLoCo starts every site from site
    # 0's) and its own data.
    torch.manual_seed(100 + session.site_index)
    net = make_net()
    if args.unused:
        net.unused = nn.Parameter(torch.zeros(3))
    for m in (net.body[0], net.body[2]):
        fully_shard(m)
    fully_shard(net)
    params = list(net.parameters())
    start = full_digest(params)
    x, y = site_data(session.site_index)
    x, y = x[session.rank::session.size], y[session.rank::session.size]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    if args.every_step:
        hook = strait.fsdp_hook(net, session)
        losses = []
        for step in range(args.steps):
            if step == args.break_at and session.site_index == 1:
                net.body[0].set_gradient_divide_factor(2.0)
            opt.zero_grad()
            loss = nn.functional.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            losses.append(float(loss))
        result = {"site": session.site, "rank": session.rank, "steps": hook.steps, "groups": hook.groups,
                  "start": start, "end": full_digest(params), "privacy_spent": hook.privacy_spent(),
                  "bytes_sent": session._s.bytes_sent(), "first_loss": losses[0], "last_loss": losses[-1],
                  "from_reference": from_reference(params, args.steps)}
    else:
        result = train_diloco(net, opt, session, params, start, x, y, args.steps)
    return result


if __name__ == "__main__":
    main()
