"""Every-step mode: a DDP communication hook that averages gradients inside
the site with torch.distributed, then across sites through strait."""

import zlib

import torch
import torch.distributed as dist

from .session import Session, StraitError


def _start_bucket(session, buf, index, params):
    """First half, as soon as DDP hands the bucket over: agreement check (the
    first time a layout is seen), mean inside the site, and on the leader the
    compressed payload's round started. Returns the leader's handle, or the
    StraitError that stopped it (raised on every worker in _finish_bucket)."""
    tag = f"ddp.b{index}"
    # DDP rebuilds its buckets after the first iteration (and after every
    # restart), so a bucket index can stand for other parameters, or the same
    # ones in another order, later: compressors (and their residuals) are
    # keyed by the layout — size and the order of shapes — so a residual is
    # never added to another parameter's values, and each new layout is
    # checked against the other sites once.
    shapes = "\n".join(f"{tuple(p.shape)} {p.dtype}" for p in params)
    layout = f"{tag}.n{buf.numel()}.{zlib.crc32(shapes.encode()):08x}"
    if layout not in session._checked:
        session._checked.add(layout)
        # The round tag must not depend on the layout: sites whose layouts
        # differ must still meet in the same round to find out.
        session.check_same_everywhere(tag + ".shapes", shapes)
    if session.size > 1:
        dist.all_reduce(buf, group=session.group)
        buf.div_(session.size)
    if not session.leader:
        session.next_round(tag)  # keep round numbers in step with the leader
        return None
    try:
        # Config rules see a bucket as "ddp.bucket<INDEX>" of its size; with
        # adaptive compression the controller's pipeline of this step wins.
        pipeline = session.adaptive.pipeline if session.adaptive is not None else None
        return session.start_average(buf, tag, pipeline=pipeline, compressor_key=layout, name=f"ddp.bucket{index}")
    except StraitError as e:
        return e


def _finish_bucket(session, buf, handle):
    """Second half: the leader waits for the round and decodes; the result is
    broadcast inside the site. A failure on the leader is raised on every
    worker."""
    def mean():
        if isinstance(handle, BaseException):
            raise handle
        out = session.finish_average(handle).to(buf.device, buf.dtype)
        _check_parted(session)
        return out

    return session.from_leader(mean, buf)


def _check_parted(session):
    """Leader: a site this one parted from (one of them completed a round
    without the other, on_site_loss: continue; the gateway's diverged peers)
    holds other parameters from now on, and every-step mode has no state
    transfer to reconcile them: the higher-index site of the pair stops with
    a StraitError instead of training on with a replica that silently
    differs; the other says so and goes on."""
    for name in session.gateway.diverged_peers():
        if session.sites.index(name) < session.site_index:
            raise StraitError(
                f"strait {session.site}: this site and '{name}' applied different rounds (one completed a round "
                f"without the other: a frozen or cut-off site under on_site_loss: continue), so their replicas "
                f"differ; every-step mode cannot reconcile them in place: this site stops. Restart every site "
                f"with --resume (strait.Checkpoints), or use on_site_loss: wait")
        session._log_event(f"site '{name}' and this site applied different rounds (one completed a round without "
                           f"the other); every-step mode cannot reconcile them: '{name}' stops, this site goes on")


def ddp_hook(session, bucket):
    """Register with `ddp_model.register_comm_hook(session, strait.ddp_hook)`.

    Per gradient bucket: all-reduce (mean) inside the site; the site leader
    compresses the bucket with the config's rule for "ddp.bucket<INDEX>" of
    its size (or the default pipeline) and error feedback, exchanges it with
    every site and takes the weighted mean of every site's decoded payload in
    site order; the result is broadcast inside the site. Every worker of every
    site ends with the same bits.

    The work runs on the session's communication thread and the hook returns
    at once with a future, so backward goes on computing the next buckets
    while this one crosses the border. Each bucket's round starts as soon as
    the bucket is ready; the rounds are awaited (and broadcast) only when the
    last bucket of the step has started, so all of a step's rounds are in
    flight together and a step costs one round trip, not one per bucket. In
    a site of one worker (no collectives to keep in order) rounds that are
    already done are finished as soon as the next bucket arrives, so their
    decoding overlaps with backward. One thread, buckets in DDP's order: the
    same order of collectives on every worker.
    """
    if not isinstance(session, Session):
        raise StraitError(
            "strait.ddp_hook: the hook's state must be the session strait.init() returns, got "
            f"{type(session).__name__}: call ddp_model.register_comm_hook(strait.init(CONFIG), strait.ddp_hook)")
    if session._join_server is None:
        # A site restarted with --resume asks to join: tell it this job
        # cannot take it in, rather than let it train alone.
        from .recovery import refuse_joins
        session._join_server = ("ddp.", lambda round_: refuse_joins(session))
    buf = bucket.buffer()
    index = bucket.index()
    params = list(bucket.parameters())
    last = bucket.is_last()
    fut = torch.futures.Future()

    def work():
        pending = session.__dict__.setdefault("_ddp_pending", [])
        try:
            pending.append((buf, fut, _start_bucket(session, buf, index, params)))
            if session.size == 1 and not last:
                # A site of one worker has no collectives to keep in order:
                # finish the rounds that are already done, so their decode
                # overlaps with backward (on a fast link that is most of them).
                while pending and session.average_ready(pending[0][2]):
                    b, f, handle = pending.pop(0)
                    f.set_result(_finish_bucket(session, b, handle))
            if last:
                import time

                waiting = time.monotonic()
                while pending:
                    b, f, handle = pending[0]
                    f.set_result(_finish_bucket(session, b, handle))
                    pending.pop(0)
                done = time.monotonic()
                previous = session.__dict__.get("_step_done")
                session._step_done = done
                if session.adaptive is not None and session.leader and previous is not None:
                    note = session.adaptive.update(done - waiting, waiting - previous)
                    if note:
                        session._adaptive_note = note
        except BaseException as e:  # noqa: B902 - raised by the step's last hook call, on this worker
            session._ddp_failure = e
            for _, f, _ in pending:
                if not f.done():
                    f.set_exception(e)
            pending.clear()
            if not fut.done():
                fut.set_exception(e)

    done = session.comm_thread().submit(work)
    if last:
        # The step's rounds end in this call: wait for them here, on the
        # autograd thread, so that a failure reaches loss.backward() as the
        # StraitError it is. DDP's C++ reducer reads a hook's future as a
        # value: one completed with set_exception would reach the training
        # loop as "Unable to cast ... to Tensor".
        done.result()
        failure = session.__dict__.pop("_ddp_failure", None)
        if failure is not None:
            raise failure
    return fut
