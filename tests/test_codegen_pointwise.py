"""Generated pointwise Triton code (codegen/pointwise.py) against PyTorch, under TRITON_INTERPRET."""

import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from sixbit_compiler.codegen.pointwise import Unsupported, cache_dir, emit_pointwise, load_kernel, run_pointwise

F = torch.nn.functional


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIXBIT_CACHE_DIR", str(tmp_path / "codegen"))


def lowered(fn, *examples):
    """(kernel, the tensors in kernel order) for ``fn`` traced and shape-propagated on ``examples``."""
    gm = fx.symbolic_trace(fn)
    ShapeProp(gm).propagate(*examples)
    nodes = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    kernel = emit_pointwise(nodes)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return kernel, names


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU


def run(kernel, names, *tensors):
    by_name = dict(zip(names, tensors))
    return run_pointwise(kernel, *[by_name[n].to(DEV) for n in kernel.inputs]).cpu()


OPS = {
    "add": lambda x, y: x + y,
    "mul": lambda x, y: x * y,
    "sub": lambda x, y: x - y,
    "div": lambda x, y: x / y,
    "neg": lambda x, y: -x + y,
    "scalar": lambda x, y: 1 + x * 0.5 - y,
    "sigmoid": lambda x, y: torch.sigmoid(x) * y,
    "tanh": lambda x, y: torch.tanh(x) + y,
    "exp": lambda x, y: torch.exp(x) * y,
    "gelu_tanh": lambda x, y: F.gelu(x, approximate="tanh") * y,
    "gelu_erf": lambda x, y: F.gelu(x) * y,
    "silu": lambda x, y: F.silu(x) + y,
    "relu": lambda x, y: F.relu(x) - y,
    "dropout_inert": lambda x, y: F.dropout(x, 0.0, False) + y,
    "float_then_cast": lambda x, y: (x.float() * y).to(torch.bfloat16),
    "type_as": lambda x, y: (x.float() + y).type_as(x),
}


def inputs(dtype, shape=(4, 33, 40), gen=0):
    g = torch.Generator().manual_seed(gen)
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    y = torch.randn(shape[-1], generator=g).to(dtype) + 2.5  # broadcast over the leading dims
    return x, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op", list(OPS))
def test_each_op_matches_pytorch(op, dtype):
    fn = OPS[op]
    kernel, names = lowered(fn, *inputs(dtype, (2, 5, 40)))
    x, y = inputs(dtype, gen=1)  # fresh inputs, another shape of the same rank
    x_t = x.transpose(0, 1)  # non-contiguous
    for a in (x, x_t):
        got, want = run(kernel, names, a, y), fn(a, y)
        assert got.dtype == want.dtype and got.shape == want.shape
        # fp32: the same formula up to libm differences; bf16: each op rounded as eager rounds it,
        # so one bf16 ulp; near zero, transcendental libraries differ in the last fp32 bits
        # (GELU-erf's 1 + erf(x) cancels for x < -3 in both implementations)
        atol = 5e-5 if op == "gelu_erf" else 1e-5 if want.dtype == torch.float32 else 1e-6
        tol = dict(atol=atol, rtol=1e-5) if want.dtype == torch.float32 else dict(atol=atol, rtol=2 ** -7)
        torch.testing.assert_close(got.float(), want.float(), **tol)


def test_adaln_modulation_is_bit_exact_in_bf16_and_nasty_values_pass_through():
    def modulate(x, scale, shift):
        return (x.float() * (1 + scale) + shift).type_as(x)

    x = torch.randn(2, 48, 64).bfloat16()
    scale, shift = torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    kernel, names = lowered(modulate, x, scale, shift)
    x = torch.randn(3, 77, 64).bfloat16()
    x[0, 0, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0])
    x[1] = 0
    x[2, 5] = 3e38  # overflows to inf after the modulation, as in eager
    got, want = run(kernel, names, x, scale, shift), modulate(x, scale, shift)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()], want[~want.isnan()])


def test_one_kernel_serves_every_size_of_a_rank_and_is_cached_on_disk():
    fn = OPS["gelu_tanh"]
    kernel, names = lowered(fn, *inputs(torch.float32, (1, 3, 8)))
    a = run(kernel, names, *inputs(torch.float32, (2, 17, 8)))
    b = run(kernel, names, *inputs(torch.float32, (1, 1000, 24), gen=3))
    assert a.shape == (2, 17, 8) and b.shape == (1, 1000, 24)
    files = [p for p in __import__("os").listdir(cache_dir()) if p.endswith(".py")]
    assert files == [f"{kernel.name}.py"] and kernel.name.endswith(kernel.key)  # one source, keyed by its signature
    again, _ = lowered(fn, *inputs(torch.float32, (5, 2, 3)))
    assert again.key == kernel.key and load_kernel(again) is load_kernel(kernel)
    other, _ = lowered(OPS["silu"], *inputs(torch.float32, (1, 3, 8)))
    assert other.key != kernel.key


def test_an_op_with_no_translation_is_refused():
    with pytest.raises(Unsupported, match="cumsum"):
        lowered(lambda x, y: torch.cumsum(x, -1) + y, *inputs(torch.float32))
    with pytest.raises(Unsupported, match="dtype"):
        lowered(lambda x, y: (x + y).to(torch.float64), *inputs(torch.float32))
    kernel, names = lowered(OPS["add"], *inputs(torch.float32))
    with pytest.raises(ValueError, match="rank"):
        run_pointwise(kernel, torch.randn(3, 4), torch.randn(4))


def test_the_fx_chains_of_a_wan_block_translate(tmp_path):
    """Every prologue and epilogue chain fuse_regions records on a tiny Wan (its elementwise part)
    emits; the epilogue of ffn.net.2 (gate, residual) matches the graph's own values."""
    from conftest import capture, context_for
    from models import tiny_wan, wan_inputs
    from sixbit_compiler.passes import find_blocks, fuse_regions, quantize_linears

    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    gm, ctx = context_for(gm, ex, activation="int8")
    find_blocks(gm, ctx)
    quantize_linears(gm, ctx)
    fuse_regions(gm, ctx)
    names = {n.name: n for n in gm.graph.nodes}
    emitted = rows = 0
    for r in ctx.regions:
        for chain in [r.prologue] + list(r.epilogues.values()):
            if chain:  # whole chains: norms included (a prologue kernel then runs a row per program)
                kernel = emit_pointwise([names[n] for n in chain])
                emitted += 1
                rows += kernel.rows
    assert emitted >= 16 and rows == 6  # blocks x (self-attn, cross-attn, FFN) prologues hold a norm
    # operator targets in these graphs are the Python operators
    assert any(names[n].target is operator.mul for r in ctx.regions for e in r.epilogues.values() for n in e)


N = 40  # the normalized size (a constant, as in a traced model); not a power of two: the tile is masked


def prologues(n: int) -> dict:
    """Norm prologue chains over rows ``n`` wide."""
    return {
        # Wan's AdaLN prologue: a norm without affine, then x * (1 + scale) + shift, cast back
        "wan_adaln": lambda x, w, b, scale, shift: (
            F.layer_norm(x.float(), (n,), None, None, 1e-6).to(torch.float32) * (1 + scale) + shift).type_as(x),
        "layer_norm_affine": lambda x, w, b, scale, shift: F.layer_norm(x, (n,), w, b, 1e-5) * scale,
        "rms_norm": lambda x, w, b, scale, shift: torch.rms_norm(x.float(), (n,), w, 1e-6).type_as(x),
        "rms_norm_default_eps": lambda x, w, b, scale, shift: F.rms_norm(x, (n,)) + shift,
    }


PROLOGUES = prologues(N)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chain", list(PROLOGUES))
def test_norm_prologues_match_pytorch_row_by_row(chain, dtype):
    fn = PROLOGUES[chain]

    def args(rows, n, gen):
        g = torch.Generator().manual_seed(gen)
        x = (torch.randn(rows, n, generator=g) * 4 + 1).to(dtype).view(2, rows // 2, n)
        w, b = torch.randn(n, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
        return x, w, b, torch.randn(1, 1, n, generator=g), torch.randn(1, 1, n, generator=g)

    kernel, names = lowered(fn, *args(4, N, 0))
    assert kernel.rows
    x, w, b, scale, shift = args(34, N, 1)  # fresh inputs, more rows
    x[0, 0] = 0  # a constant row: variance 0
    x[0, 1, 3] = float("nan")  # a NaN poisons its own row only
    got, want = run(kernel, names, x, w, b, scale, shift), fn(x, w, b, scale, shift)
    assert torch.equal(got.isnan(), want.isnan()) and got.isnan()[0, 1].all() and not got.isnan()[0, 2].any()
    ok = ~want.isnan()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2 ** -7)
    torch.testing.assert_close(got[ok].float(), want[ok].float(), **tol)
