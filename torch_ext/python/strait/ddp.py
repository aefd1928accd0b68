"""Every-step mode: a DDP communication hook over the engine's every-step
exchange (torch.classes.strait.EveryStep, torch_ext/csrc/every_step.cc)."""

import torch

from .session import Session, StraitError, translated


def ddp_hook(session, bucket):
    """Register with `ddp_model.register_comm_hook(session, strait.ddp_hook)`.

    Per gradient bucket: all-reduce (mean) inside the site; the site leader
    compresses the bucket with the config's rule for "ddp.bucket<INDEX>" of
    its size (or the default pipeline) and error feedback, exchanges it with
    every site and takes the weighted mean of every site's decoded payload in
    site order; the result is broadcast inside the site. Every worker of every
    site ends with the same bits.

    The work runs on the engine's thread and the hook returns at once with a
    future, so backward goes on computing the next buckets while this one
    crosses the border; all of a step's rounds are in flight together and
    are awaited at its last bucket. The first time a bucket layout is seen
    it is checked against every site, and so are the parameters' values:
    sites that start from different parameters are told so at once.
    """
    if not isinstance(session, Session):
        raise StraitError(
            "strait.ddp_hook: the hook's state must be the session strait.init() returns, got "
            f"{type(session).__name__}: call ddp_model.register_comm_hook(strait.init(CONFIG), strait.ddp_hook)")
    engine = session.every_step()
    pending = session._bucket_futures
    fut = torch.futures.Future()
    with translated():
        try:
            pending.append((engine.bucket(bucket.buffer(), bucket.index(), list(bucket.parameters()),
                                          bucket.is_last()), fut))
            if bucket.is_last():
                # The step's rounds end here: wait for them on the autograd
                # thread, so that a failure reaches loss.backward() as the
                # StraitError it is (DDP's C++ reducer reads a hook's future
                # as a value: one completed with an error would reach the
                # training loop as "Unable to cast ... to Tensor").
                engine.finish_step()
                # DDP reads the hooks' futures once backward is done; they
                # carry Python objects, so they are completed here, on a
                # Python thread, not on the engine's. wait(), not value():
                # for GPU buckets it also makes this thread's current stream
                # wait for the engine's stream, which wrote the results.
                for done, f in pending:
                    f.set_result(done.wait())
        finally:
            if bucket.is_last():
                pending.clear()
    return fut
