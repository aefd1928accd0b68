"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models"): H local steps with the inner optimizer, then
one outer step on compressed pseudo-gradients from every site."""

import hashlib
import time

import torch

from . import recovery
from .session import StraitError


def split_fragments(sizes, n):
    """Streaming DiLoCo's fragments: n lists of indices into `sizes` (the
    parameter tensors' sizes, in model order) of about equal total size —
    largest tensor first, to the lightest fragment, ties to the lower index —
    each in model order. It depends only on the model, which the sites check
    is the same everywhere, so every site forms the same fragments. The
    libtorch API (strait::torch::DiLoCo, torch_ext/csrc/api.cc) applies the
    same rule."""
    if n > len(sizes):
        raise ValueError(f"DiLoCo: fragments = {n}, but the model has only {len(sizes)} parameter tensors")
    loads, groups = [0] * n, [[] for _ in range(n)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        f = min(range(n), key=lambda f: (loads[f], len(groups[f]), f))  # (empty tensors too)
        groups[f].append(i)
        loads[f] += sizes[i]
    return [sorted(g) for g in groups]


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
    in site order). Every
    site then applies the same outer step — SGD with (Nesterov) momentum — to
    the same global parameters, broadcasts them inside the site, and the local
    parameters restart from them. Parameters are bitwise identical on every
    worker of every site after each sync.

    sync_every, outer_lr, outer_momentum and nesterov default to the config's
    sync.diloco block (then to its defaults: 50, 0.7, 0.9, true). `pipeline`
    forces one pipeline for every parameter instead of the config's rules.
    With compression.adaptive the leader's controller (strait/adaptive.py)
    chooses that pipeline, `topk(density) -> int<bits>`, at each sync: it
    compares how long the leader waited for the round, beyond the shortest
    wait seen, with the compute time of the inner steps since the previous
    wait — with overlap, the steps the exchange crossed behind.

    Reliability (docs/RELIABILITY.md): with the config's checkpoint section
    the leader writes the site's state every `checkpoint.every` syncs. In a
    session started with resume (./strait launch --resume) the constructor
    first asks the other sites: if some are still running it takes their
    current state (verified by SHA-256) and joins the round they are in,
    contributing nothing to it; if all are resuming, every site loads the
    newest checkpoint they all hold. Drive the training loop by
    `local_steps` (`while diloco.local_steps < total: ...`), not by a
    counter of its own: a resumed or rejoined site, even one that gives way
    mid-run after a partition, then continues where the job is. While
    training, the leader answers other sites' join requests whenever it
    waits for a sync round.

    Streaming fragments (sync.diloco.fragments = F, or fragments=F; Douillard
    et al. 2025, "Streaming DiLoCo"): the parameter tensors are split into F
    fragments of about equal size, and every sync_every / F steps one
    fragment syncs, in turn — each fragment still once per sync_every steps,
    with its own slice of the outer momentum, so the bytes per period are
    those of plain DiLoCo, spread over F rounds of 1/F the size each.

    Overlap (sync.diloco.overlap, or overlap=True): a sync starts its
    exchange and returns; the mean arrives while the next inner steps compute
    (sync_every / F of them) and its outer step is applied at the following
    sync. The parameters it covers then become the new global ones plus the
    site's own progress that is not in them yet, so a link that carries a
    round within that time costs no wall time and no local progress is held
    back. A checkpoint (every `checkpoint.every` syncs) first waits for the
    round just started, so it holds no round in flight and a whole job
    resumes from it exactly (a round that fails, e.g. at the hard deadline,
    also leaves one: the rounds applied so far); a single restarted site cannot join a running
    overlapped job (its state always has a round in flight): it stops with
    a clear error, and the job resumes as a whole.

    Call flush() after the training loop: with overlap it applies the round
    still in flight; with overlap or fragments every worker then takes the
    global parameters (progress not yet sent is dropped), so replicas end
    identical. (Session.close() warns on the site leader if it was not.)
    """

    def __init__(self, model, inner_optimizer, session, sync_every=None, outer_lr=None, outer_momentum=None,
                 nesterov=None, pipeline=None, overlap=None, fragments=None):
        conf = session.sync_config.get("diloco") or {}
        fragments = int(conf.get("fragments", 1)) if fragments is None else int(fragments)
        sync_every = int(conf.get("sync_every", 50)) if sync_every is None else sync_every
        outer_lr = float(conf.get("outer_lr", 0.7)) if outer_lr is None else outer_lr
        outer_momentum = float(conf.get("outer_momentum", 0.9)) if outer_momentum is None else outer_momentum
        nesterov = bool(conf.get("nesterov", True)) if nesterov is None else nesterov
        self.overlap = bool(conf.get("overlap", False)) if overlap is None else bool(overlap)
        self._inflight = None  # overlap: the exchange started at the previous sync
        if sync_every < 1:
            raise ValueError(f"DiLoCo: sync_every = {sync_every}: must be >= 1")
        if fragments < 1 or sync_every % fragments:
            raise ValueError(f"DiLoCo: fragments = {fragments}: must be a divisor of sync_every ({sync_every})")
        if not (outer_lr > 0):
            raise ValueError(f"DiLoCo: outer_lr = {outer_lr}: must be > 0")
        if not (0 <= outer_momentum < 1):
            raise ValueError(f"DiLoCo: outer_momentum = {outer_momentum}: must be in [0, 1)")
        self.model = model
        self.inner = inner_optimizer
        self.session = session
        self.sync_every = sync_every
        self.outer_lr = outer_lr
        self.mu = outer_momentum
        self.nesterov = nesterov
        self.pipeline = pipeline
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for _, p in named]
        self.parts, offset = [], 0  # (offset, numel, name, shape) of each parameter in the flat vector
        for n, p in named:
            self.parts.append((offset, p.numel(), n, tuple(p.shape)))
            offset += p.numel()
        self.fragments = split_fragments([numel for _, numel, *_ in self.parts], fragments)
        self.interval = sync_every // fragments  # inner steps between two syncs (of consecutive fragments)
        description = "\n".join(f"{n} {tuple(p.shape)}" for n, p in named)
        self._model_digest = hashlib.sha256(description.encode()).hexdigest()
        self.local_steps = 0
        self.syncs = 0
        self.resumed = None  # how this instance started: None, "checkpoint" or "running" (a peer's state)
        self._diverged = False
        self._absent = set()  # sites left out of rounds applied here, until they rejoin or return
        self._wait_end = None  # leader: when the last wait for a round ended (adaptive compression)
        with torch.no_grad():
            flat = self._local()
            self.momentum = torch.zeros_like(flat)
            if not (session.resume and self._recover(flat)):
                # The schedule too: constructor arguments can override the config.
                session.check_same_everywhere("diloco.model", f"{description}\nschedule: sync_every {sync_every}, "
                                              f"fragments {fragments}, overlap {self.overlap}")
                # Start from one set of weights everywhere: site 0's leader's.
                self.global_params = self._agree(flat)
                self._load(self.global_params)
        # From now on this site can hand its state to a site that (re)joins
        # (its rounds: "diloco" and "diloco.base"); with overlap the state
        # would miss the round in flight, so a site that asks is told no.
        session._join_server = ("diloco", self._serve if not self.overlap else
                                (lambda round_: recovery.refuse_joins(session, "overlapped DiLoCo")))
        # Overlap: the local parameters as they were when this site's
        # progress was last sent (per element; progress since is unsent).
        self._sent = self.global_params.clone() if self.overlap else None
        self._started = self.syncs  # overlap: rounds started (self.syncs counts rounds applied)
        self._unflushed = False  # overlap or fragments: synced since the last flush() (Session.close warns)
        session._diloco = self

    def _gather(self, flat, f):
        """Fragment f's values of a full flat vector (the vector itself, not
        a copy, with one fragment), and its parts re-based to them."""
        if len(self.fragments) == 1:
            return flat, self.parts
        pieces, parts, at = [], [], 0
        for i in self.fragments[f]:
            offset, numel, name, shape = self.parts[i]
            pieces.append(flat[offset:offset + numel])
            parts.append((at, numel, name, shape))
            at += numel
        return torch.cat(pieces), parts

    def _scatter(self, flat, values, f):
        """The inverse of _gather: writes fragment f's values into flat."""
        if values.data_ptr() == flat.data_ptr():
            return
        at = 0
        for i in self.fragments[f]:
            offset, numel = self.parts[i][:2]
            flat[offset:offset + numel].copy_(values[at:at + numel])
            at += numel

    def _load(self, flat, f=None):
        """Copies flat (a full vector) into the parameters, or only into
        fragment f's."""
        members = None if f is None or len(self.fragments) == 1 else set(self.fragments[f])
        for i, (p, (offset, n, *_)) in enumerate(zip(self.params, self.parts)):
            if members is None or i in members:
                p.data.copy_(flat[offset:offset + n].view_as(p).to(p.device, p.dtype))

    def _local(self):
        return recovery.flatten(self.params)

    def _agree(self, flat):
        """Every worker adopts site 0's initial parameters. Sites compare a
        digest first (a control message of 32 bytes): when they already agree
        (the same seed), no parameters cross; otherwise site 0 sends its own,
        uncompressed, and the other sites send nothing."""
        s = self.session
        flat = flat.contiguous()

        def agree():  # on the site leader
            digest = hashlib.sha256(flat.numpy().tobytes()).digest()
            digests, _ = s._exchange("diloco.init.digest", torch.tensor(list(digest), dtype=torch.uint8),
                                     kind="control")
            if all(d.numel() == 0 or bytes(d.tolist()) == digest for d in digests):
                return flat
            return s.average_across_sites_exact(flat, "diloco.init", send=s.site_index == 0)

        return s.from_leader(agree, flat)

    # -- checkpoints and recovery (strait/recovery.py) --------------------

    def _state(self):
        """What a site that (re)joins needs from a running one."""
        return ({"params": recovery.params_digest(self.global_params), "syncs": self.syncs,
                 "model": self._model_digest},
                {"global": self.global_params, "momentum": self.momentum, "syncs": self.syncs})

    def _serve(self, round_):
        """Leader, while waiting for sync round `round_`: answers join requests."""
        if round_ == self.syncs:  # the state before this round's outer step
            # A site that joins takes this side's state: nothing to reconcile with it later.
            self._absent.difference_update(recovery.serve_joins(self.session, round_, self._state))

    def _checkpoint(self):
        """Leader: writes this site's state after self.syncs syncs. A failure
        is reported and training goes on (the older checkpoints are intact)."""
        s = self.session
        store = s.checkpoints
        residuals = {key: residual for key, _, residual in s.residuals("diloco")}
        state = {"round": self.syncs, "global": self.global_params.clone(), "momentum": self.momentum.clone(),
                 "local_steps": self.local_steps, "model": self.model.state_dict(),
                 "optimizer": self.inner.state_dict(), "residuals": residuals, "rounds": dict(s._rounds),
                 "audit_head": s.gateway.audit_head(), "audit_records": int(s.gateway.audit_records())}
        store.save_reported(s, f"round {self.syncs}", self.syncs, recovery.params_digest(self.global_params), state)

    def _on_failure(self):
        """When a round failed (the job stops): the leader writes the state
        of the rounds applied so far unless that checkpoint exists already;
        there is no flush() to remind anyone of."""
        s = self.session
        self._unflushed = False
        if s.leader and s.checkpoints is not None:
            if (self.syncs, recovery.params_digest(self.global_params)) not in s.checkpoints.held():
                self._checkpoint()

    def _recover(self, flat, give_way=False):
        """--resume: the join protocol on the leader, its outcome broadcast in
        the site. Returns False when nobody holds anything (a fresh start).
        give_way: this site parted from the others and must take a running
        site's state (StraitError if none answers)."""
        s = self.session
        store = s.checkpoints
        outcome = {}

        def leader():
            held = store.held() if store else []
            started = time.monotonic()
            result = recovery.join(s, self._model_digest, held, flat.numel())
            outcome["kind"] = result[0]
            if result[0] == "running" and result[3] is None:
                raise recovery.refused(s, result)
            if result[0] == "running" and self.overlap:
                raise StraitError(f"strait.DiLoCo: site '{s.sites[result[1]]}' is running and offers its state, but "
                                  f"this site runs overlapped DiLoCo, which cannot join a running job; use the "
                                  f"same sync.diloco settings on every site")
            if result[0] == "running":
                _, i, header, state = result
                self.momentum.copy_(state["momentum"])
                outcome["syncs"] = int(state["syncs"])
                # Site-local state (inner optimizer) from this site's own newest checkpoint, if any.
                outcome["ckpt"] = held[-1] if held else None
                s._log_event(f"joined: state of round {outcome['syncs']} from site '{s.sites[i]}' "
                             f"(SHA-256 verified) in {time.monotonic() - started:.2f} s")
                return state["global"].float()
            if result[0] != "running" and give_way:
                # Its own checkpoints hold the state it parted from the
                # others with: loading one would be training alone again.
                raise StraitError(f"strait: site '{s.site}' gave way after parting from the other sites, but no "
                                  f"running site answered its join request ({result[0]}); its own state is not "
                                  f"the job's: restart it with --resume once the others run")
            if result[0] == "checkpoint":
                _, r, d, absent = result
                state = store.load(r, d)
                self.momentum.copy_(state["momentum"])
                outcome["syncs"] = r
                outcome["ckpt"] = (r, d)
                for key, residual in state.get("residuals", {}).items():
                    name = key[len("diloco."):]
                    s.compressor(key, name=name, size=residual.numel()).set_residual(residual)
                held_by = ("every site holds it" if not absent else
                           f"held by every site that answered; no answer from {', '.join(absent)}")
                s._log_event(f"resumed from round {r} ({held_by}): {store.path(r, d)}; audit log "
                             f"head then {state.get('audit_head') or 'none'}, now {s.gateway.audit_head() or 'none'}")
                return state["global"].float()
            return flat

        out = s.from_leader(leader, flat.clone())
        # The site's workers learn the outcome: [kind, syncs, checkpoint round] and the momentum.
        kinds = {"fresh": 0, "checkpoint": 1, "running": 2}
        ckpt = outcome.get("ckpt")
        info = torch.tensor([kinds.get(outcome.get("kind"), 0), outcome.get("syncs", 0),
                             ckpt[0] if ckpt else -1,
                             recovery.digest_to_int(ckpt[1]) if ckpt else 0],
                            dtype=torch.int64)
        kind, syncs, ckpt_round, ckpt_digest = (int(v) for v in s.broadcast(info).tolist())
        if kind == 0:
            return False
        s.broadcast(self.momentum)
        self.global_params = out
        self._load(self.global_params)
        self.syncs = self._started = syncs
        self.local_steps = syncs * self.interval
        s._rounds["diloco"] = syncs
        s._rounds["diloco.base"] = syncs
        if ckpt_round >= 0 and store is not None:
            state = store.load(ckpt_round, recovery.int_to_digest(ckpt_digest))
            if kind == 1:
                # Buffers, and with fragments the local parameters of the
                # fragments not synced last. Plain DiLoCo restarts from the
                # global ones (a checkpoint written at a failed round holds
                # unsynced local ones).
                self.model.load_state_dict(state["model"])
                if len(self.fragments) == 1:
                    self._load(self.global_params)
                self.local_steps = int(state["local_steps"])
            try:
                self.inner.load_state_dict(state["optimizer"])
            except (ValueError, KeyError) as e:
                s._log_event(f"the inner optimizer's state in round {ckpt_round}'s checkpoint does not fit: {e}; "
                             "starting it afresh")
        self.resumed = "checkpoint" if kind == 1 else "running"
        if kind == 2:
            # The running sites are waiting in round `syncs` (they answered
            # from there): take part without a contribution, so this site
            # applies the same outer step and stays in step.
            self.sync(contribute=False)
            self.local_steps = self.syncs * self.interval
        return True

    def _membership(self, missing):
        """Leader, after each sync: sites left out of a round this site
        applied are remembered; when one of them is heard again in the same
        life (the gateway's returned peers: a cut link, not a restart), both
        sides went on alone (on_site_loss: continue). The side without the
        lowest-index site gives way: if that site has a lower index than
        this one, this site drops its state and rejoins."""
        s = self.session
        self._absent.update(missing)
        # A site that closed a round without this one while this one used
        # that round (or the reverse): the gateway saw it happen (Closed).
        # This holds whatever the round counters say, also when a frozen
        # site woke up behind the others.
        for name in s.gateway.diverged_peers():
            self._absent.discard(name)
            self._parted(name, f"site '{name}' and this site applied different rounds (one closed a round "
                               f"without the other)")
        for name in s.gateway.returned_peers():
            if name not in self._absent:
                continue
            self._absent.discard(name)
            self._parted(name, f"site '{name}' is back after a partition during which both sides went on")

    def _parted(self, name, why):
        """Leader: this site and `name` hold different state. The side
        without the lower-index site gives way (sync fetches the state)."""
        s = self.session
        if s.sites.index(name) > s.site_index:
            s._log_event(f"{why}; it will fetch this side's state")
        elif not self._diverged:
            s._log_event(f"{why}; this site gives way and fetches the state of the side with '{name}'")
            self._diverged = True

    def _keep(self, bases, payloads):
        """Leader: the sites whose payloads this round may use. Normally all;
        when sites report different global parameters (a healed partition
        under on_site_loss: continue), the group holding the lowest site
        index wins (as in _membership); a site outside it drops the round
        and fetches the winners' state (sync)."""
        s = self.session
        groups = {}
        for i, b in enumerate(bases):
            if b.numel() and payloads[i].numel() or i == s.site_index:
                groups.setdefault(bytes(b.tolist()), []).append(i)
        if len(groups) <= 1:
            return set(range(len(payloads)))
        # The group with the lowest site index: the same side as _membership picks.
        winners = min(groups.values(), key=min)
        losers = sorted(i for g in groups.values() if g is not winners for i in g)
        names = lambda idx: ", ".join(s.sites[i] for i in idx)  # noqa: E731
        if s.site_index in winners:
            s._log_event(f"round {self.syncs}: sites {names(losers)} hold other global parameters (a partition "
                         f"healed?); going on with {names(winners)}, the others fetch this state")
        else:
            s._log_event(f"round {self.syncs}: this site's global parameters differ from those of "
                         f"{names(winners)} (a partition healed?); dropping this round and fetching theirs")
            self._diverged = True
        return set(winners)

    # -- training ----------------------------------------------------------

    def step(self):
        self.local_steps += 1
        if self.local_steps % self.interval == 0:
            self.sync()

    @torch.no_grad()
    def _sync_overlapped(self):
        """Overlap: this site's progress on the next fragment since it was
        last sent starts crossing now; the previous round's mean, which
        crossed during the inner steps since, is applied."""
        s = self.session
        f = self._started % len(self.fragments)
        local = self._local()
        pseudo, parts = self._gather(self._sent - local, f)
        self._scatter(self._sent, self._gather(local, f)[0], f)  # sent up to here
        base = recovery.params_digest(self.global_params)
        handle = None
        if s.leader:
            try:
                handle = (self._start_base(base), s.start_parts(pseudo, parts, "diloco", pipeline=self._pipeline()))
            except StraitError as e:
                handle = e
        previous, self._inflight = self._inflight, (handle, f, pseudo)
        self._started += 1
        self._unflushed = True
        if previous is not None:
            try:
                self._apply_inflight(previous, local, pending=(f, pseudo))
            except StraitError:
                # As without overlap: stop with this site's state on disk,
                # the rounds applied so far (a resume starts with nothing in
                # flight and nothing sent: `_sent` is the global parameters).
                self._on_failure()
                raise
        if s.checkpoints is not None and self._started % s.checkpoints.every == 0:
            # A checkpoint holds no round in flight: wait for the one just
            # started (every site does, at the same sync), then write.
            inflight, self._inflight = self._inflight, None
            self._apply_inflight(inflight, self._local())
            if s.leader:
                self._checkpoint()
                self._wait_end = time.monotonic()  # the drain is not compute the next round hid behind

    def _apply_inflight(self, inflight, local, pending=None):
        """Waits for an overlapped round (on the leader), broadcasts its mean
        in the site and applies the outer step to its fragment g. g's
        parameters become the new global ones plus this site's progress not
        in them yet: what it has not sent, and the round `pending` = (fragment,
        pseudo-gradient) just started if that is g's too (one fragment)."""
        s = self.session
        handle, g, _ = inflight

        def finish():
            if isinstance(handle, BaseException):
                raise handle
            keep, started = handle
            waiting = time.monotonic()
            out = s.finish_parts(started, keep=keep)
            self._membership(s.last_missing)
            if pending is not None:  # not a checkpoint's wait for the round just started
                self._adapt(waiting)
            return out

        outer_grad = s.from_leader(finish, torch.empty(sum(self.parts[i][1] for i in self.fragments[g]),
                                                       dtype=torch.float32))
        if int(s.broadcast(torch.tensor([int(self._diverged)], dtype=torch.int64))[0]):
            raise StraitError("strait.DiLoCo: this site's parameters diverged from the other sites' after a "
                              "partition, and overlap mode cannot rejoin in place; restart the site")
        self._outer_step(outer_grad, g)
        unsent = self._gather(local, g)[0] - self._gather(self._sent, g)[0]
        start = self._gather(self.global_params, g)[0]
        start = start - pending[1] if pending is not None and pending[0] == g else start.clone()
        self._scatter(self._sent, start, g)
        self._scatter(local, start + unsent if unsent.any() else start, g)
        self._load(local, g)

    def _pipeline(self):
        """The pipeline forced on every part: the constructor's, else the
        adaptive controller's (compression.adaptive), else None (the
        config's rule for each parameter)."""
        adaptive = self.session.adaptive
        return self.pipeline or (adaptive.pipeline if adaptive is not None else None)

    def _adapt(self, waiting):
        """Leader, after waiting for a round since `waiting`: feeds the
        adaptive controller that wait and the compute time since the
        previous sync's wait ended (the inner steps the exchange could hide
        behind)."""
        s = self.session
        done = time.monotonic()
        if s.adaptive is not None and self._wait_end is not None:
            note = s.adaptive.update(done - waiting, waiting - self._wait_end)
            if note:
                s._adaptive_note = note  # in the next session.log record and line
        self._wait_end = done

    def _outer_step(self, outer_grad, f=0):
        """The same outer step, in the same float32 ops, on every worker,
        for fragment f (outer_grad holds its values)."""
        momentum, _ = self._gather(self.momentum, f)
        params, _ = self._gather(self.global_params, f)
        momentum.mul_(self.mu).add_(outer_grad)
        update = outer_grad.add(momentum, alpha=self.mu) if self.nesterov else momentum
        params.sub_(update, alpha=self.outer_lr)
        self._scatter(self.momentum, momentum, f)
        self._scatter(self.global_params, params, f)
        self.syncs += 1

    def _start_base(self, base):
        """Leader: the "diloco.base" round that goes with each sync: which
        global parameters (digest) this site's pseudo-gradient is relative to.
        Returns keep(payloads) for the sync's parts (_keep)."""
        s = self.session
        check = s._start("diloco.base", torch.tensor(list(bytes.fromhex(base)), dtype=torch.uint8), kind="control")
        return lambda payloads: self._keep(s._finish(check)[0], payloads)

    @torch.no_grad()
    def flush(self):
        """Call once after the training loop. With overlap: waits for the
        round still in flight and applies it. With overlap or fragments:
        every worker then takes the global parameters (progress not sent
        yet is dropped), so replicas end identical. Otherwise a no-op."""
        if self._inflight is not None:
            previous, self._inflight = self._inflight, None
            self._apply_inflight(previous, self._local())
        if self.overlap or len(self.fragments) > 1:
            if self.overlap:
                self._sent = self.global_params.clone()
            self._load(self.global_params)
        self._unflushed = False

    @torch.no_grad()
    def sync(self, contribute=True):
        """One outer step. With contribute=False this site sends nothing (a
        site that has just joined) and applies the others' mean."""
        if self.overlap:
            return self._sync_overlapped()
        s = self.session
        f = self.syncs % len(self.fragments)
        local = self._local()
        pseudo, parts = self._gather(self.global_params - local, f)
        base = recovery.params_digest(self.global_params)

        def exchange():  # on the site leader
            # Every site also says which global parameters its pseudo-gradient
            # is relative to: after a partition healed under `continue` the
            # two sides differ, and only one side may go on (_keep).
            keep = self._start_base(base)
            started = time.monotonic()
            out = s.average_parts_across_sites(pseudo, parts, "diloco", pipeline=self._pipeline(),
                                               contribute=contribute, keep=keep)
            self._membership(s.last_missing)
            self._adapt(started)
            return out

        try:
            outer_grad = s.from_leader(exchange, torch.empty_like(pseudo))
        except StraitError as e:
            # A lost site and `wait` ended at the hard deadline (or the round
            # failed otherwise): stop with this site's state on disk.
            self._on_failure()
            raise e from None
        if int(s.broadcast(torch.tensor([int(self._diverged)], dtype=torch.int64))[0]):
            # This site was on the losing side of a partition: its parameters
            # are not the job's any more. Drop this round, take the state of
            # the sites that went on.
            self._diverged = False
            if s.leader:
                # A new incarnation: the winners void what this site sent
                # while apart, and its round counters start afresh.
                s.restart_gateway()
            self._recover(local, give_way=True)  # a running site's state, or a StraitError
            return
        self._outer_step(outer_grad, f)
        self._load(self.global_params, f)
        self._unflushed = len(self.fragments) > 1
        if s.leader and s.checkpoints is not None and self.syncs % s.checkpoints.every == 0:
            self._checkpoint()
