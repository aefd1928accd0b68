"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models"): H local steps with the inner optimizer, then
one outer step on compressed pseudo-gradients from every site. The
algorithm is the engine's (torch.classes.strait.DiLoCo,
torch_ext/csrc/diloco.cc), the same for Python and libtorch programs; this
wrapper adds what only Python has: the inner optimizer's and the model's
buffers' state in checkpoints."""

import io

import torch

from .session import StraitError, translated


class DiLoCo:
    """Wraps a model and its inner optimizer.

        diloco = strait.DiLoCo(model, inner_opt, session, sync_every=50)
        for batch in data:
            loss = ...; loss.backward(); inner_opt.step(); inner_opt.zero_grad()
            diloco.step()          # syncs every `sync_every` calls

    At a sync the site leader forms the pseudo-gradient (global - local
    parameters), compresses each parameter's part with the config's rule for
    its name (e.g. "blocks.0.attn.weight") and size, with error feedback, sends
    all parts in one round, and averages every site's decoded parts (weighted,
    in site order). Every site then applies the same outer step — SGD with
    (Nesterov) momentum — to the same global parameters, broadcasts them
    inside the site, and the local parameters restart from them. Parameters
    are bitwise identical on every worker of every site after each sync.

    sync_every, outer_lr, outer_momentum, nesterov, fragments and overlap
    default to the config's sync.diloco block (then to its defaults: 50, 0.7,
    0.9, true, 1, false). `pipeline` forces one pipeline for every parameter
    instead of the config's rules. With compression.adaptive the leader's
    controller chooses that pipeline, `topk(density) -> int<bits>`, at each
    sync. The config's sync.mode must be diloco.

    SparseLoCo (Sarfi et al. 2025; the config's sync.diloco.sparseloco, or
    sparseloco=True here): every parameter's pseudo-gradient goes through
    chunk-wise top-k with 2-bit (or 4, 8) values, `topk(density,
    chunk=C) -> int2`, with an error-feedback buffer decayed by `decay`
    that takes the place of outer momentum (outer SGD, lr 1 by default).

    Reliability (docs/RELIABILITY.md): with the config's checkpoint section
    the leader writes the site's state every `checkpoint.every` syncs (the
    inner optimizer's state and the model's buffers included); of a model
    sharded with FSDP2, every rank writes its own pieces and its shard's
    optimizer state, and resumes only into as many ranks. In a
    session started with resume (./strait launch --resume) the constructor
    first asks the other sites: if some are still running it takes their
    current state (verified by digest) and joins the round they are in,
    contributing nothing to it; if all are resuming, every site loads the
    newest checkpoint they all hold. Drive the training loop by
    `local_steps` (`while diloco.local_steps < total: ...`), not by a
    counter of its own: a resumed or rejoined site, even one that gives way
    mid-run after a partition, then continues where the job is.

    Streaming fragments (sync.diloco.fragments = F; Douillard et al. 2025)
    and overlap (sync.diloco.overlap) are described in docs/CONFIG.md. Call
    flush() after the training loop: with overlap it applies the round still
    in flight; every worker then takes the global parameters (progress not
    synced yet is dropped), so replicas end identical whatever the step
    count.
    """

    def __init__(self, model, inner_optimizer, session, sync_every=None, outer_lr=None, outer_momentum=None,
                 nesterov=None, pipeline=None, overlap=None, fragments=None, sparseloco=None):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.model = model
        self.inner = inner_optimizer
        self.session = session
        self.params = [p for _, p in named]
        self.sharded = _sharded(self.params, session)
        if self.sharded:
            # FSDP2: each rank exchanges the pieces it owns (docs/PROTOCOL.md,
            # "Sharded exchange"); the engine updates the local shards in place.
            with translated():
                self._d = torch.classes.strait.ShardedDiLoCo(
                    session._s, [n for n, _ in named], [p.to_local() for p in self.params],
                    [list(p.shape) for p in self.params],
                    None if sync_every is None else int(sync_every), None if outer_lr is None else float(outer_lr),
                    None if outer_momentum is None else float(outer_momentum),
                    None if nesterov is None else bool(nesterov), None if fragments is None else int(fragments),
                    None if overlap is None else bool(overlap), pipeline or "",
                    None if sparseloco is None else bool(sparseloco))
            if self._d.resumed() == "checkpoint":
                self._restore(self._d.resumed_extra())
            return
        with translated():
            self._d = torch.classes.strait.DiLoCo(
                session._s, [n for n, _ in named], self.params,
                None if sync_every is None else int(sync_every), None if outer_lr is None else float(outer_lr),
                None if outer_momentum is None else float(outer_momentum),
                None if nesterov is None else bool(nesterov), None if fragments is None else int(fragments),
                None if overlap is None else bool(overlap), pipeline or "",
                None if sparseloco is None else bool(sparseloco))
        if self._d.resumed():
            self._restore(self._d.resumed_extra())

    # -- what a checkpoint holds of the caller's own -------------------------

    def _extra(self):
        """The inner optimizer's state and the model's buffers, as bytes."""
        buf = io.BytesIO()
        torch.save({"optimizer": _local_optimizer_state(self.inner.state_dict()) if self.sharded
                    else self.inner.state_dict(),
                    "buffers": {n: b.detach().cpu() for n, b in self.model.named_buffers()}}, buf)
        return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)

    def _restore(self, extra):
        """After a resume: the inner optimizer (and, from this site's own
        checkpoint, the model's buffers) as they were."""
        if extra.numel() == 0:
            return
        try:
            # The site's own file, read with the weights-only unpickler
            # (tensors, numbers, strings, containers).
            state = torch.load(io.BytesIO(extra.numpy().tobytes()), map_location="cpu", weights_only=True)
            optimizer = state["optimizer"]
            if self.sharded:
                optimizer = _sharded_optimizer_state(optimizer, self.inner)
            self.inner.load_state_dict(optimizer)
        except Exception as e:  # noqa: BLE001 - a damaged or foreign state of any kind
            self.session._s.event(f"the inner optimizer's state in the checkpoint does not fit: {e}; "
                                  "starting it afresh")
            return
        if self._d.resumed() == "checkpoint":
            buffers = dict(self.model.named_buffers())
            with torch.no_grad():
                for name, value in state.get("buffers", {}).items():
                    if name in buffers:
                        buffers[name].copy_(value)

    # -- training --------------------------------------------------------------

    def step(self):
        """After each inner optimizer step: syncs every sync_every /
        fragments calls."""
        if self.sharded:
            # Every rank together: each writes its own pieces and its shard's
            # optimizer state (a rank that fails to says why, and training
            # goes on; the site cannot resume from that round).
            with translated():
                due = self._d.step()
            if due:
                with translated():
                    self._d.write_checkpoint(self._extra())
            return
        try:
            with translated():
                due = self._d.step()
        except StraitError:
            # The job stops: the leader writes the rounds applied so far
            # unless a checkpoint of them exists.
            if self.session.leader:
                with translated():
                    self._d.write_failure_checkpoint(self._extra())
            raise
        if due:
            with translated():
                self._d.write_checkpoint(self._extra())

    def flush(self):
        """Call once after the training loop. With overlap: waits for the
        round still in flight and applies it. Then every worker takes the
        global parameters (progress not synced yet is dropped), so replicas
        end identical whatever the step count."""
        if self.sharded:
            with translated():
                self._d.flush()
            return
        try:
            with translated():
                self._d.flush()
        except StraitError:
            if self.session.leader:
                with translated():
                    self._d.write_failure_checkpoint(self._extra())
            raise

    @property
    def syncs(self):
        return self._d.syncs()

    @property
    def local_steps(self):
        return self._d.local_steps()

    @property
    def resumed(self):
        """How this instance started: None, "checkpoint" or "running" (a peer's state)."""
        return self._d.resumed() or None

    @property
    def global_params(self):
        if self.sharded:
            raise StraitError("strait.DiLoCo.global_params: a sharded model's global parameters are kept per piece "
                              "on the ranks that own them; no rank holds them all (use flush() and full_tensor())")
        return self._d.global_params()

    @property
    def fragments(self):
        if self.sharded:
            return [list(range(len(self.params)))]
        return [list(f) for f in self._d.fragments()]

    @property
    def sync_every(self):
        return self._d.sync_every()

    @property
    def outer_lr(self):
        return self._d.outer_lr()

    @property
    def outer_momentum(self):
        return self._d.outer_momentum()

    @property
    def nesterov(self):
        return self._d.nesterov()

    @property
    def sparseloco(self):
        """SparseLoCo's pipeline and error-feedback decay, or "" (plain DiLoCo)."""
        return "" if self.sharded else self._d.sparseloco()

    @property
    def overlap(self):
        return False if self.sharded else self._d.overlap()


def _local_optimizer_state(state):
    """An optimizer's state_dict with each DTensor (FSDP2's per-parameter
    state: momentum buffers, Adam's moments) replaced by this rank's shard,
    which torch.save and the weights-only loader take."""
    def local(v):
        return v.to_local() if hasattr(v, "to_local") else v
    return {**state, "state": {k: {n: local(v) for n, v in s.items()} for k, s in state["state"].items()}}


def _sharded_optimizer_state(state, optimizer):
    """The inverse of _local_optimizer_state for `optimizer`: each shard
    made a DTensor again like its parameter's (same mesh, same placements)
    where the parameter is one."""
    from torch.distributed.tensor import DTensor

    params = [p for group in optimizer.param_groups for p in group["params"]]
    ids = [i for group in state["param_groups"] for i in group["params"]]
    of = dict(zip(ids, params))
    out = {}
    for k, s in state["state"].items():
        p = of.get(k)
        # The global shape and stride given: FSDP2's shards are torch.chunk's,
        # uneven when the rows do not divide by the ranks.
        out[k] = {n: DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                        stride=p.stride())
                  if isinstance(p, DTensor) and torch.is_tensor(v) and v.dim() > 0 else v
                  for n, v in s.items()}
    return {**state, "state": out}


def _sharded(params, session, who="strait.DiLoCo"):
    """Whether the parameters are FSDP2's (DTensors sharded along dim 0 over
    the site's workers); a mix, or another placement, is an error."""
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without DTensor: nothing can be sharded
        return False
    kinds = {isinstance(p, DTensor) for p in params}
    if kinds != {True}:
        if True in kinds:
            raise StraitError(f"{who}: some parameters are DTensors (FSDP2) and some are not: shard the "
                              "whole model with fully_shard, or none of it")
        return False
    for p in params:
        if p.device_mesh.get_local_rank() != session.rank:
            raise StraitError(f"{who}: this worker is rank {session.rank} of its site but rank "
                              f"{p.device_mesh.get_local_rank()} of the parameters' device mesh; shard over the "
                              "site's process group in its own rank order")
        if tuple(p.placements) != (Shard(0),) or p.device_mesh.size() != session.size:
            raise StraitError(f"{who}: a parameter of shape {tuple(p.shape)} is placed {p.placements} over "
                              f"{p.device_mesh.size()} ranks; the sharded engine takes FSDP2's Shard(0) over all "
                              f"{session.size} workers of the site")
    return True
