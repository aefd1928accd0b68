"""Checkpoints, resume and rejoin (docs/RELIABILITY.md).

A site's leader keeps its checkpoints in DIR/SITE/ (the job config's
`checkpoint` section). Each is one file, round-NNNNNNNN-DIGEST.pt: the state
after NNNNNNNN syncs, DIGEST the first 16 hex digits of the SHA-256 of the
global parameters (identical on every site after a sync, so sites can tell
from the names alone which rounds they hold in common). A file is written to
a temporary name, fsynced, renamed into place and the directory fsynced: a
crash leaves the previous checkpoints whole and at most a temporary file,
which the next start removes.

Sites find each other after a restart with a *join request*: an exchange
under the tag "strait.join" at a random round number, whose payload says
whether the sender is resuming (and which checkpoints it holds) or running
(and then carries the current state). Running sites answer requests while
they wait for a round (Session._finish); resuming sites answer each other.
"""

import hashlib
import json
import os
import random
import re
import struct
import sys
import time

import torch

JOIN_TAG = "strait.join"
_NAME = re.compile(r"^round-(\d{8})-([0-9a-f]{16})\.pt$")


def flatten(params):
    """The parameters as one float32 vector on the CPU, in order."""
    return torch.cat([p.detach().reshape(-1).float().cpu() for p in params])


def params_digest(flat):
    """First 16 hex digits of the SHA-256 of a flat float32 tensor's bytes."""
    return hashlib.sha256(flat.contiguous().numpy().tobytes()).hexdigest()[:16]


class CheckpointStore:
    """One site's checkpoints: DIR/SITE/round-NNNNNNNN-DIGEST.pt."""

    def __init__(self, root, site, every=10, keep=2, log=None):
        self.dir = os.path.join(root, site)
        self.every = int(every)
        self.keep = int(keep)
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        # A crash while writing leaves a temporary file: never a checkpoint.
        if os.path.isdir(self.dir):
            for name in os.listdir(self.dir):
                if ".tmp-" in name:
                    try:
                        os.unlink(os.path.join(self.dir, name))
                    except OSError:
                        pass

    def held(self):
        """[(round, digest)] of the checkpoints on disk, oldest first."""
        try:
            names = os.listdir(self.dir)
        except FileNotFoundError:
            return []
        out = []
        for name in names:
            m = _NAME.match(name)
            if m:
                out.append((int(m.group(1)), m.group(2)))
        return sorted(out)

    def path(self, round_, digest):
        return os.path.join(self.dir, f"round-{round_:08d}-{digest}.pt")

    def save(self, round_, digest, state):
        """Writes `state` (a dict of tensors and plain values) atomically;
        then removes all but the newest `keep`. A failure (a full disk, a
        read-only directory) raises StraitError naming the file and leaves
        the checkpoints already on disk untouched."""
        from .session import StraitError

        path = self.path(round_, digest)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            os.makedirs(self.dir, exist_ok=True)
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            held = self.held()
            kept = f"round {held[-1][0]} is the newest intact one" if held else "there is no earlier one"
            raise StraitError(f"strait: checkpoint of round {round_} to {path} failed: {e.strerror or e}; "
                              f"{kept}") from None
        for old_round, old_digest in self.held()[:-self.keep]:
            try:
                os.unlink(self.path(old_round, old_digest))
            except OSError:
                pass
        return path

    def save_reported(self, session, what, round_, digest, state):
        """save(), with one line on the site's log either way: where and how
        long, or (a full disk...) the error — training goes on, the older
        checkpoints are intact."""
        from .session import StraitError

        started = time.monotonic()
        try:
            path = self.save(round_, digest, state)
        except StraitError as e:
            session._log_event(f"{e} (training goes on)")
            return
        session._log_event(f"checkpoint of {what} written to {path} in {time.monotonic() - started:.2f} s")

    def load(self, round_, digest):
        from .session import StraitError

        path = self.path(round_, digest)
        try:
            # The site's own file on its own disk, and still read with the
            # weights-only unpickler (tensors, numbers, strings, containers:
            # all a checkpoint holds, optimizer states included); bytes from
            # peers are never unpickled at all (state_blob).
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - a damaged file of any kind
            raise StraitError(f"strait: checkpoint {path} cannot be read: {e}") from None
        if not isinstance(state, dict) or state.get("round") != round_:
            raise StraitError(f"strait: checkpoint {path} is not a strait checkpoint of round {round_}")
        flat = state.get("global")
        if not isinstance(flat, torch.Tensor) or params_digest(flat) != digest:
            raise StraitError(f"strait: checkpoint {path} does not match its digest {digest} (damaged?)")
        return state


def digest_to_int(digest):
    """A checkpoint digest (16 hex digits) as a signed int64, for broadcast."""
    return int.from_bytes(bytes.fromhex(digest), "big", signed=True)


def int_to_digest(value):
    return (value & (2**64 - 1)).to_bytes(8, "big").hex()


def pack(header, blob=b""):
    """A join message: u64 length of the JSON header, the header, the blob."""
    text = json.dumps(header, sort_keys=True).encode()
    data = struct.pack("<Q", len(text)) + text + blob
    return torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.zeros(0, dtype=torch.uint8)


def unpack(payload, site):
    """(header dict, blob bytes) of a join message from `site`; StraitError
    naming the site if it is not one."""
    from .session import StraitError

    data = bytes(payload.numpy().tobytes())
    if len(data) < 8:
        raise StraitError(f"strait: site '{site}' sent a join message of {len(data)} bytes")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise StraitError(f"strait: site '{site}' sent a join message whose header overruns it")
    try:
        header = json.loads(data[8:8 + n])
    except ValueError as e:
        raise StraitError(f"strait: site '{site}' sent a join message with a malformed header: {e}") from None
    if not isinstance(header, dict) or header.get("status") not in ("resuming", "running"):
        raise StraitError(f"strait: site '{site}' sent a join message without a valid status")
    return header, data[8 + n:]


def state_blob(state):
    """A running site's state on the wire: the global parameters and the
    outer momentum as raw little-endian float32, nothing else. (Never
    pickle: a peer's bytes must not be able to run code here.)"""
    flat = state["global"].float().contiguous()
    momentum = state["momentum"].float().contiguous()
    return flat.numpy().tobytes() + momentum.numpy().tobytes()


def blob_state(blob, site, numel, syncs):
    """The state from a state_blob of a model of `numel` parameters."""
    from .session import StraitError

    if len(blob) != 8 * numel:
        raise StraitError(f"strait: the state sent by site '{site}' has {len(blob)} bytes; a model of {numel} "
                          f"parameters needs {8 * numel}")
    values = torch.frombuffer(bytearray(blob), dtype=torch.float32)
    if not torch.isfinite(values).all():
        raise StraitError(f"strait: the state sent by site '{site}' holds non-finite values")
    return {"global": values[:numel].clone(), "momentum": values[numel:].clone(), "syncs": int(syncs)}


def join(session, model_digest, held, numel):
    """Leader only: the join protocol of a (re)starting site. Returns one of
    ("running", site index, header, state): a running site's current state
    (verified by its digest); ("checkpoint", round, digest, absent): the
    newest checkpoint every site that answered holds, and the names of the
    sites that did not answer; ("fresh",): nobody holds any."""
    from .session import StraitError

    s = session
    nonce = random.SystemRandom().getrandbits(62) | 1
    request = pack({"status": "resuming", "nonce": nonce, "model": model_digest,
                    "held": [[r, d] for r, d in held]})
    answered = s._answered  # shared with the servers: no request is answered twice
    answered.add((nonce, JOIN_TAG))
    s._log_event(f"joining: asking the other sites for their state (request {nonce:x})")

    def answer_resumers():
        # Other sites starting at the same time: tell them we are resuming too.
        for line in s.gateway.peer_rounds(JOIN_TAG):
            r, tag, _ = line.split("\t")
            key = (int(r), tag)
            if key not in answered:
                answered.add(key)
                s._start(tag, request, kind="control", round_=int(r))
                s._joins.append(key)

    payloads, missing = s._finish(s._start(JOIN_TAG, request, kind="control", round_=nonce), poll=answer_resumers)
    running, resuming = [], [(s.site_index, {"held": [[r, d] for r, d in held]})]
    for i, p in enumerate(payloads):
        if i == s.site_index or p.numel() == 0:
            continue
        header, blob = unpack(p, s.sites[i])
        if header["status"] == "running" and header.get("no_state"):
            running.append((i, header, blob))  # a running job that cannot take a site in
            continue
        if header.get("model") != model_digest:
            raise StraitError(f"strait: site '{s.sites[i]}' trains another model (its parameter list differs from "
                              f"site '{s.site}''s); cannot join")
        if header["status"] == "running":
            running.append((i, header, blob))
        else:
            resuming.append((i, header))
            key = (int(header.get("nonce", 0)), JOIN_TAG)
            if key not in answered:  # its request has not reached us yet: answer it now
                answered.add(key)
                s._start(JOIN_TAG, request, kind="control", round_=key[0])
                s._joins.append(key)
    if running:
        i, header, blob = running[0]
        if header.get("no_state"):
            return ("running", i, header, None)
        digest = hashlib.sha256(blob).hexdigest()
        if digest != header.get("sha256"):
            raise StraitError(f"strait: the state sent by site '{s.sites[i]}' does not match its SHA-256 "
                              f"({len(blob)} bytes): refusing it")
        others = [s.sites[j] for j, h, _ in running[1:] if h.get("params") != header.get("params")]
        if others:
            s._log_event(f"joining: sites {', '.join(others)} hold other parameters than '{s.sites[i]}'; "
                         f"taking '{s.sites[i]}''s")
        syncs = header.get("syncs")
        if not isinstance(syncs, int) or syncs < 0:
            raise StraitError(f"strait: site '{s.sites[i]}' sent a state without a valid sync count")
        return ("running", i, header, blob_state(blob, s.sites[i], numel, syncs))
    sets = [{(int(r), str(d)) for r, d in h.get("held", [])} for _, h in resuming]
    common = set.intersection(*sets)
    if common:
        r, d = max(common)
        return ("checkpoint", r, d, list(missing))
    if any(sets):
        holdings = "; ".join(f"'{s.sites[i]}' holds " + (", ".join(str(r) for r, _ in sorted(h.get("held", [])))
                                                          or "none") for i, h in resuming)
        raise StraitError(f"strait: --resume: no checkpoint round is held by every site ({holdings}); "
                          f"restore a common one or start afresh without --resume")
    return ("fresh",)


def _new_requests(s):
    """(round, tag) and asking site of each join request not answered yet,
    marked answered."""
    for line in s.gateway.peer_rounds(JOIN_TAG):
        r, tag, site = line.split("\t")
        key = (int(r), tag)
        if key not in s._answered:
            s._answered.add(key)
            yield key, site


def serve_joins(session, round_, make_state):
    """Running site's leader, while it waits for `round_`: answers every join
    request that has arrived with this site's current state. Returns the
    sites served."""
    s = session
    served = []
    for key, site in _new_requests(s):
        header, state = make_state()
        blob = state_blob(state)
        header.update({"status": "running", "round": int(round_), "sha256": hashlib.sha256(blob).hexdigest()})
        started = time.monotonic()
        s._start(key[1], pack(header, blob), kind="model_state", round_=key[0])
        served.append(site)
        s._joins.append(key)
        s._log_event(f"site '{site}' asked to join: sending it the state of round {round_} "
                     f"({len(blob) / 1e6:.1f} MB, {time.monotonic() - started:.2f} s to queue)")
    return served


def refuse_joins(session, job="every-step"):
    """The leader of a site of a job that cannot take a site in (`job`:
    "every-step", or "overlapped DiLoCo", whose state always has a round in
    flight), while it waits for a round: answers each join request with
    "running, no state to give", so the site that asked stops with a clear
    error instead of training on alone unaware of the others."""
    s = session
    for key, site in _new_requests(s):
        s._start(key[1], pack({"status": "running", "no_state": job}), kind="control", round_=key[0])
        s._joins.append(key)
        s._log_event(f"site '{site}' asked to join; a running {job} job cannot take it in (restart every "
                     f"site with --resume)")


def refused(session, result):
    """The error for join()'s ("running", ...) outcome from a job that cannot
    take a site in."""
    from .session import StraitError

    i, header = result[1], result[2]
    return StraitError(f"strait: site '{session.sites[i]}' is still running; a site cannot join a running "
                       f"{header.get('no_state', 'every-step')} job — stop it and restart every site with --resume")


class Checkpoints:
    """Checkpoints and resume for every-step mode (the DDP hook), where every
    site holds the same parameters after each step:

        ckpt = strait.Checkpoints(session, model, optimizer)
        step = ckpt.resume()            # 0, or the step the job continues from
        while step < total:
            ...; optimizer.step()
            step += 1
            ckpt.step(step)             # writes every `checkpoint.every` steps

    A checkpoint holds the model's and the optimizer's state_dict, every
    error-feedback residual of the hook's compressors and the round
    counters; with --resume every site loads the newest step all of them
    hold. (A site cannot join a running every-step job: restart all sites.)
    DiLoCo checkpoints itself; this class is for every-step mode."""

    def __init__(self, session, model, optimizer):
        from .session import StraitError

        if session.checkpoints is None:
            raise StraitError("strait.Checkpoints: the job config has no checkpoint section (checkpoint: {dir: ...})")
        self.session, self.model, self.optimizer = session, model, optimizer
        named = [(n, p) for n, p in model.named_parameters()]
        self.params = [p for _, p in named]
        self.model_digest = hashlib.sha256("\n".join(f"{n} {tuple(p.shape)}" for n, p in named).encode()).hexdigest()

    def step(self, steps_done):
        """After the optimizer step that completes `steps_done` steps: on the
        site leader, a checkpoint every `checkpoint.every` steps. A failed
        write is reported and training goes on."""
        s = self.session
        store = s.checkpoints
        if not s.leader or steps_done <= 0 or steps_done % store.every:
            return
        flat = flatten(self.params)
        state = {"round": int(steps_done), "step": int(steps_done), "global": flat, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "residuals": s.residuals("ddp."),
                 "rounds": dict(s._rounds), "checked": sorted(s._checked), "audit_head": s.gateway.audit_head()}
        store.save_reported(s, f"step {steps_done}", int(steps_done), params_digest(flat), state)

    def resume(self):
        """With resume (./strait launch --resume): loads the newest step every
        site holds into the model, the optimizer and the hook's state, on
        every worker; returns that step (0 without resume or checkpoints)."""
        s = self.session
        store = s.checkpoints
        if not s.resume:
            return 0

        def leader():
            result = join(s, self.model_digest, store.held(), sum(p.numel() for p in self.params))
            if result[0] == "running":
                raise refused(s, result)
            if result[0] == "checkpoint":
                return torch.tensor([result[1], digest_to_int(result[2])])
            return torch.tensor([-1, 0])

        round_, digest = (int(v) for v in s.from_leader(leader, torch.zeros(2, dtype=torch.int64)).tolist())
        if round_ < 0:
            return 0
        state = store.load(round_, int_to_digest(digest))
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        s._rounds = dict(state["rounds"])
        s._checked = set(state["checked"])
        if s.leader:
            for key, pipeline, residual in state["residuals"]:
                s.compressor(key, pipeline).set_residual(residual)
            s._log_event(f"resumed from step {round_} (every site holds it)")
        return int(state["step"])
