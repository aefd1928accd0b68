"""Fake (meta) kernels of the operators in torch.ops.strait: what each returns
given only shapes, dtypes and devices, so the operators trace under
torch.compile and FakeTensor. The real kernels are C++ (torch_ext/csrc/ops.cc);
tests/python/test_ops.py runs torch.library.opcheck on every operator, which
checks that the two agree."""

import torch


@torch.library.register_fake("strait::encode")
def _encode(x, pipeline, seed=0):
    torch._check(x.dtype == torch.float32, lambda: f"strait.encode: expected a float32 tensor, got {x.dtype}")
    # A payload's length depends on the values (a sparse index codes
    # differently per tensor), so it is a size known only at run time.
    n = torch.library.get_ctx().new_dynamic_size()
    return torch.empty((n,), dtype=torch.uint8, device="cpu")


@torch.library.register_fake("strait::decode")
def _decode(payload, shape):
    torch._check(payload.dtype == torch.uint8 and payload.dim() == 1,
                 lambda: "strait.decode: the payload must be a 1-D uint8 tensor")
    return torch.empty(shape, dtype=torch.float32, device=payload.device)


@torch.library.register_fake("strait::decode_accumulate")
def _decode_accumulate(acc, payload, weight=1.0):
    torch._check(acc.dtype == torch.float32, lambda: f"strait.decode_accumulate: the accumulator must be float32")
    return None
