"""One worker of a chaos-test job (tests/chaos/): DiLoCo on scikit-learn's
digits, each site its own half of the classes. Started by `./strait launch`
(RANK, WORLD_SIZE, MASTER_*, STRAIT_SITE, STRAIT_CONFIG, STRAIT_RESUME).

Continues from `diloco.local_steps` (a resumed or rejoined site starts where
the job is). Each sync, the leader appends the hash of the global parameters
to OUT/SITE-syncs.jsonl, so the test can compare replicas round by round.
At the end it writes OUT/SITE-RANK.json: the final hash, syncs, how it
started, its resident memory."""

import argparse
import faulthandler
import hashlib
import json
import os
import resource
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

import strait


def site_data(site_index, rank, size):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32) / 16.0
    y = torch.tensor(y, dtype=torch.int64)
    mine = (y % 3) == site_index % 3
    keep = mine | (torch.arange(len(y)) % 10 == 0)
    x, y = x[keep], y[keep]
    return x[rank::size], y[rank::size]


def flat_hash(diloco):
    return hashlib.sha256(diloco.global_params.numpy().tobytes()).hexdigest()[:16]


def main():
    faulthandler.dump_traceback_later(int(os.environ.get("STRAIT_WORKER_TIMEOUT", "300")), exit=True)
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--step-sleep", type=float, default=0.02, help="seconds per step (paces the job)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=["diloco", "every_step"], default="diloco",
                    help="every_step: the DDP hook, with strait.Checkpoints (the config's sync.mode must match)")
    ap.add_argument("--sharded", action="store_true", help="DiLoCo over the model sharded with FSDP2 in the site")
    ap.add_argument("--no-checkpoints", action="store_true",
                    help="every_step: no strait.Checkpoints (the site neither checkpoints nor serves joins)")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    session = strait.init()
    x, y = site_data(session.site_index, session.rank, session.size)
    if args.sharded:
        return sharded(args, session, x, y)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    # Every-step mode: buckets of about 100 bytes, so each of the model's
    # four tensors is a bucket of its own from the second step on (DDP's
    # rebuilt layout), while its first step has them all in one.
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=0.0001 if args.mode == "every_step" else 25)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.2, momentum=0.5)
    loss_fn = nn.CrossEntropyLoss()
    if args.mode == "every_step":
        return every_step(args, session, model, ddp, opt, x, y, loss_fn)
    diloco = strait.DiLoCo(model, opt, session)
    syncs_log = os.path.join(args.out, f"{session.site}-syncs.jsonl")
    last = diloco.syncs
    loss = None
    # Driven by diloco.local_steps, not a loop counter: a resumed or
    # rejoined site (even one that gives way mid-run after a partition)
    # continues where the job is.
    while diloco.local_steps < args.steps:
        step = diloco.local_steps
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        diloco.step()
        session.log(step, loss.item())
        if diloco.syncs != last and session.leader:
            last = diloco.syncs
            with open(syncs_log, "a") as f:
                f.write(json.dumps({"sync": diloco.syncs, "hash": flat_hash(diloco), "time": time.time(),
                                    "missing": getattr(session, "last_missing", [])}) + "\n")
        pace(args, session)
    diloco.flush()  # with fragments: every worker takes the global parameters
    finish(args, session, ddp, flat_hash(diloco), diloco.syncs, diloco.resumed, loss)


def sharded(args, session, x, y):
    """DiLoCo over the model sharded with FSDP2 (fully_shard) in the site.
    After each sync every rank gathers the full parameters (a collective)
    and the leader logs their hash, as for an unsharded model."""
    from torch.distributed.fsdp import fully_shard

    # 33 hidden units: over 2 ranks FSDP2's shards of the first layer are
    # uneven (17 and 16 rows), as a real model's often are.
    model = nn.Sequential(nn.Linear(64, 33), nn.ReLU(), nn.Linear(33, 10))
    for layer in (model[0], model[2]):
        fully_shard(layer)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    loss_fn = nn.CrossEntropyLoss()
    diloco = strait.DiLoCo(model, opt, session)
    assert diloco.sharded

    def full_hash():
        h = hashlib.sha256()
        for p in model.parameters():
            h.update(p.full_tensor().detach().contiguous().numpy().tobytes())
        return h.hexdigest()[:16]

    syncs_log = os.path.join(args.out, f"{session.site}-syncs.jsonl")
    last = diloco.syncs
    loss = None
    while diloco.local_steps < args.steps:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        diloco.step()
        session.log(diloco.local_steps, loss.item())
        if diloco.syncs != last:
            last = diloco.syncs
            digest = full_hash()
            if session.leader:
                with open(syncs_log, "a") as f:
                    f.write(json.dumps({"sync": diloco.syncs, "hash": digest, "time": time.time(), "missing": []})
                            + "\n")
        pace(args, session)
    diloco.flush()
    finish(args, session, model, full_hash(), diloco.syncs, diloco.resumed, loss)


def pace(args, session):
    """--step-sleep per step, and 0.25 s more while OUT/SITE.slow exists: a
    test holds a site back that way while another site restarts, so the
    running site cannot finish before the other is back, however slowly the
    machine starts processes."""
    time.sleep(args.step_sleep)
    if os.path.exists(os.path.join(args.out, f"{session.site}.slow")):
        time.sleep(0.25)


def finish(args, session, ddp, digest, syncs, resumed, loss):
    """OUT/SITE-RANK.json (the parameters' hash, syncs or steps, how the
    worker started, its peak memory), then an orderly teardown."""
    result = {"site": session.site, "rank": session.rank, "hash": digest, "syncs": syncs, "resumed": resumed,
              "loss": None if loss is None else loss.item(),
              "max_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}
    with open(os.path.join(args.out, f"{session.site}-{session.rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier()
    del ddp
    session.close()


def every_step(args, session, model, ddp, opt, x, y, loss_fn):
    """The DDP hook across sites, with strait.Checkpoints: resumes from the
    newest step every site holds, writes OUT/SITE-RANK.json at the end."""
    ddp.register_comm_hook(session, strait.ddp_hook)
    ckpt = None if args.no_checkpoints else strait.Checkpoints(session, model, opt)
    step = resumed = ckpt.resume() if ckpt else 0
    loss = None
    while step < args.steps:
        opt.zero_grad()
        loss = loss_fn(ddp(x), y)
        loss.backward()
        opt.step()
        step += 1
        if ckpt:
            ckpt.step(step)
        session.log(step, loss.item())
        pace(args, session)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    finish(args, session, ddp, hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16], step, resumed or None, loss)


if __name__ == "__main__":
    code = 0
    try:
        main()
    except RuntimeError as e:
        if "strait" not in str(e):
            raise
        print(f"strait error: {e}", file=sys.stderr)
        code = 3
    if dist.is_initialized():
        import gc
        gc.collect()
        dist.destroy_process_group()
    sys.exit(code)
