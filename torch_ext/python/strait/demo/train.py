"""One worker of the digits job (`python -m strait.demo.train`: run by the
demo, by `./strait launch`, or by torchrun inside a site: RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT describe
the worker's own site).

Each site holds its own rows of scikit-learn's bundled digits — mostly
different classes — and never sends a row anywhere; only compressed gradient
updates cross between the sites' gateways. Writes a JSON result (losses,
bytes this site sent across the border per step, final parameters)."""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

HIDDEN = 128


def split():
    """(train x, train y, test x, test y): the same split on every worker."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    t = lambda a, dt: torch.tensor(a, dtype=dt)
    return t(xtr, torch.float32) / 16, t(ytr, torch.int64), t(xte, torch.float32) / 16, t(yte, torch.int64)


def site_rows(x, y, site_index):
    """Site 0 (hangzhou) holds digits 0-4 and a tenth of 5-9; site 1
    (singapore) the reverse: neither can learn all ten digits alone."""
    mine = (y < 5) if site_index == 0 else (y >= 5)
    keep = mine | (torch.arange(len(y)) % 10 == site_index)
    return x[keep], y[keep]


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


def accuracy(m, x, y):
    with torch.no_grad():
        return (m(x).argmax(1) == y).float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    # ./strait launch sets STRAIT_CONFIG and STRAIT_SITE for every worker.
    ap.add_argument("--config", default=os.environ.get("STRAIT_CONFIG"))
    ap.add_argument("--site", default=os.environ.get("STRAIT_SITE"))
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--out", required=True, help="result file; {site} and {rank} are filled in")
    ap.add_argument("--progress", action="store_true", help="print a progress line per step (stderr)")
    args = ap.parse_args()
    if not args.config or not args.site:
        ap.error("--config and --site are required (or STRAIT_CONFIG / STRAIT_SITE, as ./strait launch sets)")

    import strait

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    session = strait.init(args.config, site=args.site)
    xtr, ytr, xte, yte = split()
    x, y = site_rows(xtr, ytr, session.site_index)
    x, y = x[session.rank::session.size], y[session.rank::session.size]

    m = model()
    ddp = nn.parallel.DistributedDataParallel(m)
    ddp.register_comm_hook(session, strait.ddp_hook)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.5, momentum=0.5)
    loss_fn = nn.CrossEntropyLoss()
    losses, sent = [], []
    for step in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        sent.append(session.bytes_sent)
        session.log(step, loss.item())  # a line per step on each site's leader; JSON with --json-log
        if args.progress and step % 5 == 4:
            done = (step + 1) * 30 // args.steps
            print(f"\r  [{'#' * done}{'.' * (30 - done)}] step {step + 1}/{args.steps} loss {loss.item():.3f}",
                  end="", file=sys.stderr, flush=True)
    if args.progress:
        print(file=sys.stderr)
    result = {"site": args.site, "rank": session.rank, "losses": losses, "bytes_sent": sent,
              "test_accuracy": accuracy(m, xte, yte),
              "params": [p.detach().reshape(-1).tolist() for p in m.parameters()]}
    with open(args.out.format(site=args.site, rank=session.rank), "w") as f:
        json.dump(result, f)
    dist.barrier()
    del ddp
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
