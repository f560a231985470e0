"""Generated INT8 GEMM + epilogue kernels (codegen/gemm.py) against the unfused computation:
the INT8 GEMM's output rounded to its dtype, then the chain in eager PyTorch. Runs under
TRITON_INTERPRET on CPU and compiled on a GPU."""

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from sixbit_compiler.codegen.gemm import emit_gemm_epilogue, run_gemm_epilogue
from sixbit_compiler.codegen.pointwise import Unsupported, run_pointwise

F = torch.nn.functional
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIXBIT_CACHE_DIR", str(tmp_path / "codegen"))


#: epilogues as Wan and CogVideoX write them; g is the GEMM's output, r a residual, s a gate
EPILOGUES = {
    "gate_residual": lambda g, r, s: (r.float() + g * s).type_as(r),  # Wan's attn1 / FFN out
    "residual": lambda g, r, s: r + g,  # cross-attention out
    "gelu_tanh": lambda g, r, s: F.gelu(g, approximate="tanh"),  # ffn.net.0
    "gated_gelu": lambda g, r, s: F.gelu(g) * s + r,
    "silu_sub": lambda g, r, s: F.silu(g) - r * 0.5,
}


def lowered(fn, dtype, shape):
    """(kernel, its extra inputs' placeholder names) for ``fn(g, r, s)`` traced at ``shape``."""
    gm = fx.symbolic_trace(fn)
    g, r, s = example(dtype, shape, gen=99)[3:]
    ShapeProp(gm).propagate(g, r, s)
    ph = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    chain = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    return emit_gemm_epilogue(ph["g"], chain), ph


def int8_operands(m, k, n, gen):
    g = torch.Generator().manual_seed(gen)
    xq = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
    xs = torch.rand(m, 1, generator=g) * 1e-2 + 1e-4
    ws = torch.rand(n, 1, generator=g) * 1e-2 + 1e-4
    bias = torch.randn(n, generator=g)
    return xq, xs, wq, ws, bias


def unfused_gemm(xq, xs, wq, ws, bias, dtype):
    """The hand-written INT8 GEMM's value: exact int32 products (fp32 is exact for these K),
    then the scales and the bias in the kernel's order, rounded to the output dtype."""
    acc = xq.double() @ wq.double().t()
    return ((acc.float() * xs.reshape(-1, 1)) * ws.reshape(1, -1) + bias).to(dtype)


def example(dtype, shape, gen):
    """INT8 operands for a GEMM with output ``shape``, the GEMM's unfused output, a residual, a gate."""
    *lead, n = shape
    m = 1
    for d in lead:
        m *= d
    xq, xs, wq, ws, bias = int8_operands(m, 80, n, gen)
    g = unfused_gemm(xq, xs, wq, ws, bias, dtype).reshape(shape)
    gen_ = torch.Generator().manual_seed(gen + 1)
    r = torch.randn(shape, generator=gen_).to(dtype)
    s = torch.randn((shape[0], 1, n), generator=gen_).to(dtype)  # per-sample gate, broadcast over tokens
    return (xq, xs, wq, ws, bias), (tuple(lead), n), None, g, r, s


def fused(kernel, ph, operands, lead, r, s):
    by_name = {"r": r, "s": s}
    extras = [by_name[name].to(DEV) for name in kernel.inputs]
    xq, xs, wq, ws, bias = (t.to(DEV) for t in operands)
    return run_gemm_epilogue(kernel, xq, xs, wq, ws, bias, extras, lead)


def ordered_bits(t):
    """bf16 values as integers in the order of the values (-0 and +0 equal): neighbours differ by 1."""
    b = t.bfloat16().view(torch.int16).int()
    return torch.where(b < 0, -(b & 0x7FFF), b)


def assert_matches(got, want, exact: bool):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.bfloat16 and not exact:
        got = got.cpu()
    else:
        got, want = got.cpu().float(), want.float()
    assert torch.equal(got.isnan(), want.isnan())
    if exact:
        assert torch.equal(got[~got.isnan()], want[~want.isnan()])
    elif want.dtype == torch.bfloat16:  # transcendental functions: libm vs Triton in the last
        # fp32 bits, which may move the bf16 rounding by one step: at most one bf16 ulp apart.
        # Where GELU-tanh's 1 + tanh(y) cancels (y < -4), eager gives 0 and the kernel's
        # x·sigmoid(2y) the true tiny value: those may differ by 1e-6 absolutely.
        ok = ~got.isnan()
        steps = (ordered_bits(got[ok]) - ordered_bits(want[ok])).abs()
        tiny = (got[ok].float() - want[ok].float()).abs() < 1e-6
        assert bool(((steps <= 1) | tiny).all())
    else:
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(EPILOGUES))
def test_each_epilogue_matches_the_unfused_gemm_then_the_chain(name, dtype):
    fn = EPILOGUES[name]
    kernel, ph = lowered(fn, dtype, (2, 8, 48))
    # fresh operands at another token count and width, none a multiple of the 64-wide tiles
    operands, (lead, n), _, g, r, s = example(dtype, (2, 37, 72), gen=1)
    got = fused(kernel, ph, operands, lead, r, s)
    assert_matches(got, fn(g, r, s), exact=name in ("gate_residual", "residual"))


def test_nasty_residuals_zeros_and_non_contiguous_inputs():
    fn = EPILOGUES["gate_residual"]
    dtype = torch.bfloat16
    kernel, ph = lowered(fn, dtype, (1, 4, 16))
    operands, (lead, n), _, g, r, s = example(dtype, (3, 45, 40), gen=5)
    r = r.transpose(0, 1).contiguous().transpose(0, 1)  # non-contiguous: strides (40, 120, 1)
    r[0, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    r[1] = 0
    s[2] = 0
    operands[0][:5] = 0  # all-zero activation rows
    g = unfused_gemm(*operands, dtype).reshape(r.shape)
    assert not r.is_contiguous()
    got = fused(kernel, ph, operands, lead, r, s)
    assert_matches(got, fn(g, r, s), exact=True)


def test_one_kernel_serves_every_token_count_and_the_source_calls_the_gemm_template():
    fn = EPILOGUES["gelu_tanh"]
    kernel, ph = lowered(fn, torch.float32, (1, 3, 8))
    assert "scaled_tile(" in kernel.source and "def scaled_tile" not in kernel.source  # imported, not copied
    for shape in [(1, 5, 24), (2, 130, 8)]:
        operands, (lead, n), _, g, r, s = example(torch.float32, shape, gen=len(shape[1:]) + shape[1])
        assert_matches(fused(kernel, ph, operands, lead, r, s), fn(g, r, s), exact=False)


def test_the_chain_alone_computes_the_same_for_other_precisions():
    fn = EPILOGUES["gate_residual"]
    kernel, ph = lowered(fn, torch.bfloat16, (2, 8, 48))
    _, _, _, g, r, s = example(torch.bfloat16, (2, 11, 32), gen=3)
    by_name = {"g": g, "r": r, "s": s}
    got = run_pointwise(kernel.alone, *[by_name[n].to(DEV) for n in kernel.alone.inputs])
    assert_matches(got, fn(g, r, s), exact=True)


def test_refusals():
    with pytest.raises(Unsupported, match="norm"):
        lowered(lambda g, r, s: F.layer_norm(g, (g.shape[-1],)) + r, torch.float32, (1, 2, 16))
    with pytest.raises(Unsupported, match="translation"):
        lowered(lambda g, r, s: torch.cumsum(g, -1) + r, torch.float32, (1, 2, 16))
    # an input that would broadcast the output beyond the GEMM's shape: the caller runs unfused
    kernel, ph = lowered(EPILOGUES["residual"], torch.float32, (1, 2, 16))
    operands, (lead, n), _, g, r, s = example(torch.float32, (1, 3, 16), gen=0)
    assert fused(kernel, ph, operands, lead, torch.randn(4, 3, 16), s) is None


def test_linear_epilogue_takes_the_fused_kernel_for_one_byte_precisions(monkeypatch):
    """The op reads its precision per call: INT8 and FP8 run the generated GEMM, NVFP4 the
    quantized linear and then the chain; all agree with quantized_linear followed by the chain."""
    import sixbit_compiler.codegen.gemm as gemm_codegen
    from sixbit_compiler.formats import Precision, quantize_nvfp4
    from sixbit_compiler.ops import linear_epilogue, quantized_linear

    fn = EPILOGUES["gate_residual"]
    kernel, ph = lowered(fn, torch.float32, (2, 8, 48))
    gemm_codegen.REGISTRY[kernel.key] = kernel
    calls = []
    real = gemm_codegen.run_gemm_epilogue
    monkeypatch.setattr(gemm_codegen, "run_gemm_epilogue", lambda *a: calls.append(1) or real(*a))
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, 64, generator=g).to(DEV)
    packed, scales, ts = quantize_nvfp4(torch.randn(48, 64, generator=g))
    w = (packed.to(DEV), scales.view(torch.uint8).to(DEV), ts.to(DEV))
    r, s = torch.randn(2, 9, 48, generator=g).to(DEV), torch.randn(2, 1, 48, generator=g).to(DEV)
    by_name = {"r": r, "s": s}
    extras = [by_name[n] for n in kernel.inputs]
    for precision in (Precision.INT8, Precision.FP8, Precision.NVFP4):
        slots = torch.tensor([int(precision)], dtype=torch.int8)
        got = linear_epilogue(x, *w, None, slots, 0, 64, False, kernel.key, extras)
        want = fn(quantized_linear(x, *w, None, slots, 0, 64, False), r, s)
        # FP8 on a GPU: the two GEMMs may promote Hopper's ~14-bit MMA accumulation differently
        tol = 1e-3 if precision == Precision.FP8 and DEV == "cuda" else 1e-5
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert len(calls) == 2  # the INT8 and FP8 calls


def test_generated_kernel_ops_pass_opcheck():
    """linear_epilogue and region_kernel: schema, fake (meta) shapes and dtypes, dispatch."""
    import sixbit_compiler.codegen.gemm as gemm_codegen
    import sixbit_compiler.ops  # noqa: F401  (registers the ops)
    from sixbit_compiler.codegen.pointwise import REGISTRY as POINTWISE
    from sixbit_compiler.formats import Precision, quantize_nvfp4

    kernel, _ = lowered(EPILOGUES["gate_residual"], torch.bfloat16, (2, 8, 48))
    gemm_codegen.REGISTRY[kernel.key] = kernel
    POINTWISE[kernel.alone.key] = kernel.alone
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 64, generator=g).bfloat16().to(DEV)
    packed, scales, ts = quantize_nvfp4(torch.randn(48, 64, generator=g))
    w = (packed.to(DEV), scales.view(torch.uint8).to(DEV), ts.to(DEV))
    r, s = torch.randn(2, 5, 48, generator=g).bfloat16().to(DEV), torch.randn(2, 1, 48, generator=g).bfloat16().to(DEV)
    extras = [{"r": r, "s": s}[n] for n in kernel.inputs]
    slots = torch.tensor([int(Precision.INT8)], dtype=torch.int8)
    torch.library.opcheck(torch.ops.sixbit.linear_epilogue.default, (x, *w, None, slots, 0, 64, False, kernel.key, extras))
    gemm_out = torch.randn(2, 5, 48, generator=g).bfloat16().to(DEV)
    by_name = {kernel.gemm: gemm_out, "r": r, "s": s}
    torch.library.opcheck(torch.ops.sixbit.region_kernel.default,
                          (kernel.alone.key, [by_name[n] for n in kernel.alone.inputs]))
