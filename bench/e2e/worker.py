#!/usr/bin/env python3
"""One site's worker for `./strait bench e2e` (bench/e2e/run.py starts it
inside the site's network namespace). The charlm model and the site's own
text from examples/charlm; the same seed, batches and steps in every mode:

  ddp       torch DDP, one gloo world spanning both sites, uncompressed
  powersgd  the same with PyTorch's PowerSGD communication hook
  strait    strait every-step mode: one world per site, strait.ddp_hook
  diloco    strait DiLoCo: one world per site, strait.DiLoCo
  overlap   the same, overlapped (sync.diloco.overlap in the config)
  streaming the same, overlapped, in fragments (sync.diloco.fragments)
  sparseloco strait DiLoCo with sync.diloco.sparseloco in the config
  alone     this site's compute only, no communication at all

Writes a JSON result: wall time at each step's end, losses, and (site 0's
rank 0) the final parameters for the driver to score on held-out text.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, os.path.join(ROOT, "examples", "charlm"))
import train as charlm  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", required=True, choices=["ddp", "powersgd", "strait", "diloco", "overlap", "streaming",
                                                         "sparseloco", "alone"])
    ap.add_argument("--site", required=True)
    ap.add_argument("--site-index", type=int, required=True)
    ap.add_argument("--config")
    ap.add_argument("--steps", type=int, required=True, help="steps to train (with --stop-file: at most)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--out", required=True)
    ap.add_argument("--period", type=int, default=1,
                    help="steps between syncs (DiLoCo): snapshots and stops fall on multiples of it")
    ap.add_argument("--snapshot-at", default="",
                    help="comma-separated seconds: site 0 saves its model (OUT.snapSTEP.pt) at the first period's end "
                         "at or after each")
    ap.add_argument("--stop-file",
                    help="the driver writes here the step count to stop at (a multiple of --period, not yet "
                         "reached by either site), when the run has had its time")
    ap.add_argument("--progress", help="written after every step: the training start and the step's end (epoch s), and the steps done")
    args = ap.parse_args()

    torch.manual_seed(0)
    torch.set_num_threads(1)
    # ddp/powersgd: RANK/WORLD_SIZE/MASTER_* describe one world of both sites;
    # the others: a world of this site alone.
    dist.init_process_group("gloo")
    train, _ = charlm.site_text(args.site)
    model = charlm.CharLM()
    if args.mode == "powersgd":
        # One gradient bucket from the first step on. PowerSGD's hook chains
        # collectives in future callbacks, which run on gloo's threads; with
        # several buckets in flight the two ranks can issue them in different
        # orders and gloo aborts (seen with torch 1.13: "op.preamble.length <=
        # op.nbytes"). One bucket keeps one order.
        dist._DEFAULT_FIRST_BUCKET_BYTES = 1 << 30
    ddp = nn.parallel.DistributedDataParallel(model, bucket_cap_mb=1024 if args.mode == "powersgd" else 25)
    session = diloco = None
    if args.mode == "powersgd":
        from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook

        # PyTorch's recommended setup: rank 4, error feedback, warm start,
        # plain all-reduce for the first steps.
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=10,
                                            use_error_feedback=True, warm_start=True, random_seed=0)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif args.mode in ("strait", "diloco", "overlap", "streaming", "sparseloco"):
        import strait

        session = strait.init(args.config, site=args.site, log=False)
        if args.mode == "strait":
            ddp.register_comm_hook(session, strait.ddp_hook)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3, weight_decay=0.01)
    if args.mode in ("diloco", "overlap", "streaming", "sparseloco"):
        # overlap, streaming: sync.diloco.overlap and fragments in the config
        diloco = strait.DiLoCo(model, opt, session)
    g = torch.Generator().manual_seed(1000 + args.site_index)
    dist.barrier()
    start = time.time()
    ends, losses, snapshots = [], [], []
    marks = sorted(float(t) for t in args.snapshot_at.split(",") if t)
    progress = os.open(args.progress, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) if args.progress else None
    stop_at = args.steps
    step = 0
    while True:
        if args.stop_file and stop_at == args.steps and os.path.exists(args.stop_file):
            with open(args.stop_file) as f:  # written whole (a rename): never half a number
                stop_at = int(f.read())
            if stop_at < step or stop_at % args.period:
                raise SystemExit(f"bench e2e worker: told to stop at step {stop_at}, at step {step} with period "
                                 f"{args.period}")
        if step >= stop_at:
            break
        x, y = charlm.batch(train, args.batch, model.context, g)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(ddp(x).reshape(-1, 256), y.reshape(-1))
        loss.backward()
        opt.step()
        if diloco:
            diloco.step()
        losses.append(loss.item())
        ends.append(time.time())
        if session:
            session.log(step, losses[-1])  # the round log (JSON lines, STRAIT_JSON_LOG) for the driver
        step += 1
        if progress is not None:  # fixed width, one write at offset 0: the driver never reads half a line
            os.pwrite(progress, f"{start:17.6f} {ends[-1]:17.6f} {step:12d}\n".encode(), 0)
        if args.site_index == 0 and step % 20 == 0:
            print(f"\r    {args.mode}: step {step}", end="", file=sys.stderr, flush=True)
        if (marks and args.site_index == 0 and dist.get_rank() == 0 and step % args.period == 0 and
                step < stop_at and ends[-1] - start >= marks[0]):
            # For the driver's held-out score at this time (DiLoCo: taken
            # right after a sync, when the local model is the global one).
            torch.save(model.state_dict(), f"{args.out}.snap{step}.pt")
            snapshots.append([step, time.time()])
            marks = [t for t in marks if t > ends[-1] - start]
    if diloco:
        diloco.flush()  # overlap: the last round, still in flight, counts in the last step
        ends[-1] = time.time()
    if args.site_index == 0:
        print(file=sys.stderr)
    if dist.get_rank() == 0:
        torch.save(model.state_dict(), args.out + ".model.pt")
    with open(args.out, "w") as f:
        json.dump({"mode": args.mode, "site": args.site, "start": start, "ends": ends, "losses": losses,
                   "snapshots": snapshots,
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "payload_bytes_sent": session.bytes_sent if session else None}, f)
    dist.barrier()
    del ddp
    if session:
        session.close()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
