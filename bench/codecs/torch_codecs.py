"""The same transformations as strait's codecs, written with PyTorch ops the
way a user would, for the side-by-side in `./strait bench codecs`.

Each entry encodes a flat float32 tensor into tensors that hold what would be
sent, and decodes them back. One thread, best of `reps`.
"""

import time

import torch


def _blocks(x, block):
    pad = (-x.numel()) % block
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, block)


def _pack(q, bits):
    """Pack int8 codes in [-L, L] into bytes, 8 // bits codes per byte."""
    per = 8 // bits
    mask = (1 << bits) - 1
    u = (q.to(torch.int16) & mask).to(torch.uint8).view(-1, per)
    out = u[:, 0].clone()
    for i in range(1, per):
        out |= u[:, i] << (i * bits)
    return out


def _unpack(packed, bits):
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8) * bits
    u = ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).to(torch.int8)
    u = torch.where(u >= (1 << (bits - 1)), u - (1 << bits), u)
    return u.view(-1)


def int_encode(x, bits, block=256, stochastic=False, norm=False):
    L = (1 << (bits - 1)) - 1
    xb = _blocks(x, block)
    if norm:
        scale = xb.norm(dim=1, keepdim=True) / L
    else:
        scale = xb.abs().amax(dim=1, keepdim=True) / L
    y = xb / scale.clamp_min(1e-38)
    if stochastic:
        y = torch.floor(y + torch.rand_like(y))
    else:
        y = torch.round(y)
    q = y.clamp_(-L, L).to(torch.int8)
    return (scale, q if bits == 8 else _pack(q, bits))


def int_decode(enc, bits, n):
    scale, q = enc
    if bits != 8:
        q = _unpack(q, bits)
    return (q.view(scale.shape[0], -1).float() * scale).view(-1)[:n]


def sign_encode(x, block=256):
    xb = _blocks(x, block)
    scale = xb.abs().mean(dim=1, keepdim=True)
    bits = (xb < 0).view(-1, 8).to(torch.uint8)
    weights = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)
    return scale, (bits * weights).sum(dim=1, dtype=torch.uint8)


def sign_decode(enc, n):
    scale, packed = enc
    bits = (packed.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1
    signs = 1.0 - 2.0 * bits.view(scale.shape[0], -1).float()
    return (signs * scale).view(-1)[:n]


def topk_encode(x, k):
    idx = torch.topk(x.abs(), k, sorted=False).indices
    return idx, x[idx]


def sparse_decode(enc, n):
    idx, vals = enc
    out = torch.zeros(n)
    out[idx] = vals if vals.dtype == torch.float32 else vals.float()
    return out


def randomk_encode(x, k):
    idx = torch.randint(0, x.numel(), (k,))
    return idx, x[idx]


def lowrank_encode(x, rank, q_state):
    side = int(x.numel() ** 0.5)
    m = x.view(side, -1)
    p = m @ q_state
    p, _ = torch.linalg.qr(p)
    q = m.t() @ p
    q_state.copy_(q)
    return p, q


def lowrank_decode(enc, n):
    p, q = enc
    return (p.float() @ q.float().t()).view(-1)[:n]


def baselines(x):
    """name -> (encode(), decode(encoded)) closures over x."""
    n = x.numel()
    k = max(1, int(0.01 * n + 0.999999))
    side = int(n ** 0.5)
    q_state = torch.randn(n // side, 4)

    def int_pair(bits, **kw):
        return (lambda: int_encode(x, bits, **kw), lambda e: int_decode(e, bits, n))

    def topk_int8_encode():
        idx, vals = topk_encode(x, k)
        return idx, int_encode(vals, 8)

    def topk_int8_decode(e):
        idx, enc = e
        return sparse_decode((idx, int_decode(enc, 8, idx.numel())), n)

    def randomk_int8_encode():
        idx, vals = randomk_encode(x, k)
        return idx, int_encode(vals, 8)

    def lowrank_fp16_encode():
        p, q = lowrank_encode(x, 4, q_state)
        return p.half(), q.half()

    return {
        "fp16": (lambda: x.half(), lambda e: e.float()),
        "bf16": (lambda: x.bfloat16(), lambda e: e.float()),
        "int8": int_pair(8),
        "int8_stochastic": int_pair(8, stochastic=True),
        "int4": int_pair(4),
        "int2": int_pair(2),
        "qsgd": int_pair(4, block=512, stochastic=True, norm=True),
        "sign": (lambda: sign_encode(x), lambda e: sign_decode(e, n)),
        "topk": (lambda: topk_encode(x, k), lambda e: sparse_decode(e, n)),
        "topk_radix": (lambda: topk_encode(x, k), lambda e: sparse_decode(e, n)),
        "randomk": (lambda: randomk_encode(x, k), lambda e: sparse_decode(e, n)),
        "lowrank": (lambda: lowrank_encode(x, 4, q_state), lambda e: lowrank_decode(e, n)),
        "topk(0.01) -> int8": (topk_int8_encode, topk_int8_decode),
        "randomk(0.01) -> int8": (randomk_int8_encode, topk_int8_decode),
        "lowrank(4) -> fp16": (lowrank_fp16_encode, lambda e: lowrank_decode(e, n)),
    }


def best_seconds(fn, reps):
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(n, reps, only=None, progress=None):
    """Returns {name: {"torch_encode_gbps", "torch_decode_gbps"}}."""
    torch.set_num_threads(1)
    torch.manual_seed(42)
    x = torch.randn(n) * 1e-3
    x[::4099] *= 30.0
    out = {}
    for name, (enc, dec) in baselines(x).items():
        if only and name != only:
            continue
        if progress:
            progress(name)
        e = enc()
        t_enc = best_seconds(enc, reps)
        t_dec = best_seconds(lambda: dec(e), reps)
        out[name] = {
            "torch_encode_gbps": 4.0 * n / t_enc / 1e9,
            "torch_decode_gbps": 4.0 * n / t_dec / 1e9,
        }
    return out
