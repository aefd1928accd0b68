"""Every-step mode: a DDP communication hook that averages gradients inside
the site with torch.distributed, then across sites through strait."""

import torch
import torch.distributed as dist


def _sync_bucket(session, buf, index, params):
    tag = f"ddp.b{index}"
    # DDP rebuilds its buckets after the first iteration, so a bucket index
    # can stand for another set of parameters later: compressors (and their
    # residuals) are keyed by the layout too, and each new layout is checked
    # against the other sites once.
    layout = f"{tag}.n{buf.numel()}"
    if layout not in session._checked:
        session._checked.add(layout)
        # The round tag must not depend on the layout: sites whose layouts
        # differ must still meet in the same round to find out.
        session.check_same_everywhere(tag + ".shapes", "\n".join(f"{tuple(p.shape)} {p.dtype}" for p in params))
    if session.size > 1:
        dist.all_reduce(buf, group=session.group)
        buf.div_(session.size)
    if not session.leader:
        session.next_round(tag)  # keep round numbers in step with the leader
    # Config rules see a bucket as "ddp.bucket<INDEX>" of its size. A failure
    # on the leader (a lost site, a policy refusal) is raised on every worker.
    return session.from_leader(
        lambda: session.average_across_sites(buf, tag, compressor_key=layout,
                                             name=f"ddp.bucket{index}").to(buf.device, buf.dtype), buf)


def ddp_hook(session, bucket):
    """Register with `ddp_model.register_comm_hook(session, strait.ddp_hook)`.

    Per gradient bucket: all-reduce (mean) inside the site; the site leader
    compresses the bucket with the config's rule for "ddp.bucket<INDEX>" of
    its size (or the default pipeline) and error feedback, exchanges it with every site and
    takes the weighted mean of every site's decoded payload in site order;
    the result is broadcast inside the site. Every worker of every site ends
    with the same bits.

    The work runs on the session's communication thread and the hook returns
    at once with a future, so backward goes on computing the next buckets
    while this one crosses the border; DDP waits for every future before the
    optimizer step. One thread, buckets in the order DDP hands them over: the
    same order of collectives on every worker.
    """
    buf = bucket.buffer()
    index = bucket.index()
    params = list(bucket.parameters())
    fut = torch.futures.Future()

    def work():
        try:
            fut.set_result(_sync_bucket(session, buf, index, params))
        except BaseException as e:  # noqa: B902 - surfaces in DDP's wait, on this worker
            fut.set_exception(e)

    session.comm_thread().submit(work)
    return fut
