"""quantize_prologues (with codegen): a row prologue writes its GEMMs' per-token INT8 operand."""

import operator

import pytest
import torch

from conftest import apply_pass, capture, context_for
from models import tiny_wan, wan_inputs
from sixbit_compiler.codegen.pointwise import run_pointwise, run_row_kernel_int8
from sixbit_compiler.formats import quantize_int8
from sixbit_compiler.ops import QUANTIZED_GEMMS, REGION_KERNEL_INT8
from sixbit_compiler.passes import find_blocks, fuse_regions, lower_regions, quantize_linears, quantize_prologues
from test_codegen_pointwise import DEV, PROLOGUES, N, lowered

F = torch.nn.functional
INT8_OP = "sixbit.region_kernel_int8.default"


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SIXBIT_CACHE_DIR", str(tmp_path / "codegen"))


def same(a, b):
    """Bitwise-equal values with NaN == NaN."""
    return a.shape == b.shape and torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("chain", ["wan_adaln", "layer_norm_affine", "rms_norm"])
def test_the_row_kernel_codes_are_the_spec_of_its_output(chain, dtype):
    """Codes and scales equal formats.quantize_int8 of the stored output, on rows that are zero,
    NaN, overflow to Inf in the output dtype, or hold an outlier; the output is unchanged."""
    fn = PROLOGUES[chain]

    def args(rows, gen):
        g = torch.Generator().manual_seed(gen)
        x = (torch.randn(rows, N, generator=g) * 4 + 1).to(dtype).view(2, rows // 2, N)
        w, b = torch.randn(N, generator=g).to(dtype), torch.randn(N, generator=g).to(dtype)
        return [x, w, b, torch.randn(1, 1, N, generator=g), torch.randn(1, 1, N, generator=g)]

    kernel, names = lowered(fn, *args(4, 0))
    x, w, b, scale, shift = args(34, 1)  # fresh inputs
    x[0, 0] = 0  # a constant row: the norm gives 0 (or the shift)
    x[0, 1, 3] = float("nan")  # a NaN row: NaN scale, zero codes
    scale[0, 0, 7] = 3e38  # x * (1 + scale) overflows to ±Inf in some rows: Inf saturates first
    shift[0, 0, 11] = 500.0  # an outlier channel
    by_name = dict(zip(names, (x, w, b, scale, shift)))
    tensors = [by_name[n].to(DEV) for n in kernel.inputs]
    out, codes, scales = run_row_kernel_int8(kernel, *tensors)
    assert same(out, run_pointwise(kernel, *tensors))
    ref_codes, ref_scales = quantize_int8(out)
    assert torch.equal(codes, ref_codes) and same(scales, ref_scales)
    assert scales.isnan()[0, 1].all() and (codes[0, 1] == 0).all()
    if chain == "wan_adaln" and dtype == torch.bfloat16:
        assert out.isinf().any()  # the saturating case was exercised
    assert (codes.abs() == 127).any(dim=-1)[~scales.isnan().squeeze(-1) & (scales.squeeze(-1) > 0)].all()


def test_a_flat_kernel_has_no_codes():
    kernel, names = lowered(lambda x, y: x * y + 1, torch.randn(2, 8), torch.randn(2, 8))
    with pytest.raises(ValueError, match="not a row kernel"):
        run_row_kernel_int8(kernel, torch.randn(2, 8).to(DEV), torch.randn(2, 8).to(DEV))


def lowered_graph(**options):
    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    gm, ctx = context_for(gm, ex, activation="int8", codegen=True, **options)
    for p in (find_blocks, quantize_linears, fuse_regions, lower_regions):
        p(gm, ctx)
    return (gm, ctx, *apply_pass(quantize_prologues, gm, ctx))


def test_norm_prologues_feed_their_gemms_codes():
    gm, ctx, before, after = lowered_graph()
    # a Wan block's three norm prologues (q/k/v, cross-attention q, FFN); its two norm-free ones stay
    assert after.get(INT8_OP, 0) == 6
    assert after["sixbit.region_kernel.default"] == before["sixbit.region_kernel.default"] - 6
    assert after["operator.getitem"] == before["operator.getitem"] + 18
    for op in ("sixbit.quantized_linear.default", "sixbit.linear_epilogue.default"):
        assert after[op] == before[op]
    calls = [n for n in gm.graph.nodes if n.target is REGION_KERNEL_INT8]
    fed = 0
    for call in calls:
        out, codes, scales = sorted(call.users, key=lambda g: g.args[1])
        assert all(g.target is operator.getitem for g in (out, codes, scales))
        gemms = list(out.users)
        assert all(g.target in QUANTIZED_GEMMS and g.args[0] is out for g in gemms)
        assert all(g.kwargs["x_codes"] is codes and g.kwargs["x_scales"] is scales for g in gemms)
        assert call.args[3] == [g.args[6] for g in gemms]  # the GEMMs' own slots
        assert all(len(g.args) in (9, 11) for g in gemms)  # positional arguments as before
        fed += len(gemms)
    assert fed == 2 * (3 + 1 + 1)  # q, k, v; cross-attention q; FFN up


def test_rotated_activations_leave_the_prologues_with_a_note():
    gm, ctx, before, after = lowered_graph(hadamard=True)
    assert INT8_OP not in after and after == before
    notes = [n for n in ctx.notes if n.startswith("quantize_prologues")]
    assert len(notes) == 6 and all("hadamard" in n for n in notes)


def compiled_outputs(options, calls=2):
    torch._dynamo.reset()
    model = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options=options)
    with torch.no_grad():
        return [model(**wan_inputs())[0] for _ in range(calls)]  # DMPQ decides from call 1's Γ


@pytest.mark.parametrize("block_cache", [False, True], ids=["flat", "block_regions"])
@pytest.mark.parametrize("activation", ["int8", "dynamic", "nvfp4"])
def test_outputs_are_bit_identical_to_the_gemms_quantizing_themselves(activation, block_cache):
    """The fused GEMMs take the prologue's codes instead of quantizing x: the same codes, so the
    same outputs to the bit (block regions rebase the slot lists; NVFP4 calls never read codes)."""
    base = {"activation": activation, "codegen": True, "block_cache": block_cache}
    on = compiled_outputs(base)
    off = compiled_outputs({**base, "passes": {"quantize_prologues": False}})
    for a, b in zip(on, off):
        assert torch.equal(a, b)


def test_the_pass_is_switched_off_by_name_and_listed_in_the_dump(tmp_path):
    for name, passes in (("on", {}), ("off", {"quantize_prologues": False})):
        compiled_outputs({"activation": "int8", "codegen": True, "passes": passes, "dump_dir": str(tmp_path / name)}, 1)
    (on,), (off,) = (tmp_path / "on").iterdir(), (tmp_path / "off").iterdir()
    assert "`quantize_prologues` | ran" in (on / "index.md").read_text()
    assert "`quantize_prologues` | disabled" in (off / "index.md").read_text()
