"""One rank of a site whose model is sharded with FSDP2 (fully_shard, gloo):
brings the pieces it owns together with strait's ShardedPieces and hands
the results back, checking both against the full parameters. Writes what
it found to --out as JSON (tests/python/test_sharded.py)."""

import argparse
import faulthandler
import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "torch_ext", "python"))
import strait  # noqa: E402,F401  (loads the extension)


def model():
    torch.manual_seed(7)
    # Rows that do not divide by 2 or 3, a 1-D tensor, and an embedding.
    net = nn.Sequential(nn.Embedding(11, 4), nn.Linear(4, 7), nn.Tanh(), nn.Linear(7, 3), nn.LayerNorm(3))
    for m in net:
        if any(True for _ in m.parameters()):
            fully_shard(m)
    fully_shard(net)
    return net


def main():
    faulthandler.dump_traceback_later(120, exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--store", required=True)
    ap.add_argument("--rank", type=int, required=True)
    ap.add_argument("--world", type=int, required=True)
    ap.add_argument("--piece", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--bad-rank", type=int, default=-1, help="this rank passes a shard of the wrong size")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=args.rank, world_size=args.world)
    params = list(model().parameters())
    full = [p.full_tensor().detach().reshape(-1) for p in params]  # a collective: every rank, same order
    local = [p.to_local().detach() for p in params]
    pieces = torch.classes.strait.ShardedPieces([list(p.shape) for p in params], args.piece,
                                                dist.group.WORLD.boxed())
    table = pieces.pieces()
    owned = list(pieces.owned())
    if args.rank == args.bad_rank:
        local[0] = local[0].reshape(-1)[:-1]
    if args.bad_rank >= 0:
        # Every rank raises (none waits in the all-to-all for the one that failed).
        try:
            pieces.gather(local)
            error = None
        except Exception as e:  # noqa: BLE001 - the message is what is checked
            error = str(e)
        with open(args.out, "w") as f:
            json.dump({"rank": args.rank, "error": error}, f)
        return
    got = pieces.gather(local)
    gathered_right = all(torch.equal(g, full[table[k][0]][table[k][1]:table[k][2]]) for k, g in zip(owned, got))
    out = [torch.full(t.shape, float("nan")) for t in local]
    pieces.scatter([g * 2 + 1 for g in got], out)
    scattered_right = all(torch.equal(o, t * 2 + 1) for o, t in zip(out, local))
    with open(args.out, "w") as f:
        json.dump({"world": pieces.world(), "rank": pieces.rank(), "owned": owned, "pieces": len(table),
                   "local_elements": sum(t.numel() for t in local),
                   "gathered_right": gathered_right, "scattered_right": scattered_right}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
