"""Every-step mode: a DDP communication hook that averages gradients inside
the site with torch.distributed, then across sites through strait."""

import torch
import torch.distributed as dist


def ddp_hook(session, bucket):
    """Register with `ddp_model.register_comm_hook(session, strait.ddp_hook)`.

    Per gradient bucket: all-reduce (mean) inside the site; the site leader
    compresses the bucket with error feedback, exchanges it with every site and
    takes the weighted mean of every site's decoded payload in site order;
    the result is broadcast inside the site. Every worker of every site ends
    with the same bits.

    This first version runs the cross-site step synchronously inside the hook
    and returns a completed future: correct, but it does not yet overlap the
    exchange with the rest of backward.
    """
    buf = bucket.buffer()
    tag = f"ddp.b{bucket.index()}"
    # DDP rebuilds its buckets after the first iteration, so a bucket index
    # can stand for another set of parameters later: compressors (and their
    # residuals) are keyed by the layout too, and each new layout is checked
    # against the other sites once.
    layout = f"{tag}.n{buf.numel()}"
    if layout not in session._checked:
        session._checked.add(layout)
        # The round tag must not depend on the layout: sites whose layouts
        # differ must still meet in the same round to find out.
        session.check_same_everywhere(
            tag + ".shapes", "\n".join(f"{tuple(p.shape)} {p.dtype}" for p in bucket.parameters()))
    if session.size > 1:
        dist.all_reduce(buf, group=session.group)
        buf.div_(session.size)
    if session.leader:
        mean = session.average_across_sites(buf, tag, compressor_key=layout)
        buf.copy_(mean.to(buf.device, buf.dtype))
    else:
        session.next_round(tag)  # keep round numbers in step with the leader
    session.broadcast(buf)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut
