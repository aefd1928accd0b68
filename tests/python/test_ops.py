"""torch.ops.strait against references written with PyTorch ops: what `import
strait` gives a training script; torch.library.opcheck on every operator
(schema, fake kernel, autograd registration, AOT dispatch) and the operators
inside a torch.compile'd function."""

import pytest
import torch

import strait


def gaussian(n, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * scale


SIZES = [0, 1, 7, 256, 257, 4099]


@pytest.mark.parametrize("n", SIZES)
def test_fp16_and_bf16_match_torch_rounding(n):
    x = gaussian(n, n, 10.0)
    assert torch.equal(strait.decode(strait.encode(x, "fp16"), x.shape), x.half().float())
    assert torch.equal(strait.decode(strait.encode(x, "bf16"), x.shape), x.bfloat16().float())


def int_reference(x, bits, block):
    """Blockwise symmetric quantisation, nearest rounding, written with torch ops."""
    L = (1 << (bits - 1)) - 1
    out = torch.empty_like(x)
    for start in range(0, x.numel(), block):
        b = x[start:start + block]
        amax = b.abs().max()
        scale = amax / L
        inv = L / amax if amax > 0 else torch.tensor(0.0)
        q = torch.round(b * inv).clamp(-L, L)  # torch.round is half-to-even
        out[start:start + block] = q * scale
    return out


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("n", [1, 255, 1000])
def test_int_matches_reference(bits, n):
    x = gaussian(n, bits * n)
    y = strait.decode(strait.encode(x, f"int{bits}(block=64)"), x.shape)
    assert torch.equal(y, int_reference(x, bits, 64))


def test_topk_keeps_what_torch_topk_keeps():
    x = gaussian(10000, 3)
    y = strait.decode(strait.encode(x, "topk(0.01)"), x.shape)
    idx = torch.topk(x.abs(), 100).indices
    expect = torch.zeros_like(x)
    expect[idx] = x[idx]
    assert torch.equal(y, expect)


def test_shapes_are_kept_and_lowrank_uses_them():
    a = gaussian(64 * 3, 1).view(64, 3)
    b = gaussian(3 * 48, 2).view(3, 48)
    m = a @ b  # rank 3
    y = strait.decode(strait.encode(m, "lowrank(rank=3)"), m.shape)
    assert y.shape == m.shape
    assert torch.allclose(y, m, rtol=1e-4, atol=1e-4)
    n, structure, values, bits = strait.payload_info(strait.encode(m, "lowrank(rank=3) -> fp16"))
    assert (n, structure, values, bits) == (64 * 48, "lowrank", "fp16", 16)


@pytest.mark.parametrize("pipeline", ["int8", "topk(0.05) -> int4", "sign", "lowrank(2) -> bf16", "randomk(0.1)"])
def test_decode_accumulate_adds_the_weighted_decode(pipeline):
    x = gaussian(3000, 5)
    p = strait.encode(x, pipeline, seed=7)
    acc = gaussian(3000, 6)
    expect = acc + 0.25 * strait.decode(p, x.shape)
    strait.decode_accumulate(acc, p, 0.25)
    assert torch.allclose(acc, expect, rtol=1e-6, atol=1e-6)


def test_a_corrupt_payload_raises_and_leaves_the_accumulator_alone():
    x = gaussian(1000, 1)
    p = strait.encode(x, "topk(0.1) -> int8").clone()
    p[30] ^= 0xFF  # inside the index section
    acc = torch.ones(1000)
    for bad in (p[:-1], p):
        try:
            strait.decode_accumulate(acc, bad, 1.0)
        except RuntimeError as e:
            assert "strait.decode_accumulate" in str(e)
        assert torch.isfinite(acc).all()
    truncated = strait.encode(x, "int8")[:-3]
    before = acc.clone()
    with pytest.raises(RuntimeError, match="truncated payload"):
        strait.decode_accumulate(acc, truncated, 1.0)
    assert torch.equal(acc, before)


def test_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="expected a float32 tensor, got Int"):
        strait.encode(torch.zeros(3, dtype=torch.int32), "int8")
    x = gaussian(100, 1)
    x[42] = float("inf")
    with pytest.raises(RuntimeError, match="at index 42"):
        strait.encode(x, "int8")
    with pytest.raises(RuntimeError, match="unknown stage 'int9'"):
        strait.encode(gaussian(10), "int9")
    with pytest.raises(RuntimeError, match="holds 10 values but the destination has 11"):
        strait.decode(strait.encode(gaussian(10), "fp32"), [11])
    with pytest.raises(RuntimeError, match="1-D uint8 tensor"):
        strait.decode(torch.zeros(4), [1])


def test_compressor_error_feedback_loses_nothing():
    c = strait.Compressor("topk(0.05) -> int8", seed=3, error_feedback=True)
    assert c.error_feedback and c.pipeline.startswith("topk(ratio=0.05")
    g = gaussian(2000, 9)
    sent = torch.zeros(2000, dtype=torch.float64)
    steps = 50
    for _ in range(steps):
        sent += strait.decode(c.encode(g), g.shape).double()
    total = sent + c.residual().double()
    assert torch.allclose(total, g.double() * steps, atol=1e-3 * steps)
    c.reset()
    assert c.residual().numel() == 0
    with pytest.raises(RuntimeError, match="no error feedback"):
        strait.Compressor("int8", error_feedback=False).set_residual(torch.zeros(3))


OPERATORS = ("encode", "decode", "decode_accumulate")


def test_ops_are_registered_under_torch_ops_strait():
    for name in OPERATORS:
        assert hasattr(torch.ops.strait, name)
    p = torch.ops.strait.encode(gaussian(8), "fp32", 0)
    assert strait.payload_info(p)[0] == 8
    assert torch.classes.strait.Library.payload_info(p)[1:] == ("dense", "fp32", 32)


def opcheck_samples():
    """(operator name, arguments) covering every operator, sizes 0, 1 and
    sizes that do not divide a block, dense and sparse pipelines."""
    out = []
    for n, pipeline in [(0, "fp16"), (1, "int8"), (257, "int4(block=64)"), (1000, "topk(0.05) -> int8"),
                        (64 * 48, "lowrank(rank=2) -> fp16"), (300, "sign")]:
        x = gaussian(n, n + 1)
        shape = [64, 48] if pipeline.startswith("lowrank") else [n]
        x = x.view(shape)
        out.append(("encode", (x, pipeline, 7)))
        payload = strait.encode(x, pipeline, 7)
        out.append(("decode", (payload, shape)))
        out.append(("decode_accumulate", (torch.ones(shape), payload, 0.25)))
    return out


@pytest.mark.parametrize("name,args", opcheck_samples(), ids=lambda v: v if isinstance(v, str) else None)
def test_opcheck_passes_for_every_operator(name, args):
    torch.library.opcheck(getattr(torch.ops.strait, name), args)


def test_opcheck_samples_cover_every_operator():
    assert {name for name, _ in opcheck_samples()} == set(OPERATORS)


def test_the_operators_trace_under_torch_compile():
    """A compiled function that encodes, decodes and accumulates gives the
    same bits as the eager calls: the fake kernels let dynamo put the ops in
    a graph (fullgraph: no graph break)."""
    x = gaussian(4096, 5)

    def roundtrip(x, acc):
        p = torch.ops.strait.encode(x, "int8", 3)
        y = torch.ops.strait.decode(p, [4096])
        torch.ops.strait.decode_accumulate(acc, p, 0.5)
        return y * 2

    torch._dynamo.reset()
    compiled = torch.compile(roundtrip, fullgraph=True, backend="aot_eager")
    acc_eager, acc_compiled = torch.zeros(4096), torch.zeros(4096)
    expect = roundtrip(x, acc_eager)
    got = compiled(x, acc_compiled)
    assert torch.equal(got, expect)
    assert torch.equal(acc_compiled, acc_eager)


def test_build_info_names_the_library_and_its_torch():
    info = strait.build_info()
    assert info["version"] == strait.__version__
    assert info["torch"] == torch.__version__.split("+")[0]
    assert info["library"] == strait.library_path
    assert isinstance(info["cuda"], bool)
    if info["cuda"]:
        assert info["cuda_archs"] and info["cuda_runtime"] > 0


def test_rule_for_applies_the_config_rules(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("""job: {id: j}
sites:
  - {name: a, jurisdiction: CN, endpoint: "tcp://127.0.0.1:7001"}
compression:
  pipeline: "topk(0.01) -> int8"
  rules:
    - {match: "ddp.bucket0", pipeline: fp16, error_feedback: false}
    - {match: "*", max_size: 100, pipeline: bf16}
""")
    rule = torch.classes.strait.Library.rule_for
    assert tuple(rule(str(cfg), "ddp.bucket0", 10**6)) == ("fp16", False)
    assert tuple(rule(str(cfg), "ddp.bucket1", 50)) == ("bf16", True)
    pipeline, ef = rule(str(cfg), "ddp.bucket1", 10**6)
    assert pipeline.startswith("topk(ratio=0.01") and ef


def test_init_errors_name_the_problem(tmp_path):
    with pytest.raises(strait.StraitError, match="does not exist"):
        strait.init(str(tmp_path / "missing.yaml"), site="a")
    cfg = tmp_path / "job.yaml"
    cfg.write_text("job: {id: j}\nsites:\n  - {name: a, jurisdiction: CN, endpoint: \"tcp://127.0.0.1:7001\"}\n")
    with pytest.raises(strait.StraitError, match="no site named 'tokyo' in job 'j'; sites: a"):
        strait.init(str(cfg), site="tokyo")
    bad = tmp_path / "bad.yaml"
    bad.write_text("job: {id: j}\nsites:\n  - {name: a, jurisdiction: China, endpoint: \"tcp://127.0.0.1:7001\"}\n")
    with pytest.raises(strait.StraitError, match=r"bad.yaml:3: sites\[0\].jurisdiction = China"):
        strait.init(str(bad), site="a")


def test_init_without_config_or_site_says_which_is_missing(monkeypatch):
    monkeypatch.delenv("STRAIT_CONFIG", raising=False)
    monkeypatch.delenv("STRAIT_SITE", raising=False)
    with pytest.raises(strait.StraitError, match="no config given"):
        strait.init(site="a")
    monkeypatch.setenv("STRAIT_CONFIG", "/nonexistent/job.yaml")
    with pytest.raises(strait.StraitError, match="no site given"):
        strait.init()
    monkeypatch.setenv("STRAIT_SITE", "a")
    with pytest.raises(strait.StraitError, match="'/nonexistent/job.yaml' does not exist"):
        strait.init()


def test_seeds_cover_the_documented_range_0_to_2_64_minus_1():
    x = gaussian(1000, 5)
    pipe = "int4(block=64, rounding=stochastic)"
    top = (1 << 64) - 1
    # Seeds from 2^63 on are accepted, deterministic and their own streams (not folded onto small ones).
    big = (1 << 63) + 5
    assert torch.equal(strait.encode(x, pipe, big), strait.encode(x, pipe, big))
    assert not torch.equal(strait.encode(x, pipe, big), strait.encode(x, pipe, 5))
    assert not torch.equal(strait.encode(x, pipe, top), strait.encode(x, pipe, 0))
    assert torch.equal(strait.Compressor(pipe, top, False).encode(x), strait.encode(x, pipe, top))
    for bad in (-1, 1 << 64):
        with pytest.raises(ValueError, match=r"\[0, 2\^64-1\]"):
            strait.encode(x, pipe, bad)
    with pytest.raises(TypeError, match="integer"):
        strait.encode(x, pipe, 1.5)


@pytest.mark.parametrize("state", [None, "a process group"])
def test_the_hook_without_a_session_says_what_to_pass(state):
    with pytest.raises(strait.StraitError, match=r"register_comm_hook\(strait.init\(CONFIG\), strait.ddp_hook\)"):
        strait.ddp_hook(state, None)


GPU = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (none here); ./strait gpu-check runs it")


@GPU
@pytest.mark.parametrize("pipeline", ["fp32", "fp16", "bf16", "int8", "int4(block=8, rounding=stochastic)", "int2",
                                      "qsgd", "sign(block=1000)", "topk(0.01) -> int8", "topk(0.3) -> sign"])
@pytest.mark.parametrize("n", [1, 4099, 1000003])
def test_cuda_tensors_give_the_cpu_bytes_and_bits(pipeline, n):
    x = gaussian(n, seed=n)
    x[::97] *= 40
    payload = strait.encode(x, pipeline, seed=5)
    assert torch.equal(strait.encode(x.cuda(), pipeline, seed=5), payload)
    back = strait.decode(payload.cuda(), (n,))
    assert back.is_cuda and torch.equal(back.cpu().view(torch.int32), strait.decode(payload, (n,)).view(torch.int32))
    acc = gaussian(n, seed=1)
    acc_gpu = acc.cuda()
    strait.decode_accumulate(acc, payload, 0.37)
    strait.decode_accumulate(acc_gpu, payload, 0.37)
    assert torch.equal(acc_gpu.cpu().view(torch.int32), acc.view(torch.int32))


@GPU
def test_cuda_encode_refuses_what_the_cpu_refuses_naming_the_index():
    x = gaussian(5000).cuda()
    x[4321] = float("nan")
    for pipeline in ["int8", "fp16", "sign"]:
        with pytest.raises(RuntimeError, match="index 4321"):
            strait.encode(x, pipeline)


@GPU
def test_error_feedback_on_the_gpu_matches_the_cpu():
    cpu = torch.classes.strait.Compressor("int4", 3, True)
    gpu = torch.classes.strait.Compressor("int4", 3, True)
    for step in range(4):
        g = gaussian(10007, seed=step)
        assert torch.equal(gpu.encode(g.cuda()), cpu.encode(g))
    assert torch.equal(gpu.residual().view(torch.int32), cpu.residual().view(torch.int32))


def test_decode_accumulate_into_a_strided_view_gives_the_contiguous_bits():
    x = gaussian(1000, seed=4)
    for pipeline in ["int8", "topk(0.1) -> fp16", "randomk(0.1)"]:
        payload = strait.encode(x, pipeline, seed=2)
        base = gaussian(2000, seed=8)
        expect = base[::2].contiguous()
        strait.decode_accumulate(expect, payload, 0.3)
        strait.decode_accumulate(base[::2], payload, 0.3)  # a strided view, written through
        assert torch.equal(base[::2].view(torch.int32), expect.view(torch.int32)), pipeline
