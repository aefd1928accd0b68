#!/usr/bin/env python3
"""One worker of the charlm job: a small byte-level transformer language model,
trained with DiLoCo across sites. Started by `./strait launch` (see run.py),
which sets RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, STRAIT_SITE and
STRAIT_CONFIG; inside a site the workers are one DDP group (gloo).

The text is the licence collection Debian installs on every machine
(/usr/share/common-licenses, package base-files). Each site reads only its
own files: "hangzhou" the GNU licences, "singapore" the others (Apache, MPL,
BSD, Artistic, CC0). The last tenth of each file is that site's held-out text.
"""

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

CORPUS = "/usr/share/common-licenses"
SITE_FILES = {
    "hangzhou": ["GPL-1", "GPL-2", "GPL-3", "LGPL-2", "LGPL-2.1", "LGPL-3", "GFDL-1.2", "GFDL-1.3"],
    "singapore": ["Apache-2.0", "Artistic", "BSD", "CC0-1.0", "MPL-1.1", "MPL-2.0"],
}


def site_files(site, corpus=CORPUS):
    if site not in SITE_FILES:
        raise SystemExit(f"charlm: no data for site '{site}'; sites with data: {', '.join(SITE_FILES)}")
    paths = [os.path.join(corpus, name) for name in SITE_FILES[site]]
    for path in paths:
        if not os.path.isfile(path):
            raise SystemExit(f"charlm: {path} is missing (Debian's base-files package installs it)")
    return paths


def site_text(site, paths=None):
    """(training bytes, held-out bytes) of the site's files, as uint8 tensors."""
    train, held = [], []
    for path in paths or site_files(site):
        data = open(path, "rb").read()
        cut = len(data) * 9 // 10
        train.append(data[:cut])
        held.append(data[cut:])
    as_tensor = lambda parts: torch.tensor(list(b"\n".join(parts)), dtype=torch.uint8)  # noqa: E731
    return as_tensor(train), as_tensor(held)


class CharLM(nn.Module):
    """Bytes in, next-byte logits out: embeddings, pre-norm causal
    transformer layers, a linear head."""

    def __init__(self, context=64, width=128, layers=2, heads=4):
        super().__init__()
        self.context = context
        self.embed = nn.Embedding(256, width)
        self.position = nn.Parameter(torch.zeros(context, width))
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 256)
        mask = torch.triu(torch.full((context, context), float("-inf")), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)
        nn.init.normal_(self.position, std=0.02)

    def forward(self, x):
        t = x.shape[1]
        h = self.embed(x) + self.position[:t]
        h = self.blocks(h, mask=self.mask[:t, :t])
        return self.head(self.norm(h))


def batch(data, size, context, generator):
    starts = torch.randint(0, data.numel() - context - 1, (size,), generator=generator)
    idx = starts[:, None] + torch.arange(context + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


@torch.no_grad()
def bits_per_byte(model, data, context, batches=8):
    g = torch.Generator().manual_seed(1234)  # the same held-out windows every time
    total = 0.0
    for _ in range(batches):
        x, y = batch(data, 32, context, g)
        total += nn.functional.cross_entropy(model(x).reshape(-1, 256), y.reshape(-1)).item()
    return total / batches / math.log(2)


def digest(model):
    import hashlib

    h = hashlib.sha256()
    for p in model.parameters():
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.environ.get("STRAIT_CONFIG"))
    ap.add_argument("--site", default=os.environ.get("STRAIT_SITE"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16, help="sequences per worker per step")
    ap.add_argument("--lr", type=float, default=3e-3, help="inner AdamW learning rate")
    ap.add_argument("--alone", action="store_true", help="train this site alone (no strait), for comparison")
    ap.add_argument("--out", default="charlm-{site}-{rank}.json", help="result file ({site}, {rank} filled in)")
    ap.add_argument("--data", help="the site's dataset directory (default: the first one its policy lists, "
                                   "$STRAIT_DATA; without either, the licence files themselves)")
    args = ap.parse_args()
    if not args.site:
        ap.error("--site is required (or STRAIT_SITE, as ./strait launch sets)")

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    data_dir = args.data or (os.environ.get("STRAIT_DATA") or "").split(os.pathsep)[0] or None
    paths = None
    if data_dir:
        # Through strait: refused if the dataset is held under another
        # jurisdiction than this site's, or is not one the launcher gave it.
        import strait.data
        import yaml

        with open(args.config) as f:
            me = [s for s in yaml.safe_load(f)["sites"] if s["name"] == args.site][0]
        paths = strait.data.open_dataset(data_dir, jurisdiction=me["jurisdiction"]).files
    train, held = site_text(args.site, paths)
    model = CharLM()
    ddp = nn.parallel.DistributedDataParallel(model)  # inside the site: plain gloo all-reduce
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(1000 + rank)

    session = diloco = None
    if not args.alone:
        if not args.config:
            ap.error("--config is required (or STRAIT_CONFIG, as ./strait launch sets)")
        import strait

        session = strait.init(args.config, site=args.site)
        # sync_every, the outer optimizer and each parameter's codec come from the config.
        diloco = strait.DiLoCo(model, opt, session)
    start_bpb = bits_per_byte(model, held, model.context)
    losses, started = [], time.monotonic()
    # With DiLoCo the loop follows diloco.local_steps: a site started with
    # `./strait launch --resume` (the config needs a checkpoint section)
    # continues where the job is, whether from a checkpoint or a peer.
    step = diloco.local_steps if diloco else 0
    while step < args.steps:
        x, y = batch(train, args.batch, model.context, g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if diloco:
            diloco.step()
            session.log(step, loss.item())  # prints at each sync (a round), on the site leader
        elif rank == 0 and step % 50 == 49:
            print(f"{args.site} alone step {step + 1}: loss {loss.item():.3f}", file=sys.stderr, flush=True)
        step = diloco.local_steps if diloco else step + 1
    if diloco:
        diloco.flush()  # with sync.diloco.overlap or fragments: the same global parameters everywhere
    if rank == 0:  # the model may cross the border (data never does): run.py compares them at each site
        torch.save(model.state_dict(), args.out.format(site=args.site, rank=rank) + ".model.pt")
    result = {"site": args.site, "rank": rank, "alone": args.alone, "steps": args.steps,
              "seconds": time.monotonic() - started, "losses": losses,
              "held_out_bits_per_byte": {"start": start_bpb, "end": bits_per_byte(model, held, model.context)},
              "parameters": sum(p.numel() for p in model.parameters()),
              "bytes_sent": session.bytes_sent if session else 0, "syncs": diloco.syncs if diloco else 0,
              "param_digest": digest(model)}
    with open(args.out.format(site=args.site, rank=rank), "w") as f:
        json.dump(result, f)
    dist.barrier()
    del ddp
    if session:
        session.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
