"""Every-step mode over a model sharded with FSDP2: the all-reduce hook of
each fully_shard unit hands its reduce-scattered gradient shards to the
engine (torch.classes.strait.ShardedEveryStep, torch_ext/csrc/
sharded_every_step.cc), which exchanges them piece by piece across the
border while backward goes on."""

import functools
import weakref

import torch

from .session import Session, StraitError, translated


def _units(model, trained):
    """The fully_shard units of `model` and, for each, the indices into
    `trained` of the parameters its reduce-scatter holds, in FSDP2's order
    (its parameter group's: a module's own parameters after its children's;
    several modules sharded together are one unit). Units without trained
    parameters are left out. FSDP2 exposes the order only through its
    parameter groups, which torch 2.11 keeps at `_get_fsdp_state()`."""
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        raise StraitError("strait.fsdp_hook: the model itself is not a fully_shard unit: call fully_shard(model) "
                          "after sharding its blocks, as FSDP2 expects")
    index = {id(p): i for i, p in enumerate(trained)}
    units, params, seen = [], [], set()
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        try:
            group = module._get_fsdp_state()._fsdp_param_group
            order = None if group is None else [fp.sharded_param for fp in group.fsdp_params]
        except AttributeError as e:
            raise StraitError(f"strait.fsdp_hook: this torch's FSDP2 ({torch.__version__}) does not keep its "
                              f"parameter groups where torch 2.11 does ({e}); the hook needs each unit's parameters "
                              "in FSDP2's order") from None
        if group is None or id(group) in seen:
            continue
        seen.add(id(group))
        _check_reduction(group, module)
        mine = [index[id(p)] for p in order if id(p) in index]
        if mine:
            units.append((module, group))
            params.append(mine)
    return units, params


def _check_reduction(group, module):
    """The hook must see the site's mean gradient: a forced sum (divided
    after the hook) or a divide factor of the program's (the hook sees the
    sum divided by it) would weigh sites of different sizes wrongly."""
    if getattr(group, "force_sum_reduction_for_comms", False) or \
            getattr(group, "gradient_divide_factor", None) is not None:
        raise StraitError(f"strait.fsdp_hook: unit {type(module).__name__} reduces its gradients by sum or by a "
                          "factor of its own (set_force_sum_reduction_for_comms or set_gradient_divide_factor): "
                          "its all-reduce hook would not see the site's mean")


def _closed(output):
    raise StraitError("strait.fsdp_hook: the session is closed (session.close() ended the exchange); training on "
                      "would average inside this site only")


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
        units, self.units = _units(model, self.params)
        self.modules = [m for m, _ in units]
        self._groups = [g for _, g in units]
        self._device = None  # where FSDP2 reduces (the hooks' outputs)
        self.session = session
        with translated():
            self._e = torch.classes.strait.ShardedEveryStep(
                session._s, [n for n, _ in named], [p.to_local() for p in self.params],
                [list(p.shape) for p in self.params], self.units)
        self._handed = []  # this step's units, in order, and their parameters' gradients before it
        self._queued = False
        for m, module in enumerate(self.modules):
            module.set_all_reduce_hook(functools.partial(self._hook, m))
        # The engine's group gateways and its hold on the site's process group
        # end before the session's (session.close() calls close()).
        session._engines.append(weakref.ref(self))

    def close(self):
        """Ends the engine (its group gateways: each lingers until what it
        sent was acknowledged); a backward after it raises. Called by
        session.close(); safe to call twice."""
        for module in self.modules:
            module.set_all_reduce_hook(_closed)
        self.modules = []
        self._e = None

    def _hook(self, m, output):
        # FSDP2 calls this with the unit's reduce-scatter output: the site's
        # mean gradient of each of its parameters, this rank's Shard(0) rows
        # first in a segment padded to ceil(rows / ranks) rows.
        try:
            self._hand_over(m, output)
        except BaseException as e:
            # The step cannot end: a unit's rounds may be started, and no
            # end-of-backward callback runs after a failed backward.
            self._handed, self._queued = [], False
            if self._e is not None:
                self._e.abort(f"{type(e).__name__}: {e}")
            raise

    def _hand_over(self, m, output):
        engine = self._engine()
        _check_reduction(self._groups[m], self.modules[m])  # the program may have changed it since
        self._device = output.device
        if output.dtype not in (torch.float32, torch.bfloat16):
            raise StraitError(f"strait.fsdp_hook: the unit's gradients are reduced in {output.dtype}, which FSDP2 "
                              "divides after the hook; use MixedPrecisionPolicy(reduce_dtype=torch.float32 or "
                              "torch.bfloat16)")
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
        # A gradient already there is accumulated into by FSDP2 after the hook
        # returns: keep it, to add the job's mean to it at the end. A failure
        # here (memory) is handed over too, so that every rank of the site
        # raises rather than some waiting in the engine's collectives.
        failed = ""
        try:
            before = [None if self.params[i].grad is None else self.params[i].grad.to_local().detach().clone()
                      for i in self.units[m]]
        except Exception as e:
            failed = f"rank {self.session.rank}: {type(e).__name__}: {e}"
        with translated():
            engine.unit(m, views, failed)
        self._handed.append((m, before))

    def _finish(self):
        handed, self._handed, self._queued = self._handed, [], False
        try:
            with translated():
                means = self._engine().finish_step()
        except BaseException as e:
            if self._e is not None:  # the other sites learn at once that this one stopped, and why
                self._e.abort(f"{type(e).__name__}: {e}")
            raise
        if self._device is not None and self._device.type != "cpu":
            # FSDP2 writes the gradients on its own streams (and copies them
            # to the host under CPU offload); the end of backward waits for
            # them only on the last backward of a step.
            sync = getattr(getattr(torch, "accelerator", None), "synchronize", None)
            sync() if sync else torch.cuda.synchronize()
        k = 0
        with torch.no_grad():
            for m, before in sorted(handed, key=lambda h: h[0]):
                for i, old in zip(self.units[m], before):
                    local = self.params[i].grad.to_local()
                    mean = means[k].view(local.shape)
                    local.copy_(mean if old is None else old + mean)
                    k += 1

    def _engine(self):
        if self._e is None:
            raise StraitError("strait.fsdp_hook: closed (session.close() ends it)")
        return self._e

    @property
    def steps(self):
        return self._engine().steps()

    @property
    def groups(self):
        return self._engine().groups()

    def privacy_spent(self):
        return list(self._engine().privacy_spent())


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
