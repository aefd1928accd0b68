#!/usr/bin/env python3
"""One worker of the gpt job: a GPT-style byte-level language model of
about 100M parameters, sharded with FSDP2 (fully_shard) over its site's
workers, trained with DiLoCo across sites by strait's sharded engine.
Started by `./strait launch` (see run.py), which sets RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT, STRAIT_SITE and STRAIT_CONFIG.

The text is the licence collection Debian installs on every machine (as in
examples/charlm): "hangzhou" the GNU licences, "singapore" the others.

Writes, per rank, the time of each sync, the bytes this rank sent across
the border, its peak resident memory and a digest of the full parameters
(gathered at the end: every rank of every site must hold the same)."""

import argparse
import hashlib
import json
import os
import resource
import signal
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import fully_shard

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "charlm"))
from train import batch, site_text  # noqa: E402  (charlm's data: the same licence texts)


class GPT(nn.Module):
    """Bytes in, next-byte logits out: embeddings, pre-norm causal
    transformer blocks, a linear head. width 768 and 14 blocks: 99.6M
    parameters."""

    def __init__(self, context=128, width=768, layers=14, heads=None):
        super().__init__()
        heads = heads or max(1, width // 64)
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x):
        t = x.shape[1]
        h = self.embed(x) + self.position[:t]
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h))


@torch.no_grad()
def init_shards(model, world, rank):
    for i, (name, p) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            full = torch.zeros(p.shape)
        elif "norm" in name:
            full = torch.ones(p.shape)
        else:
            full = torch.randn(p.shape, generator=torch.Generator().manual_seed(1234 + i)) * 0.02
        chunks = full.chunk(world, dim=0)  # FSDP2's Shard(0)
        p.to_local().copy_(chunks[rank] if rank < len(chunks) else full[:0])


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def full_digest(params):
    h = hashlib.sha256()
    for p in params:
        h.update(p.full_tensor().detach().contiguous().numpy().tobytes())  # a collective: every rank
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.environ.get("STRAIT_CONFIG"))
    ap.add_argument("--site", default=os.environ.get("STRAIT_SITE"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4, help="sequences per worker per step")
    ap.add_argument("--lr", type=float, default=3e-4, help="inner AdamW learning rate")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--layers", type=int, default=14)
    ap.add_argument("--out", default="gpt-{site}-{rank}.json", help="result file ({site}, {rank} filled in)")
    ap.add_argument("--every-step", action="store_true",
                    help="every-step mode (the config's sync.mode: every_step): strait.fsdp_hook exchanges each "
                         "step's gradients, unit by unit, during backward")
    ap.add_argument("--crash", metavar="SITE/RANK@SYNC",
                    help="that worker kills itself (SIGKILL) after that sync, once: a file 'crashed' beside the "
                         "results holds when (run.py --restart-after shows the site rejoining)")
    args = ap.parse_args()
    if not args.site or not args.config:
        ap.error("--site and --config are required (or STRAIT_SITE and STRAIT_CONFIG, as ./strait launch sets)")

    started_wall = time.time()
    torch.manual_seed(0)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = args.out.format(site=args.site, rank=rank)
    crash_at, marker = None, os.path.join(os.path.dirname(os.path.abspath(out)), "crashed")
    if args.crash:
        who, at = args.crash.split("@")
        if who == f"{args.site}/{rank}" and not os.path.exists(marker):
            crash_at = int(at)
    import strait

    session = strait.init(args.config, site=args.site)
    train, _ = site_text(args.site)
    # Built on the meta device and materialised after sharding, as FSDP2
    # intends for big models: no rank ever holds the whole model. Each
    # tensor's values are drawn whole from a generator of its own (one
    # tensor at a time) and each rank keeps its rows, so every site starts
    # from the same values whatever its number of ranks.
    with torch.device("meta"):
        model = GPT(width=args.width, layers=args.layers)
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)  # the rest (embeddings, head) as one more group
    model.to_empty(device="cpu")
    init_shards(model, dist.get_world_size(), rank)
    model.mask = torch.triu(torch.full((model.context, model.context), float("-inf")), diagonal=1)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    if args.every_step:
        hook, diloco = strait.fsdp_hook(model, session), None  # each step's gradients, piece by piece
    else:
        hook, diloco = None, strait.DiLoCo(model, opt, session)  # FSDP2 parameters: the sharded engine

    def done():
        return diloco.local_steps if diloco else hook.steps
    ready_wall = time.time()  # a restarted site: joined, and its first round (without a contribution) done
    g = torch.Generator().manual_seed(1000 + 10 * session.site_index + rank)
    losses, syncs, sync_ids, step_s, sync_walls, rss_after_sync = [], [], [], [], [], []
    started = time.monotonic()
    while done() < args.steps:
        t0 = time.monotonic()
        x, y = batch(train, args.batch, model.context, g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        t1 = time.monotonic()
        before = diloco.syncs if diloco else 0
        wall = time.time()  # all ranks share this machine's clock: run.py lines the syncs up
        if diloco:
            diloco.step()
        t2 = time.monotonic()
        if diloco and diloco.syncs > before:
            syncs.append(t2 - t1)
            sync_ids.append(diloco.syncs)
            sync_walls.append((wall, time.time()))
            rss_after_sync.append(rss_mb())
            if diloco.syncs == crash_at:
                with open(marker, "w") as f:
                    f.write(str(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
        step_s.append(t1 - t0)
        losses.append(loss.item())
        if rank == 0:
            print(f"{args.site} step {done()}: loss {loss.item():.3f}, step {t1 - t0:.1f} s"
                  + (f", sync {t2 - t1:.2f} s" if diloco and diloco.syncs > before else ""), file=sys.stderr,
                  flush=True)
    if diloco:
        diloco.flush()
    result = {"site": args.site, "rank": rank, "world": dist.get_world_size(),
              "parameters": sum(p.numel() for p in params),
              "local_elements": sum(p.to_local().numel() for p in params),
              "groups": diloco._d.groups() if diloco else hook.groups, "steps": done(),
              "mode": "diloco" if diloco else "every_step", "seconds": time.monotonic() - started,
              "losses": losses, "step_seconds": step_s, "sync_seconds": syncs, "sync_ids": sync_ids,
              "sync_walls": sync_walls, "resumed": diloco.resumed if diloco else "", "started_wall": started_wall,
              "ready_wall": ready_wall,
              "rss_after_sync_mb": rss_after_sync,
              "bytes_sent": session._s.bytes_sent(),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "param_digest": full_digest(params)}
    with open(out, "w") as f:
        json.dump(result, f)
    # Teardown in the order the objects depend on each other: every rank
    # done, then the engine (its group gateways and its hold on the process
    # group), the session, and the process group last.
    dist.barrier()
    del diloco, hook, opt, model, params
    session.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
