"""DiLoCo (Douillard et al. 2023, "DiLoCo: Distributed Low-Communication
Training of Language Models"): H local steps with the inner optimizer, then
one outer step on compressed pseudo-gradients from every site."""

import torch


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

    Streaming fragments (Douillard et al. 2025) are not implemented yet: a
    config with sync.diloco.fragments > 1 is refused rather than ignored.
    """

    def __init__(self, model, inner_optimizer, session, sync_every=None, outer_lr=None, outer_momentum=None,
                 nesterov=None, pipeline=None):
        from .session import StraitError

        conf = session.sync_config.get("diloco") or {}
        if int(conf.get("fragments", 1)) > 1:
            raise StraitError("strait.DiLoCo: sync.diloco.fragments > 1 (streaming DiLoCo) is not implemented "
                              "yet; remove it or set it to 1")
        sync_every = int(conf.get("sync_every", 50)) if sync_every is None else sync_every
        outer_lr = float(conf.get("outer_lr", 0.7)) if outer_lr is None else outer_lr
        outer_momentum = float(conf.get("outer_momentum", 0.9)) if outer_momentum is None else outer_momentum
        nesterov = bool(conf.get("nesterov", True)) if nesterov is None else nesterov
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
        session.check_same_everywhere("diloco.model", "\n".join(f"{n} {tuple(p.shape)}" for n, p in named))
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])
            # Start from one set of weights everywhere: site 0's leader's.
            self.global_params = self._agree(flat)
            self._load(self.global_params)
        self.momentum = torch.zeros_like(self.global_params)
        self.local_steps = 0
        self.syncs = 0

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
        import hashlib

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

    def step(self):
        self.local_steps += 1
        if self.local_steps % self.sync_every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self):
        s = self.session
        local = torch.cat([p.detach().reshape(-1).float().cpu() for p in self.params])
        pseudo = self.global_params - local

        def exchange():  # on the site leader
            if self.pipeline is not None:
                return s.average_across_sites(pseudo, "diloco", self.pipeline)
            return s.average_parts_across_sites(pseudo, self.parts, "diloco")

        outer_grad = s.from_leader(exchange, torch.empty_like(local))
        # The same outer step, in the same float32 ops, on every worker.
        self.momentum.mul_(self.mu).add_(outer_grad)
        update = outer_grad.add(self.momentum, alpha=self.mu) if self.nesterov else self.momentum
        self.global_params.sub_(update, alpha=self.outer_lr)
        self._load(self.global_params)
        self.syncs += 1
