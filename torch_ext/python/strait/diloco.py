"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models"): H local steps with the inner optimizer, then
one outer step on compressed pseudo-gradients from every site."""

import hashlib
import time

import torch

from . import recovery
from .session import StraitError


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

    Overlap (sync.diloco.overlap, or overlap=True): a sync starts its
    exchange and returns; the mean arrives while the next `sync_every` inner
    steps compute and its outer step is applied at the following sync. Each
    round starts from the newest global parameters plus the site's own
    previous round (not yet averaged), so a link that carries a round within
    H inner steps costs no wall time and no local progress is held back.
    Call flush() after the loop to apply the last round. Checkpoints,
    --resume and serving joins are not available with overlap yet (refused).

    Streaming fragments (Douillard et al. 2025) are not implemented yet: a
    config with sync.diloco.fragments > 1 is refused rather than ignored.
    """

    def __init__(self, model, inner_optimizer, session, sync_every=None, outer_lr=None, outer_momentum=None,
                 nesterov=None, pipeline=None, overlap=None):
        conf = session.sync_config.get("diloco") or {}
        if int(conf.get("fragments", 1)) > 1:
            raise StraitError("strait.DiLoCo: sync.diloco.fragments > 1 (streaming DiLoCo) is not implemented "
                              "yet; remove it or set it to 1")
        sync_every = int(conf.get("sync_every", 50)) if sync_every is None else sync_every
        outer_lr = float(conf.get("outer_lr", 0.7)) if outer_lr is None else outer_lr
        outer_momentum = float(conf.get("outer_momentum", 0.9)) if outer_momentum is None else outer_momentum
        nesterov = bool(conf.get("nesterov", True)) if nesterov is None else nesterov
        self.overlap = bool(conf.get("overlap", False)) if overlap is None else bool(overlap)
        if self.overlap and (session.resume or session.checkpoints is not None):
            raise StraitError("strait.DiLoCo: sync.diloco.overlap cannot be combined with checkpoints or --resume yet "
                              "(a checkpoint would miss the round in flight); remove one of them")
        self._inflight = None  # overlap: the exchange started at the previous sync
        if sync_every < 1:
            raise ValueError(f"DiLoCo: sync_every = {sync_every}: must be >= 1")
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
        description = "\n".join(f"{n} {tuple(p.shape)}" for n, p in named)
        self._model_digest = hashlib.sha256(description.encode()).hexdigest()
        self.local_steps = 0
        self.syncs = 0
        self.resumed = None  # how this instance started: None, "checkpoint" or "running" (a peer's state)
        self._diverged = False
        self._absent = set()  # sites left out of rounds applied here, until they rejoin or return
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])
            self.momentum = torch.zeros_like(flat)
            if not (session.resume and self._recover(flat)):
                session.check_same_everywhere("diloco.model", description)
                # Start from one set of weights everywhere: site 0's leader's.
                self.global_params = self._agree(flat)
                self._load(self.global_params)
        # From now on this site can hand its state to a site that (re)joins
        # (not with overlap: the state would miss the round in flight).
        if not self.overlap:
            session._join_server = ("diloco", self._serve)  # its rounds: "diloco" and "diloco.base"
        self._round_start = self.global_params.clone() if self.overlap else None
        self._round_base = self._round_start
        self._pending_round = False  # overlap: a round is in flight (the same on every worker)

    def _load(self, flat):
        offset = 0
        for p in self.params:
            n = p.numel()
            p.data.copy_(flat[offset:offset + n].view_as(p).to(p.device, p.dtype))
            offset += n

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

    def _recover(self, flat):
        """--resume: the join protocol on the leader, its outcome broadcast in
        the site. Returns False when nobody holds anything (a fresh start)."""
        s = self.session
        store = s.checkpoints
        outcome = {}

        def leader():
            held = store.held() if store else []
            started = time.monotonic()
            result = recovery.join(s, self._model_digest, held, flat.numel())
            outcome["kind"] = result[0]
            if result[0] == "running":
                _, i, header, state = result
                self.momentum.copy_(state["momentum"])
                outcome["syncs"] = int(state["syncs"])
                # Site-local state (inner optimizer) from this site's own newest checkpoint, if any.
                outcome["ckpt"] = held[-1] if held else None
                s._log_event(f"joined: state of round {outcome['syncs']} from site '{s.sites[i]}' "
                             f"(SHA-256 verified) in {time.monotonic() - started:.2f} s")
                return state["global"].float()
            if result[0] == "checkpoint":
                _, r, d = result
                state = store.load(r, d)
                self.momentum.copy_(state["momentum"])
                outcome["syncs"] = r
                outcome["ckpt"] = (r, d)
                for key, residual in state.get("residuals", {}).items():
                    name = key[len("diloco."):]
                    s.compressor(key, name=name, size=residual.numel()).set_residual(residual)
                s._log_event(f"resumed from round {r} (every site holds it): {store.path(r, d)}; audit log "
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
        self.syncs = syncs
        self.local_steps = syncs * self.sync_every
        s._rounds["diloco"] = syncs
        s._rounds["diloco.base"] = syncs
        if ckpt_round >= 0 and store is not None:
            state = store.load(ckpt_round, recovery.int_to_digest(ckpt_digest))
            if kind == 1:
                self.model.load_state_dict(state["model"])  # buffers; parameters are overwritten next
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
            self.local_steps = self.syncs * self.sync_every
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
        for name in s.gateway.returned_peers():
            if name not in self._absent:
                continue
            self._absent.discard(name)
            if s.sites.index(name) < s.site_index:
                s._log_event(f"site '{name}' is back after a partition during which both sides went on; "
                             f"this site gives way and fetches the state of the side with '{name}'")
                self._diverged = True
            else:
                s._log_event(f"site '{name}' is back after a partition during which both sides went on; "
                             f"it will fetch this side's state")

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
        if self.local_steps % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def _sync_overlapped(self):
        """Overlap: this round's pseudo-gradient (relative to the point the
        round started from) starts crossing now; the previous round's mean,
        which crossed during this round's inner steps, is applied; the next
        round starts from the new global parameters."""
        s = self.session
        local = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])
        pseudo = self._round_start - local
        base = recovery.params_digest(self._round_base)
        handle = None
        if s.leader:
            try:
                handle = (self._start_base(base), s.start_parts(pseudo, self.parts, "diloco", pipeline=self.pipeline))
            except StraitError as e:
                handle = e
        previous, self._inflight = self._inflight, handle
        had, self._pending_round = self._pending_round, True
        if had:
            self._apply_inflight(previous, local)
        # The next round starts from the newest global parameters plus this
        # site's own round, whose mean is still crossing (it replaces it at
        # the next sync): no local progress waits a round to count.
        self._round_base = self.global_params.clone()
        self._round_start = self.global_params - pseudo
        self._load(self._round_start)

    def _apply_inflight(self, handle, like):
        """Waits for an overlapped round (on the leader), broadcasts its mean
        in the site and applies the outer step."""
        s = self.session

        def finish():
            if isinstance(handle, BaseException):
                raise handle
            keep, started = handle
            out = s.finish_parts(started, keep=keep)
            self._membership(s.last_missing)
            return out

        outer_grad = s.from_leader(finish, torch.empty_like(like))
        if int(s.broadcast(torch.tensor([int(self._diverged)], dtype=torch.int64))[0]):
            raise StraitError("strait.DiLoCo: this site's parameters diverged from the other sites' after a "
                              "partition, and overlap mode cannot rejoin in place; restart the site")
        self._outer_step(outer_grad)

    def _outer_step(self, outer_grad):
        """The same outer step, in the same float32 ops, on every worker."""
        self.momentum.mul_(self.mu).add_(outer_grad)
        update = outer_grad.add(self.momentum, alpha=self.mu) if self.nesterov else self.momentum
        self.global_params.sub_(update, alpha=self.outer_lr)
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
        """Overlap: waits for the round still in flight and applies it, so
        that global_params (and the model) hold every round. Call it once
        after the training loop; a no-op without overlap."""
        if not self.overlap or not self._pending_round:
            return
        previous, self._inflight, self._pending_round = self._inflight, None, False
        self._apply_inflight(previous, self.global_params)
        self._round_base = self.global_params.clone()
        self._round_start = self.global_params.clone()
        self._load(self.global_params)

    @torch.no_grad()
    def sync(self, contribute=True):
        """One outer step. With contribute=False this site sends nothing (a
        site that has just joined) and applies the others' mean."""
        if self.overlap:
            return self._sync_overlapped()
        s = self.session
        local = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])
        pseudo = self.global_params - local
        base = recovery.params_digest(self.global_params)

        def exchange():  # on the site leader
            # Every site also says which global parameters its pseudo-gradient
            # is relative to: after a partition healed under `continue` the
            # two sides differ, and only one side may go on (_keep).
            keep = self._start_base(base)
            out = s.average_parts_across_sites(pseudo, self.parts, "diloco", pipeline=self.pipeline,
                                               contribute=contribute, keep=keep)
            self._membership(s.last_missing)
            return out

        try:
            outer_grad = s.from_leader(exchange, torch.empty_like(local))
        except StraitError as e:
            # A lost site and `wait` ended at the hard deadline (or the round
            # failed otherwise): stop with this site's state on disk.
            if s.leader and s.checkpoints is not None:
                digest = recovery.params_digest(self.global_params)
                if (self.syncs, digest) not in s.checkpoints.held():
                    self._checkpoint()
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
            if not self._recover(local):
                raise StraitError("strait: after a partition, no running site answered this site's join request")
            return
        self._outer_step(outer_grad)
        self._load(self.global_params)
        if s.leader and s.checkpoints is not None and self.syncs % s.checkpoints.every == 0:
            self._checkpoint()
