"""One worker of a sharded DiLoCo job (tests/python/test_sharded.py): the
model sharded with FSDP2 over its site's workers, its own site's data,
strait.DiLoCo exchanging only the pieces this rank owns. Writes a digest of
the full parameters at the start and the end to --out as JSON."""

import argparse
import faulthandler
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


def main():
    faulthandler.dump_traceback_later(200, exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", required=True)
    ap.add_argument("--policy", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    session = strait.init(args.config, site=args.site, policy=args.policy)
    # Each site its own initial values (DiLoCo starts every site from site
    # 0's) and its own data.
    torch.manual_seed(100 + session.site_index)
    net = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 10))
    for m in (net[0], net[2]):
        fully_shard(m)
    fully_shard(net)
    params = list(net.parameters())
    start = full_digest(params)
    g = torch.Generator().manual_seed(7 + session.site_index)
    x = torch.randn(64, 40, generator=g)
    y = torch.randint(0, 10, (64,), generator=g)
    x, y = x[session.rank::session.size], y[session.rank::session.size]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    diloco = strait.DiLoCo(net, opt, session)
    losses = []
    while diloco.local_steps < args.steps:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        diloco.step()
        losses.append(float(loss))
    diloco.flush()
    result = {"site": session.site, "rank": session.rank, "sharded": diloco.sharded, "syncs": diloco.syncs,
              "groups": diloco._d.groups(), "start": start, "end": full_digest(params),
              "privacy_spent": list(diloco._d.privacy_spent()),
              "settings": [diloco.sync_every, diloco.outer_lr, diloco.outer_momentum, diloco.nesterov,
                           diloco.fragments == [list(range(len(params)))], diloco.overlap, diloco.sparseloco,
                           diloco.resumed],
              "bytes_sent": session._s.bytes_sent(), "first_loss": losses[0], "last_loss": losses[-1]}
    with open(args.out, "w") as f:
        json.dump(result, f)
    session.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
