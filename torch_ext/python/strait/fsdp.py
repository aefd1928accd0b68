"""Every-step mode over a model sharded with FSDP2: the all-reduce hook of
each fully_shard unit hands its reduce-scattered gradient shards to the
engine (torch.classes.strait.ShardedEveryStep, torch_ext/csrc/
sharded_every_step.cc), which exchanges them piece by piece across the
border while backward goes on."""

import functools

import torch

from .session import Session, StraitError, translated


def _units(model, trained):
    """The fully_shard units of `model` (FSDPModules, in module order) and,
    for each, the indices into `trained` of the parameters its reduce-
    scatter holds: its own parameters that are trained, not those of a unit
    nested in it, in module order (FSDP2's own order)."""
    from torch.distributed.fsdp import FSDPModule

    index = {id(p): i for i, p in enumerate(trained)}
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if model not in units:
        raise StraitError("strait.fsdp_hook: the model itself is not a fully_shard unit: call fully_shard(model) "
                          "after sharding its blocks, as FSDP2 expects")
    out = []
    for unit in units:
        nested = set()
        for sub in unit.modules():
            if sub is not unit and isinstance(sub, FSDPModule):
                nested.update(id(p) for p in sub.parameters())
        out.append([index[id(p)] for p in unit.parameters() if id(p) not in nested and id(p) in index])
    return units, out


class FSDPHook:
    """What strait.fsdp_hook returns: the engine, and the hooks it set."""

    def __init__(self, model, session):
        if not isinstance(session, Session):
            raise StraitError("strait.fsdp_hook: the second argument must be the session strait.init() returns, got "
                              f"{type(session).__name__}")
        from .diloco import _sharded

        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        if not self.params or not _sharded(self.params, session, "strait.fsdp_hook"):
            raise StraitError("strait.fsdp_hook: the model's parameters are not sharded with FSDP2 (fully_shard); "
                              "for a model replicated with DDP use ddp_model.register_comm_hook(session, "
                              "strait.ddp_hook)")
        self.modules, self.units = _units(model, self.params)
        self.session = session
        with translated():
            self._e = torch.classes.strait.ShardedEveryStep(
                session._s, [n for n, _ in named], [p.to_local() for p in self.params],
                [list(p.shape) for p in self.params], self.units)
        self._handed = []  # this step's units, in order, and their parameters' gradients before it
        self._queued = False
        for m, module in enumerate(self.modules):
            module.set_all_reduce_hook(functools.partial(self._hook, m))

    def _hook(self, m, output):
        # FSDP2 calls this with the unit's reduce-scatter output: the site's
        # mean gradient of each of its parameters, this rank's Shard(0) rows
        # first in a segment padded to ceil(rows / ranks) rows.
        if output.dtype == torch.float16:
            raise StraitError("strait.fsdp_hook: the unit's gradients are reduced in float16, which FSDP2 divides "
                              "after the hook; use MixedPrecisionPolicy(reduce_dtype=torch.float32 or bfloat16)")
        world = self.session.size
        views, offset = [], 0
        for i in self.units[m]:
            p = self.params[i]
            rows = p.shape[0] if p.dim() > 0 else 1
            padded = -(-rows // world) * (p.numel() // rows if rows else 0)
            views.append(output[offset:offset + p.to_local().numel()])
            offset += padded
        if offset != output.numel():
            raise StraitError(
                f"strait.fsdp_hook: unit {m} ({type(self.modules[m]).__name__}) reduced {output.numel()} gradient "
                f"elements on this rank, but its trained parameters take {offset}: did a parameter get no gradient "
                "this step? Every trained parameter must take part in every step")
        if not self._queued:
            # After backward (and FSDP2's own end-of-backward work): the step's
            # rounds are awaited and the gradients replaced by the job's mean.
            torch.autograd.Variable._execution_engine.queue_callback(self._finish)
            self._queued = True
        # A gradient already there is accumulated into by FSDP2: keep it, to
        # add the job's mean to it at the end.
        before = [None if self.params[i].grad is None else self.params[i].grad.to_local().detach().clone()
                  for i in self.units[m]]
        self._handed.append((m, before))
        with translated():
            self._e.unit(m, views)

    def _finish(self):
        handed, self._handed, self._queued = self._handed, [], False
        with translated():
            means = self._e.finish_step()
        k = 0
        with torch.no_grad():
            for m, before in sorted(handed, key=lambda h: h[0]):
                for i, old in zip(self.units[m], before):
                    local = self.params[i].grad.to_local()
                    mean = means[k].view(local.shape)
                    local.copy_(mean if old is None else old + mean)
                    k += 1

    @property
    def steps(self):
        return self._e.steps()

    @property
    def groups(self):
        return self._e.groups()

    def privacy_spent(self):
        return list(self._e.privacy_spent())


def fsdp_hook(model, session):
    """Every-step mode for a model sharded with FSDP2 (fully_shard over the
    site's workers, Shard(0), the model itself the root unit): call it once,
    after sharding and before training; `loss.backward()` then ends with every
    parameter's gradient the weighted mean of every site's, the same bits on
    every rank of every site.

    HSDP-style: each unit's hook hands this rank's shard of the site's mean
    gradient to the engine, which exchanges the pieces this rank owns with
    the ranks owning them at the other sites (docs/PROTOCOL.md, "Sharded
    exchange"), compressed by the config's rule for the parameter, while
    backward goes on; the rounds are awaited at the end of backward. Sites
    may have different numbers of ranks. Agrees on the model with the other
    sites and starts every site from site 0's parameters.
    """
    return FSDPHook(model, session)
