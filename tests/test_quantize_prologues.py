"""quantize_prologues (with codegen): a norm prologue writes its GEMMs' per-token INT8 operand,
through the chunked row kernel of codegen/rows.py."""

import operator

import pytest
import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp

from conftest import apply_pass, capture, context_for
from models import tiny_wan, wan_inputs
from sixbit_compiler.codegen.pointwise import Unsupported
from sixbit_compiler.codegen.rows import chunking, emit_quantizing_rows, run_quantizing_rows
from sixbit_compiler.formats import quantize_int8
from sixbit_compiler.ops import QUANTIZED_GEMMS, REGION_KERNEL_INT8
from sixbit_compiler.passes import find_blocks, fuse_regions, lower_regions, quantize_linears, quantize_prologues
from test_codegen_pointwise import DEV, PROLOGUES, N, prologues

F = torch.nn.functional
OP = "sixbit.region_kernel_int8.default"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIXBIT_CACHE_DIR", str(tmp_path / "codegen"))


def same(a, b):
    """Bitwise-equal values with NaN == NaN."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


def traced(fn, *examples):
    gm = fx.symbolic_trace(fn)
    ShapeProp(gm).propagate(*examples)
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")], \
        [n.name for n in gm.graph.nodes if n.op == "placeholder"]


@pytest.mark.parametrize("width", [N, 1552], ids=["one-chunk", "chunks"])  # 1552: four chunks, the last partial
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chain", list(PROLOGUES))
def test_chunked_kernel_matches_pytorch_and_its_codes_are_the_spec(chain, dtype, width):
    """The chunked kernel's output matches PyTorch as the whole-row kernel does, on rows that are
    constant, NaN, overflow to Inf, or hold an outlier; its codes and scales equal
    formats.quantize_int8 of that output, bit for bit."""
    call = prologues(width)[chain]

    def args(rows, gen):
        g = torch.Generator().manual_seed(gen)
        x = (torch.randn(rows, width, generator=g) * 4 + 1).to(dtype).view(2, rows // 2, width)
        w, b = torch.randn(width, generator=g).to(dtype), torch.randn(width, generator=g).to(dtype)
        return [x, w, b, torch.randn(1, 1, width, generator=g), torch.randn(1, 1, width, generator=g)]

    nodes, names = traced(call, *args(4, 0))
    kernel = emit_quantizing_rows(nodes)
    x, w, b, scale, shift = args(34, 1)  # fresh inputs, an odd number of rows a program covers
    x[0, 0] = 0  # a constant row
    x[0, 1, 3] = float("nan")  # a NaN row: NaN scale, zero codes
    scale[0, 0, 7] = 3e38  # overflows to ±Inf in some rows: saturated before quantizing
    shift[0, 0, 11] = 500.0  # an outlier channel
    by_name = dict(zip(names, (x, w, b, scale, shift)))
    tensors = [by_name[n].to(DEV) for n in kernel.inputs]
    out, codes, scales = run_quantizing_rows(kernel, *tensors)
    want = call(x, w, b, scale, shift)
    assert torch.equal(out.isnan().cpu(), want.isnan()) and out.isnan()[0, 1].all()
    ok = ~want.isnan()
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2 ** -7)
    torch.testing.assert_close(out.cpu()[ok].float(), want[ok].float(), **tol)
    ref_codes, ref_scales = quantize_int8(out)
    assert torch.equal(codes, ref_codes) and same(scales, ref_scales)
    assert scales.isnan()[0, 1].all() and (codes[0, 1] == 0).all()


def test_the_output_can_be_skipped_and_the_codes_stay():
    nodes, names = traced(PROLOGUES["wan_adaln"], *[torch.randn(1, 4, N), None, None, torch.randn(1, 1, N),
                                                    torch.randn(1, 1, N)])
    kernel = emit_quantizing_rows(nodes)
    tensors = {"x": torch.randn(1, 6, N), "scale": torch.randn(1, 1, N), "shift": torch.randn(1, 1, N)}
    args = [tensors[n].to(DEV) for n in kernel.inputs]
    out, codes, scales = run_quantizing_rows(kernel, *args)
    _, codes2, scales2 = run_quantizing_rows(kernel, *args, write_out=False)
    assert torch.equal(codes, codes2) and torch.equal(scales, scales2)


def test_chains_the_chunked_kernel_does_not_take_are_refused():
    two_norms = lambda x: F.layer_norm(F.layer_norm(x, (N,)) * 2, (N,))  # noqa: E731
    nodes, _ = traced(two_norms, torch.randn(2, 3, N))
    with pytest.raises(Unsupported, match="2 norms"):
        emit_quantizing_rows(nodes)
    nodes, _ = traced(lambda x, y: x * y + 1, torch.randn(2, N), torch.randn(2, N))
    with pytest.raises(Unsupported, match="0 norms"):
        emit_quantizing_rows(nodes)


def test_chunking_pads_rows_least():
    assert chunking(5120)[:2] == (2, 1024) and chunking(1536)[:2] == (4, 512) and chunking(40)[1] == 64


def lowered_graph(**options):
    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    # opted in, so lower_regions also emits each norm prologue's chunked variant
    gm, ctx = context_for(gm, ex, activation="int8", codegen=True, passes={"quantize_prologues": True}, **options)
    for p in (find_blocks, quantize_linears, fuse_regions, lower_regions):
        p(gm, ctx)
    return (gm, ctx, *apply_pass(quantize_prologues, gm, ctx))


def test_norm_prologues_feed_their_gemms_codes():
    gm, ctx, before, after = lowered_graph()
    # a Wan block's three norm prologues (q/k/v, cross-attention q, FFN); its two norm-free ones stay
    assert after[OP] == 6
    assert after["sixbit.region_kernel.default"] == before["sixbit.region_kernel.default"] - 6
    assert after["operator.getitem"] == before["operator.getitem"] + 18
    for op in ("sixbit.quantized_linear.default", "sixbit.linear_epilogue.default"):
        assert after[op] == before[op]
    fed = 0
    for call in (n for n in gm.graph.nodes if n.target is REGION_KERNEL_INT8):
        out, codes, scales = sorted(call.users, key=lambda g: g.args[1])
        assert all(g.target is operator.getitem for g in (out, codes, scales))
        gemms = list(out.users)
        assert all(g.target in QUANTIZED_GEMMS and g.args[0] is out for g in gemms)
        assert all(g.kwargs["x_codes"] is codes and g.kwargs["x_scales"] is scales for g in gemms)
        assert call.args[3] == [g.args[6] for g in gemms]  # the GEMMs' own slots
        fed += len(gemms)
    assert fed == 2 * (3 + 1 + 1)  # q, k, v; cross-attention q; FFN up
    # the chunked kernels are listed (and dumped) with their regions': one per distinct chain
    chunked = [k for k in ctx.kernels if k.name.startswith("prologue_int8_")]
    assert len(chunked) == 2 and all(any(k.name in r.kernels for r in ctx.regions) for k in chunked)


def test_rotated_activations_leave_the_prologues_with_a_note():
    gm, ctx, before, after = lowered_graph(hadamard=True)
    assert OP not in after and after == before
    notes = [n for n in ctx.notes if n.startswith("quantize_prologues")]
    assert len(notes) == 6 and all("hadamard" in n for n in notes)


def compiled_outputs(options, calls=2):
    torch._dynamo.reset()
    model = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options=options)
    with torch.no_grad():
        return [model(**wan_inputs())[0] for _ in range(calls)]  # DMPQ decides from call 1's Γ


@pytest.mark.parametrize("block_cache", [False, True], ids=["flat", "block_regions"])
@pytest.mark.parametrize("activation", ["int8", "dynamic", "nvfp4"])
def test_outputs_match_the_gemms_quantizing_themselves(activation, block_cache, monkeypatch):
    """Every GEMM runs the kernels (the interpreter, as on CUDA) and the INT8 ones take the
    prologue's codes. The chunked kernel sums a norm's statistics chunk by chunk, so its output
    may differ from the whole-row kernel's in the last bit: the outputs agree to fp32 rounding,
    and exactly where no INT8 GEMM reads codes (NVFP4)."""
    import sixbit_compiler.ops as ops

    monkeypatch.setattr(ops, "linear_kernels_run_on", ops.generated_kernels_run_on)
    base = {"activation": activation, "codegen": True, "block_cache": block_cache}
    on = compiled_outputs({**base, "passes": {"quantize_prologues": True}})
    off = compiled_outputs(base)  # opt-in: off by default
    for a, b in zip(on, off):
        if activation == "nvfp4":
            assert torch.equal(a, b)
        else:
            assert ((a - b).norm() / b.norm()).item() < 1e-5


def test_the_pass_is_opt_in_and_listed_in_the_dump(tmp_path):
    for name, passes in (("on", {"quantize_prologues": True}), ("default", {}), ("off", {"quantize_prologues": False})):
        compiled_outputs({"activation": "int8", "codegen": True, "passes": passes, "dump_dir": str(tmp_path / name)}, 1)
    (on,), (default,), (off,) = ((tmp_path / n).iterdir() for n in ("on", "default", "off"))
    assert "`quantize_prologues` | ran" in (on / "index.md").read_text()
    assert any(p.name.startswith("prologue_int8_") for p in (on / "kernels").iterdir())
    assert "`quantize_prologues` | off (opt-in: passes={'quantize_prologues': True})" in (default / "index.md").read_text()
    assert not any(p.name.startswith("prologue_int8_") for p in (default / "kernels").iterdir())
    assert "`quantize_prologues` | disabled" in (off / "index.md").read_text()
