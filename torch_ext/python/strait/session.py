"""The strait session of one process: a typed wrapper over the engine's
torch.classes.strait.Session (torch_ext/csrc/session.cc), which holds the
site, its process group inside the site and, on the site leader, the
gateway to the other sites. The algorithms live in C++ once, for Python and
libtorch programs alike; this module only starts the process group and
turns the engine's errors into Python exceptions."""

import contextlib
import datetime
import json
import os

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
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return PolicyViolation(text) if "policy violation:" in text else StraitError(text)


@contextlib.contextmanager
def translated():
    """Raises the engine's errors (RuntimeError from the extension) as StraitError."""
    try:
        yield
    except StraitError:
        raise
    except RuntimeError as e:
        raise _error(e) from None


def _hard_deadline(path):
    import yaml

    with open(path) as f:
        doc = yaml.safe_load(f) or {}
    return float(((doc.get("transport") or {}).get("hard_deadline_s")) or 600)


class Session:
    """Created by strait.init(). Attributes:

    - site: this process's site name; site_index: its position in the job's order
    - sites: every site's name, in the job's order
    - group: the torch.distributed group of this site's workers (WORLD by default)
    - rank, size: this worker's rank in its site and the site's number of
      workers (RANK and WORLD_SIZE as torchrun or `strait launch` set them
      are per site: data seeded or split by RANK alone is the same at every
      site)
    - job_rank, job_size: this worker's place among all workers of all sites
      (sites in config order); seed or split data by these
    - leader: True on the site's rank 0, which alone talks to the other sites
    """

    def __init__(self, config, site, group=None, timeout_s=None, log=None, json_log=None, policy=None, resume=None):
        if not os.path.exists(config):
            raise StraitError(f"strait.init: config file '{config}' does not exist")
        self.config_path = os.path.abspath(config)
        with translated():  # the C++ rules and messages (line, key, allowed), before any process group
            torch.classes.strait.Library.validate_config(self.config_path)
            torch.classes.strait.Library.site_index(self.config_path, site)
        log = bool(int(os.environ.get("STRAIT_LOG", "1"))) if log is None else bool(log)
        json_log = json_log if json_log is not None else os.environ.get("STRAIT_JSON_LOG") or None
        resume = bool(int(os.environ.get("STRAIT_RESUME", "0") or "0")) if resume is None else bool(resume)
        self._owns_group = not dist.is_initialized()
        if self._owns_group:
            # torchrun / SLURM-style environment, one world per site. The
            # site's collectives get the same deadline as the cross-site
            # rounds, so a lost worker cannot hang the others forever.
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            timeout = timeout_s or _hard_deadline(self.config_path) + 30
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout))
        self.group = group
        pg = group if group is not None else dist.group.WORLD
        with translated():
            self._s = torch.classes.strait.Session(self.config_path, site, os.path.abspath(policy) if policy else "",
                                                   pg.boxed(), resume, log, os.path.abspath(json_log) if json_log
                                                   else "")
        self.site = self._s.site()
        self.site_index = self._s.site_index()
        self.sites = list(self._s.sites())
        self.rank = self._s.rank()
        self.size = self._s.size()
        self.job_rank = self._s.job_rank()
        self.job_size = self._s.job_size()
        self.leader = self._s.leader()
        self.resume = resume
        self._every_step = None
        self._engines = []  # weak references to what close() ends first (strait.fsdp_hook's)
        self._bucket_futures = []  # the DDP hook's: (engine future, DDP's future) of this step
        # At exit, while the interpreter is still whole: a gloo group or a
        # gateway left to interpreter teardown can abort the process.
        import atexit
        import weakref
        ref = weakref.ref(self)
        atexit.register(lambda: ref() is not None and ref().close())

    @property
    def bytes_sent(self):
        """Payload bytes this site sent (leader; model updates)."""
        return self._s.bytes_sent()

    @property
    def last_missing(self):
        """Sites missing from the last sync's round (on_site_loss: continue)."""
        return list(self._s.last_missing())

    @property
    def privacy_spent(self):
        return self._s.privacy_spent()

    def audit_head(self):
        return self._s.audit_head()

    def log(self, step, loss=None, every=1, site_mean=False, **fields):
        """Reports the cross-site rounds since the previous report: one line
        per site (on its leader, to stderr) with step, loss, bytes out and in
        and the rounds' time, and one JSON object per line to the JSON log
        (strait.init(json_log=...) or $STRAIT_JSON_LOG) if set. Call it once
        per training step on every worker; steps without a round (DiLoCo's
        inner steps) print nothing. `every`: report only on steps that are a
        multiple of it (the rounds between add up). `loss` is the leader's
        own batch's, unless `site_mean`: then the mean of every worker's loss
        in the site (a collective on reported steps: every worker must call).
        Extra keyword arguments go into the JSON record. Returns the record
        (a dict), or None."""
        if every > 1 and int(step) % int(every):
            return None
        if site_mean and loss is not None and self.size > 1:
            value = torch.tensor([float(loss)], dtype=torch.float64)
            if dist.get_backend(self.group) == "nccl":
                value = value.cuda()
            dist.all_reduce(value, group=self.group)
            loss = value.item() / self.size
        with translated():
            record = self._s.log(int(step), None if loss is None else float(loss), json.dumps(fields))
        return json.loads(record) if record else None

    def every_step(self):
        """The engine's every-step exchange (torch.classes.strait.EveryStep)
        behind strait.ddp_hook, created on first use."""
        if self._every_step is None:
            with translated():
                self._every_step = torch.classes.strait.EveryStep(self._s)
        return self._every_step

    def close(self):
        """Ends this process's part of the job: the every-step thread, the
        gateway (after answered join requests reached their askers) and the
        process group if strait.init created it. Safe to call twice; called
        at exit."""
        self._every_step = None
        for ref in getattr(self, "_engines", []):
            engine = ref()
            if engine is not None:
                engine.close()
        self._engines = []
        s = getattr(self, "_s", None)
        if s is not None:
            with translated():
                s.close()
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False


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
