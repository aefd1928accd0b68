"""The strait session of one process: its site, its process group inside the
site, and (on the site leader) the gateway to the other sites."""

import datetime
import json
import os
import sys
import threading
import time

import torch
import torch.distributed as dist

from . import _ops  # noqa: F401  (loads the extension)


class StraitError(RuntimeError):
    """A strait failure surfaced in Python (config, gateway, consistency)."""


class PolicyViolation(StraitError):
    """The site's policy refused something: a message kind that may not leave,
    an exhausted privacy budget, a dataset from another jurisdiction."""


def _error(e):
    """The StraitError (or PolicyViolation) for a RuntimeError from the extension."""
    text = str(e).splitlines()[0]
    return PolicyViolation(text) if "policy violation:" in text else StraitError(text)


def _load_config(path):
    """The parts of the job config Python needs (the C++ side validates all of it)."""
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f)
    return doc


class Session:
    """Created by strait.init(). Holds:

    - site: this process's site name; site_index: its position in the job's order
    - group: the torch.distributed group of this site's workers (WORLD by default)
    - leader: True on the site's rank 0, which alone talks to the other sites
    - weights: each site's weight, in site order
    """

    def __init__(self, config, site, group=None, timeout_s=None, log=None, json_log=None, policy=None, resume=None):
        if not os.path.exists(config):
            raise StraitError(f"strait.init: config file '{config}' does not exist")
        self.config_path = os.path.abspath(config)
        # Validation with the C++ rules and messages (line, key, allowed).
        try:
            torch.classes.strait.Library.validate_config(self.config_path)
        except RuntimeError as e:
            raise StraitError(str(e).splitlines()[0]) from None
        doc = _load_config(self.config_path)
        names = [s["name"] for s in doc["sites"]]
        if site not in names:
            raise StraitError(f"strait.init: site '{site}' is not in {config}; its sites are: {', '.join(names)}")
        self.site = site
        self.site_index = names.index(site)
        # Round log (leader): what crossed since the last log() call.
        self.log_lines = bool(int(os.environ.get("STRAIT_LOG", "1"))) if log is None else bool(log)
        self.json_log = json_log if json_log is not None else os.environ.get("STRAIT_JSON_LOG") or None
        self.jurisdiction = doc["sites"][self.site_index]["jurisdiction"]
        # The site's own policy file (egress kinds, audit log, privacy, data).
        self.policy_path = os.path.abspath(policy) if policy else None
        self.policy = {}
        if self.policy_path:
            if not os.path.exists(self.policy_path):
                raise StraitError(f"strait.init: policy file '{policy}' does not exist")
            self.policy = _load_config(self.policy_path) or {}
        self.privacy = bool(self.policy.get("privacy"))
        self.sites = names
        self.weights = [float(s.get("weight", 1.0)) for s in doc["sites"]]
        self.sync_config = dict(doc.get("sync") or {})
        comp = doc.get("compression") or {}
        self.error_feedback = bool(comp.get("error_feedback", True))
        self.adaptive = None
        if comp.get("adaptive") is not None:  # validated by the C++ parser
            from .adaptive import AdaptiveCompression
            a = comp.get("adaptive") or {}
            lo = float(a.get("min_density", 0.001))
            self.adaptive = AdaptiveCompression(min_density=lo, max_density=float(a.get("max_density", max(0.1, lo))),
                                                min_bits=int(a.get("min_bits", 4)))
        self._adaptive_note = None
        self.seed = int(comp.get("seed", 0))
        transport = doc.get("transport") or {}
        self.timeout_s = timeout_s or float(transport.get("hard_deadline_s", 600)) + 30
        self.on_site_loss = transport.get("on_site_loss", "wait")
        # Checkpoints (the config's checkpoint section) and --resume.
        self.resume = bool(int(os.environ.get("STRAIT_RESUME", "0") or "0")) if resume is None else bool(resume)
        self.checkpoints = None
        ckpt = doc.get("checkpoint")
        if ckpt:
            from .recovery import CheckpointStore
            root = os.path.join(os.path.dirname(self.config_path), os.path.expanduser(str(ckpt["dir"])))
            self.checkpoints = CheckpointStore(root, site, int(ckpt.get("every", 10)), int(ckpt.get("keep", 2)),
                                               log=self._log_event)
        self._joins = []        # join requests answered, reaped when done: (round, tag)
        self._answered = set()  # join requests seen
        # (tag prefix, fn(round)): answers join requests while a round of a
        # matching tag is awaited (DiLoCo with its state; the DDP hook with
        # "running, no state to give").
        self._join_server = None

        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            # torchrun / SLURM-style environment, one world per site. The
            # site's collectives get the same deadline as the cross-site
            # rounds, so a lost worker cannot hang the others forever.
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=self.timeout_s))
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.leader_rank = dist.get_global_rank(group, 0) if group is not None else 0
        self.leader = self.rank == 0
        if self.checkpoints is not None and self.leader and (self.sync_config.get("mode") or "every_step") != "diloco":
            self._log_event("checkpoint: in every-step mode checkpoints are written by strait.Checkpoints "
                            "(DiLoCo writes its own)")
        self.gateway = None
        if self.leader:
            try:
                self.gateway = torch.classes.strait.Gateway(self.config_path, site, self.policy_path or "")
            except RuntimeError as e:
                raise _error(e) from None
        self._compressors = {}
        self._pipelines = {}
        self._rounds = {}
        self._checked = set()
        self._comm = None
        self.bytes_sent = 0  # payload bytes this site sent to each other site (leader)
        self._log_lock = threading.Lock()
        self._pending = self._empty_pending()
        self.privacy_spent = 0.0
        # At exit, while the interpreter is still whole: a gloo group or a
        # gateway left to interpreter teardown can abort the process.
        import atexit
        import weakref
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    def close(self):
        """Ends this process's part of the job: the hook's thread, the gateway
        (its I/O thread and sockets) and the process group if strait.init
        created it. Safe to call twice; called at exit."""
        diloco, self._diloco = getattr(self, "_diloco", None), None
        if diloco is not None and diloco._unflushed and self.leader:
            print(f"strait {self.site}: warning: strait.DiLoCo (overlap or fragments) ended without "
                  f"diloco.flush(): {'a round in flight was not applied and ' if diloco._inflight else ''}"
                  f"this site's parameters are not the global ones; call diloco.flush() after the training loop",
                  file=sys.stderr, flush=True)
        if self._comm is not None:
            self._comm.shutdown(wait=True)
            self._comm = None
        if self.gateway is not None:
            # Join requests answered: let them reach the sites that asked.
            deadline = time.monotonic() + 10
            while self._joins and time.monotonic() < deadline:
                self._reap_joins()
                time.sleep(0.01)
        self.gateway = None
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    def restart_gateway(self):
        """Leader: a new gateway (a new incarnation) in place of the current
        one. Its peers void whatever the old one sent for rounds still open,
        and its round counters start afresh: how a site that went on alone
        during a partition rejoins (DiLoCo)."""
        assert self.leader
        self.gateway = None  # stops the I/O thread, closes the sockets
        self._joins.clear()
        self._rounds = {}
        try:
            self.gateway = torch.classes.strait.Gateway(self.config_path, self.site, self.policy_path or "")
        except RuntimeError as e:
            raise _error(e) from None

    # -- the cross-site step, used by the hook and DiLoCo ----------------

    def comm_thread(self):
        """The single thread that runs the DDP hook's cross-site work, so it
        overlaps with backward while keeping collectives in order."""
        if self._comm is None:
            import concurrent.futures
            self._comm = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="strait-comm")
        return self._comm

    def _next_seed(self):
        """The seed of the next compressor: the config's, stepped per
        compressor, mod 2^64 like the C++ API's uint64 arithmetic."""
        return (self.seed + 7919 * len(self._compressors)) % (1 << 64)

    def compressor(self, key, pipeline=None, name=None, size=0):
        """The compressor of `key`, created on first use. Its pipeline and
        error feedback come from the config's first rule matching (`name`,
        `size`) — the same rules as in C++ — unless `pipeline` is given."""
        c = self._compressors.get(key)
        if c is not None and pipeline is not None and self._pipelines.get(key) != pipeline:
            # Another pipeline for the same tensor (adaptive compression):
            # what the old one had not sent yet carries over.
            from . import Compressor
            new = Compressor(pipeline, seed=self._next_seed(), error_feedback=c.error_feedback)
            if c.error_feedback and c.residual().numel() > 0:
                new.set_residual(c.residual())
            self._compressors[key], self._pipelines[key] = new, pipeline
            return new
        if c is None:
            from . import Compressor
            error_feedback = self.error_feedback
            if pipeline is None:
                pipeline, error_feedback = torch.classes.strait.Library.rule_for(self.config_path, name or key, int(size))
            c = Compressor(pipeline, seed=self._next_seed(), error_feedback=error_feedback)
            self._compressors[key] = c
            self._pipelines[key] = pipeline
        return c

    def residuals(self, prefix):
        """[(key, pipeline, residual)] of the compressors whose key starts
        with `prefix` and that keep an error-feedback residual (checkpoints)."""
        return [(key, self._pipelines.get(key), c.residual()) for key, c in self._compressors.items()
                if key.startswith(prefix) and c.error_feedback]

    def next_round(self, tag):
        r = self._rounds.get(tag, 0)
        self._rounds[tag] = r + 1
        return r

    def _exchange(self, tag, payload, kind="model_update"):
        """Leader only: the next round of `tag` with every site; returns
        (payloads in site order, missing site names). `kind` is what the
        site's egress policy judges. Polls, so other Python threads keep
        running while the network works; bounded by timeout_s."""
        return self._finish(self._start(tag, payload, kind))

    def _start(self, tag, payload, kind="model_update", round_=None):
        """Leader only: starts the next round of `tag` (or round `round_`;
        does not wait)."""
        round_ = self.next_round(tag) if round_ is None else round_
        start = time.monotonic()
        try:
            self.gateway.exchange(round_, tag, payload, kind)
        except RuntimeError as e:
            raise _error(e) from None
        return (round_, tag, payload, start)

    def _finish(self, started, poll=None):
        """Leader only: waits for a round from _start; (payloads, missing).
        While it waits, every 50 ms: poll() if given, and join requests are
        answered when a DiLoCo holds the state for this round's tag."""
        round_, tag, payload, start = started
        try:
            deadline = start + self.timeout_s
            next_poll = 0.0
            while not self.gateway.ready(round_, tag):
                now = time.monotonic()
                if now > deadline:
                    raise StraitError(f"strait: round {round_} '{tag}' did not complete within {self.timeout_s:.0f} s")
                if now >= next_poll:
                    next_poll = now + 0.05
                    if poll is not None:
                        poll()
                    server = self._join_server
                    if server is not None and tag.startswith(server[0]):
                        server[1](round_)
                    self._reap_joins()
                time.sleep(0.0005)
            payloads, missing = self.gateway.result(round_, tag)
        except StraitError:
            raise
        except RuntimeError as e:
            raise _error(e) from None
        with self._log_lock:
            p = self._pending
            p["rounds"] += 1
            p["round_s"] += time.monotonic() - start
            p["bytes_out"] += payload.numel() * (len(self.sites) - 1 - len(missing))
            p["bytes_in"] += sum(x.numel() for i, x in enumerate(payloads) if i != self.site_index)
            p["missing"].update(missing)
        return payloads, missing

    def _reap_joins(self):
        """Collects the join requests this site answered once they are done
        (their result is of no use here; an error only means the asker left)."""
        for key in list(self._joins):
            try:
                if not self.gateway.ready(*key):
                    continue
                self.gateway.result(*key)
            except RuntimeError:
                pass
            self._joins.remove(key)

    def _log_event(self, message):
        """One line about recovery (joins, checkpoints, lost sites) on
        stderr, and a {"event": ...} object in the JSON log."""
        if self.log_lines:
            print(f"strait {self.site}: {message}", file=sys.stderr, flush=True)
        if self.json_log:
            line = (json.dumps({"time": round(time.time(), 3), "site": self.site, "event": message}) + "\n").encode()
            fd = os.open(self.json_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    # -- the round log ---------------------------------------------------

    @staticmethod
    def _empty_pending():
        return {"rounds": 0, "round_s": 0.0, "bytes_out": 0, "bytes_in": 0, "missing": set()}

    def log(self, step, loss=None, **fields):
        """Reports the cross-site rounds since the previous call: one line per
        site (on its leader, to stderr) with step, loss, bytes out and in and
        the rounds' time, and one JSON object per line to the JSON log
        (strait.init(json_log=...) or $STRAIT_JSON_LOG) if set. Call it once
        per training step on every worker; steps without a round (DiLoCo's
        inner steps) print nothing. `loss` is this worker's (the leader's)."""
        if not self.leader:
            return None
        with self._log_lock:
            p, self._pending = self._pending, self._empty_pending()
        if p["rounds"] == 0:
            return None
        record = {"time": round(time.time(), 3), "site": self.site, "step": int(step),
                  "loss": None if loss is None else float(loss), "rounds": p["rounds"],
                  "bytes_out": p["bytes_out"], "bytes_in": p["bytes_in"], "round_s": round(p["round_s"], 6),
                  "missing": sorted(p["missing"])}
        if self.adaptive is not None:
            record["pipeline"] = self.adaptive.pipeline
            if self._adaptive_note:
                record["adaptive"], self._adaptive_note = self._adaptive_note, None
        record.update(fields)
        if self.log_lines and record.get("adaptive"):
            print(f"strait {self.site} step {step}: adaptive: {record['adaptive']}", file=sys.stderr, flush=True)
        if self.log_lines:
            loss_text = "" if loss is None else f" loss {float(loss):.4f}"
            missing = f", missing {', '.join(record['missing'])}" if record["missing"] else ""
            print(f"strait {self.site} step {step}:{loss_text}, out {_size(p['bytes_out'])}, "
                  f"in {_size(p['bytes_in'])}, {p['rounds']} round{'s' if p['rounds'] > 1 else ''} "
                  f"{p['round_s'] * 1000:.1f} ms{missing}", file=sys.stderr, flush=True)
        if self.json_log:
            line = (json.dumps(record) + "\n").encode()
            # One write with O_APPEND: sites sharing a file never interleave within a line.
            fd = os.open(self.json_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return record

    def start_average(self, tensor, tag, pipeline=None, compressor_key=None, name=None):
        """Leader only: compresses `tensor` (with this key's compressor and its
        error feedback) and starts the round without waiting, so several can
        be in flight; finish_average() returns the weighted mean of every
        site's *decoded* payload, in site order — the same bits on every site.
        Missing sites (on_site_loss: continue) are left out and the weights
        renormalised."""
        assert self.leader
        flat = self._privatized(tensor.detach().reshape(-1).float().cpu().contiguous())
        compressor = self.compressor(compressor_key or tag, pipeline, name=name or tag, size=flat.numel())
        payload = compressor.encode(flat)
        self.bytes_sent += payload.numel()
        return (self._start(tag, payload), flat, tensor.shape)

    def average_ready(self, handle):
        """Leader only: whether finish_average(handle) would return at once
        (a failed start counts as ready: finishing it raises)."""
        if isinstance(handle, BaseException):
            return True
        (round_, tag, _, _), _, _ = handle
        try:
            return bool(self.gateway.ready(round_, tag))
        except RuntimeError:
            return True  # finishing it raises the error

    def finish_average(self, handle):
        """Leader only: waits for a round from start_average; the mean."""
        started, flat, shape = handle
        payloads, missing = self._finish(started)
        out = torch.zeros_like(flat)
        for i, weight in self._site_weights(payloads):  # fixed site order: identical bits everywhere
            torch.ops.strait.decode_accumulate(out, payloads[i], weight)
        self.last_missing = list(missing)
        return out.view(shape)

    def _site_weights(self, payloads):
        """(site index, weight) of every site that sent something, in site
        order, the weights renormalised over those sites (on_site_loss:
        continue leaves missing sites out)."""
        present = [i for i, p in enumerate(payloads) if p.numel() > 0]
        total = sum(self.weights[i] for i in present)
        return [(i, self.weights[i] / total) for i in present]

    def _privatized(self, flat):
        """With the policy's privacy section: a clipped, noised copy of flat
        (the gateway refuses a model update that skipped this)."""
        if not self.privacy:
            return flat
        flat = flat.clone()
        try:
            self.privacy_spent = self.gateway.privatize(flat)
        except RuntimeError as e:
            raise _error(e) from None
        return flat

    def average_parts_across_sites(self, flat, parts, tag, pipeline=None, contribute=True, keep=None):
        """Leader only: like start_average + finish_average, for a flat tensor made of
        named parts (offset, numel, name): each part is compressed with its own
        rule and error feedback, and all of them travel in one round as one
        message: u64 count, u64 length of each part's payload, the payloads.
        A message whose framing does not match this model is a StraitError
        naming the site; its payloads are then decoded as hostile bytes.

        `pipeline` forces one pipeline for every part. With contribute=False
        this site sends an empty message (it counts as absent, the others'
        weights renormalised). keep(payloads), if given, returns the indices
        of the sites whose payloads may be used."""
        return self.finish_parts(self.start_parts(flat, parts, tag, pipeline, contribute), keep)

    def start_parts(self, flat, parts, tag, pipeline=None, contribute=True):
        """Leader only: the first half of average_parts_across_sites —
        compresses and starts the round without waiting for it."""
        assert self.leader
        flat = flat.detach().reshape(-1).float().cpu().contiguous()
        if contribute:
            flat = self._privatized(flat)
            pieces = []
            for offset, numel, name, *shape in parts:
                c = self.compressor(f"{tag}.{name}", pipeline, name=name, size=numel)
                part = flat[offset:offset + numel]
                # The parameter's own shape: lowrank factors its 2-D view.
                pieces.append(c.encode(part.view(shape[0]) if shape and shape[0] else part))
            header = torch.tensor([len(pieces)] + [p.numel() for p in pieces], dtype=torch.int64)
            message = torch.cat([header.view(torch.uint8)] + pieces)
        else:
            message = torch.zeros(0, dtype=torch.uint8)
        self.bytes_sent += message.numel()
        return (self._start(tag, message), flat.numel(), parts, tag)

    def finish_parts(self, handle, keep=None):
        """Leader only: waits for a round from start_parts; the weighted mean."""
        started, numel, parts, tag = handle
        payloads, missing = self._finish(started)
        if keep is not None:
            use = keep(payloads)
            payloads = [p if i in use else p[:0] for i, p in enumerate(payloads)]
        out = torch.zeros(numel, dtype=torch.float32)
        for i, weight in self._site_weights(payloads):
            blob = payloads[i]
            n = len(parts)
            head = 8 * (n + 1)
            lengths = blob[:head].clone().view(torch.int64).tolist() if blob.numel() >= head else []
            if not lengths or lengths[0] != n or min(lengths[1:]) < 0 or head + sum(lengths[1:]) != blob.numel():
                raise StraitError(f"strait: site '{self.sites[i]}' sent a '{tag}' message whose framing does not "
                                  f"match {n} parts ({blob.numel()} bytes)")
            at = head
            for (offset, count, *_), length in zip(parts, lengths[1:]):
                torch.ops.strait.decode_accumulate(out[offset:offset + count], blob[at:at + length], weight)
                at += length
        self.last_missing = list(missing)
        return out

    def average_across_sites_exact(self, tensor, tag, send=True):
        """Leader only: site 0's tensor, sent uncompressed (fp32) to every
        site — for initial weights, which must agree exactly. With send=False
        this site sends an empty payload (only site 0's matters)."""
        assert self.leader
        flat = tensor.detach().reshape(-1).float().cpu().contiguous()
        payload = torch.ops.strait.encode(flat, "fp32", 0) if send else torch.zeros(0, dtype=torch.uint8)
        payloads, _ = self._exchange(tag, payload, kind="model_state")
        if payloads[0].numel() == 0:
            raise StraitError("strait: site 0 did not send its initial parameters")
        return torch.ops.strait.decode(payloads[0], list(flat.shape)).view(tensor.shape)

    def check_same_everywhere(self, tag, description):
        """Every worker of every site must pass the same `description` (a
        string, e.g. parameter names and shapes). Raises StraitError on every
        worker, naming the first site that differs, if they do not."""
        def verdict():  # on the leader
            payloads, _ = self._exchange(tag, torch.tensor(list(description.encode()), dtype=torch.uint8),
                                         kind="control")
            mine = description
            for i, p in enumerate(payloads):
                theirs = bytes(p.tolist()).decode(errors="replace") if p.numel() else None
                if theirs is not None and theirs != mine:
                    a, b = mine.splitlines(), theirs.splitlines()
                    first = next((k for k in range(min(len(a), len(b))) if a[k] != b[k]), min(len(a), len(b)))
                    raise StraitError(f"strait: the model differs between sites: site '{self.sites[i]}' has "
                                      f"{b[first] if first < len(b) else '(nothing)'!r} where site '{self.site}' has "
                                      f"{a[first] if first < len(a) else '(nothing)'!r} (entry {first} of '{tag}')")
            return torch.zeros(0, dtype=torch.uint8)

        self.from_leader(verdict, torch.zeros(0, dtype=torch.uint8))

    def from_leader(self, fn, out):
        """Runs fn() on the site leader and broadcasts its result (copied into
        `out`, which every worker passes with the right shape) inside the site.
        A StraitError on the leader is raised on every worker with the same
        message, rather than leaving the others waiting for a broadcast."""
        error = None
        if self.leader:
            try:
                out.copy_(fn())
            except StraitError as e:
                error = e
        if self.size > 1:
            text = str(error).encode() if error is not None else b""
            status = torch.tensor([0 if error is None else 2 if isinstance(error, PolicyViolation) else 1, len(text)],
                                  dtype=torch.int64)
            self.broadcast(status)
            if status[0].item():
                message = torch.tensor(list(text), dtype=torch.uint8) if self.leader else \
                    torch.empty(int(status[1].item()), dtype=torch.uint8)
                self.broadcast(message)
                if error is None:
                    cls = PolicyViolation if status[0].item() == 2 else StraitError
                    error = cls(bytes(message.tolist()).decode(errors="replace"))
            else:
                self.broadcast(out)
        if error is not None:
            raise error
        return out

    def broadcast(self, tensor):
        """Site leader's tensor to every worker of the site."""
        if self.size > 1:
            dist.broadcast(tensor, src=self.leader_rank, group=self.group)
        return tensor


def _size(n):
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def init(config=None, site=None, group=None, timeout_s=None, log=None, json_log=None, policy=None, resume=None):
    """Starts strait in this process: finds or creates the site's process group
    (torchrun environment variables work) and starts the gateway on the site
    leader. `config` defaults to $STRAIT_CONFIG and `site` to $STRAIT_SITE
    (both set by ./strait launch). `log` (default $STRAIT_LOG, on)
    prints a line per round on the site leader; `json_log` (default
    $STRAIT_JSON_LOG) is a file that gets one JSON object per round per site.
    `policy` (default $STRAIT_POLICY) is the site's own policy file: which
    message kinds may leave, the signed audit log, differential privacy.
    `resume` (default $STRAIT_RESUME, set by ./strait launch --resume): a
    DiLoCo started in this session continues from the newest checkpoint
    every site holds, or fetches the state of the sites still running."""
    site = site or os.environ.get("STRAIT_SITE")
    config = config or os.environ.get("STRAIT_CONFIG")
    if not config:
        raise StraitError("strait.init: no config given (pass the job's YAML path or set STRAIT_CONFIG)")
    if not site:
        raise StraitError("strait.init: no site given (pass site=... or set STRAIT_SITE)")
    policy = policy or os.environ.get("STRAIT_POLICY") or None
    return Session(config, site, group=group, timeout_s=timeout_s, log=log, json_log=json_log, policy=policy,
                   resume=resume)
