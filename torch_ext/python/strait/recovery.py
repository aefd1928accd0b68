"""Checkpoints and resume for every-step mode (docs/RELIABILITY.md), over the
engine's every-step exchange. The checkpoint files, the join protocol and
DiLoCo's own checkpoints are the engine's (torch_ext/csrc/, transport/
checkpoint_store.h): one implementation for Python and libtorch programs."""

import io

import torch

from .session import StraitError, translated


class Checkpoints:
    """Checkpoints and resume for every-step mode (the DDP hook), where every
    site holds the same parameters after each step:

        ckpt = strait.Checkpoints(session, model, optimizer)
        step = ckpt.resume()            # 0, or the step the job continues from
        while step < total:
            ...; optimizer.step()
            step += 1
            ckpt.step(step)             # writes every `checkpoint.every` steps

    A checkpoint holds the parameters, the optimizer's state, every
    error-feedback residual of the hook's compressors, the round counters
    and the job's bucket layout; with --resume every site loads the newest
    step all of them hold. A site restarted with --resume while the others
    run joins them instead: a running site's leader sends it its state
    (the same contents) from `step()` at the end of a step, so call
    `step()` after every optimizer step. DiLoCo checkpoints itself; this
    class is for every-step mode."""

    def __init__(self, session, model, optimizer):
        import yaml

        with open(session.config_path) as f:
            ckpt = (yaml.safe_load(f) or {}).get("checkpoint")
        if not ckpt:
            raise StraitError("strait.Checkpoints: the job config has no checkpoint section (checkpoint: {dir: ...})")
        self.every = int(ckpt.get("every", 10))
        self.session, self.model, self.optimizer = session, model, optimizer
        self.params = [p for _, p in model.named_parameters()]
        self._engine = session.every_step()
        with translated():
            self._engine.register_params(self.params)

    def step(self, steps_done):
        """After the optimizer step that completes `steps_done` steps, on the
        site leader: sends this site's state to every site waiting to join,
        and writes a checkpoint every `checkpoint.every` steps. A failed
        write is reported and training goes on."""
        if not self.session.leader:
            return
        due = steps_done > 0 and steps_done % self.every == 0
        with translated():
            joining = self._engine.joins_waiting()
        if not due and not joining:
            return
        buf = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict()}, buf)
        extra = torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)
        with translated():
            if joining:
                self._engine.serve_joins(int(steps_done), self.params, extra)
            if due:
                self._engine.checkpoint(int(steps_done), self.params, extra)

    def resume(self):
        """With resume (./strait launch --resume): loads the state of a
        running site (a site restarted into a running job), or else the
        newest step every site holds, into the model, the optimizer and the
        hook's state, on every worker; returns that step (0 without resume
        or checkpoints)."""
        if not self.session.resume:
            return 0
        with translated():
            step = self._engine.resume(self.params)
            extra = self._engine.resumed_extra()
        if step and extra.numel():
            state = torch.load(io.BytesIO(extra.numpy().tobytes()), map_location="cpu", weights_only=True)
            self.optimizer.load_state_dict(state["optimizer"])
        return int(step)
