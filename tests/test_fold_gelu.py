"""GELU folded into the next quantized linear: the quantization kernel's GELU against PyTorch's,
the op's ``x_activation`` on every path, and the ``fold_gelu`` pass (what it adds and removes,
what it leaves alone and why)."""

import operator

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from conftest import apply_pass, capture, context_for, rel_err
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.formats import Precision, quantize_fp8_rows, quantize_int8
from sixbit_compiler.kernels._common import gelu_tanh, round_to
from sixbit_compiler.ops import QUANTIZED_LINEAR
from sixbit_compiler.passes import find_blocks, fold_gelu, quantize_linears
from sixbit_compiler.weight_store import quantize_weight

DEV = "cuda" if torch.cuda.is_available() else "cpu"
QL = "sixbit.quantized_linear.default"


def gelu(x):
    return F.gelu(x, approximate="tanh")


def _nasty(x):
    x[0, 3] = float("nan")
    x[1, 4] = float("inf")
    x[2, 5] = float("-inf")  # GELU(-inf) is NaN in PyTorch's formula, and in the kernel's
    x[3] = 0.0
    x[4, 7] = 1e4
    x[5, 9] = -1e4
    x[6] = -x[6].abs()  # no positive value: every GELU is looked at for the max
    x[7] *= 0.03  # largest value under 0.5: likewise
    return x


def _codes(q):
    """Codes as integers whose difference counts representable steps (an e4m3 code's bits, sign
    folded, are ordered like its values)."""
    if q.dtype == torch.float8_e4m3fn:
        bits = q.view(torch.uint8).int()
        return torch.where(bits >= 128, 128 - bits, bits)
    return q.int()


@pytest.mark.parametrize("k", [300, 3000])  # one chunk; two passes over chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_quantization_kernel_gelu_equals_pytorch_gelu_then_quantize(k, dtype, fp8):
    from sixbit_compiler.kernels.quantize import quantize_fp8_rows as kernel_fp8
    from sixbit_compiler.kernels.quantize import quantize_int8_rows

    kernel, spec = (kernel_fp8, quantize_fp8_rows) if fp8 else (quantize_int8_rows, quantize_int8)
    g = torch.Generator().manual_seed(k)
    x = _nasty((torch.randn(9, k, generator=g) * 3).to(dtype))
    q, scale, _, _ = kernel(x.to(DEV), gelu=True)
    want_q, want_scale = spec(gelu(x))
    diff = (_codes(q.cpu()) - _codes(want_q)).abs()
    if DEV == "cpu" and dtype == torch.bfloat16 and not fp8:  # the interpreter: PyTorch's values after the bf16 rounding
        assert diff.max() == 0
        torch.testing.assert_close(scale.cpu(), want_scale, equal_nan=True, rtol=0, atol=0)
    elif DEV == "cpu" and dtype == torch.bfloat16:
        # e4m3's subnormals resolve GELU's far negative tail (|GELU| ~ 1e-5), where PyTorch's
        # 0.5·x·(1 + tanh(y)) cancels and the kernel's x·sigmoid(2y) does not: a bf16 ulp there
        # can move a code by one subnormal step. Everywhere else the codes are equal.
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001
        tail = diff > 0
        assert (gelu(x).float().abs()[tail] < 1e-4).all()
        torch.testing.assert_close(scale.cpu(), want_scale, equal_nan=True, rtol=0, atol=0)
    elif DEV == "cpu":  # fp32: x·sigmoid(2y) and PyTorch's 0.5·x·(1 + tanh(y)) differ in the last bit
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.001
        torch.testing.assert_close(scale.cpu(), want_scale, equal_nan=True, rtol=1e-6, atol=0)
    else:  # the GPU's exp and division are approximate: a value may move by one code
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01
        torch.testing.assert_close(scale.cpu(), want_scale, equal_nan=True, rtol=1e-2, atol=0)
    assert torch.isnan(want_scale).sum() == 2  # the NaN row and the -inf one
    # the check can fail: codes of x itself are not the codes of GELU(x)
    assert not torch.equal(_codes(kernel(x.to(DEV))[0].cpu()), _codes(q.cpu()))


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, HW_CVT: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + i, mask=i < n, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, round_to(gelu_tanh(x), tl.bfloat16, HW_CVT), mask=i < n)


def test_kernel_gelu_is_monotone_above_one_half_for_every_bf16_value():
    """What the quantization kernel's shortcut rests on: over every bf16 x >= 0.5 its GELU,
    rounded to bf16, never decreases (then a row's max |GELU| is GELU of its max; checked on the
    GPU's own exp and division when a GPU runs the test)."""
    bits = torch.arange(0x3F00, 0x7F80, dtype=torch.int32).to(torch.int16)  # 0.5 .. the largest finite, ascending
    x = bits.view(torch.bfloat16).to(DEV)
    y = torch.empty(x.shape, dtype=torch.float32, device=DEV)
    _gelu_kernel[(triton.cdiv(x.numel(), 4096),)](x, y, x.numel(), BLOCK=4096, HW_CVT=DEV == "cuda")
    y = y.cpu()
    assert x[0].item() == 0.5 and torch.isfinite(y).all()
    assert (y[1:] >= y[:-1]).all()
    assert (y[:16] < 0.5).all() and y[0] > 0.17  # and above GELU's largest magnitude below zero


def _linear(precision, activation=None, x=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 24, 64, generator=g) * 2 if x is None else x
    w = torch.randn(40, 64, generator=g) / 8
    b = torch.randn(40, generator=g)
    qw = quantize_weight(w, False)
    slots = torch.tensor([int(precision)], dtype=torch.int8)
    args = (qw.packed, qw.block_scales_bits, qw.tensor_scale, b, slots, 0, 64, False)
    return x, args


@pytest.mark.parametrize("precision", list(Precision))
def test_op_applies_the_activation_on_every_path(precision):
    x, args = _linear(precision)
    got = QUANTIZED_LINEAR(x, *args, x_activation="gelu_tanh")
    assert torch.equal(got, QUANTIZED_LINEAR(gelu(x), *args))  # CPU: the reference path
    assert rel_err(got, QUANTIZED_LINEAR(x, *args)) > 0.1


@pytest.mark.parametrize("precision", [Precision.INT8, Precision.FP8])
def test_op_on_the_gpu_one_byte_kernels_matches_gelu_first(precision):
    if not torch.cuda.is_available():
        pytest.skip("the INT8 / FP8 kernels run on CUDA only (the kernel is checked above under the interpreter)")
    x, (packed, block_scales, tensor_scale, bias, slots, slot, k, hadamard) = _linear(precision)
    x = x.cuda().bfloat16()
    args = (packed.cuda(), block_scales.cuda(), tensor_scale.cuda(), bias.cuda().bfloat16(), slots, slot, k, hadamard)
    fused = QUANTIZED_LINEAR(x, *args, x_activation="gelu_tanh")
    assert rel_err(fused.float(), QUANTIZED_LINEAR(gelu(x), *args).float()) < 2e-3


def test_op_rejects_an_unknown_activation():
    x, args = _linear(Precision.INT8)
    with pytest.raises(ValueError, match="x_activation"):
        QUANTIZED_LINEAR(x, *args, x_activation="relu")
    codes, scales = quantize_int8(x)
    with pytest.raises(ValueError, match="x_codes cannot come with x_activation"):
        QUANTIZED_LINEAR(x, *args, x_codes=codes, x_scales=scales, x_activation="gelu_tanh")


def test_op_passes_opcheck():
    x, args = _linear(Precision.INT8)
    torch.library.opcheck(QUANTIZED_LINEAR, (x, *args), {"x_activation": "gelu_tanh"},
                          test_utils=("test_schema", "test_faketensor"))


# ---- the pass ----------------------------------------------------------------------------

def run_fold(model, inputs, edit=None):
    gm, ex = capture(model, **inputs)
    gm, ctx = context_for(gm, ex)
    find_blocks(gm, ctx)
    apply_pass(quantize_linears, gm, ctx)
    if edit:
        edit(gm)
    return (gm, ctx, *apply_pass(fold_gelu, gm, ctx))


@pytest.mark.parametrize("make, inputs", [(tiny_wan, wan_inputs), (tiny_cogvideox, cogvideox_inputs)])
def test_pass_folds_each_feed_forward_gelu(make, inputs):
    gm, ctx, before, after = run_fold(make(num_layers=2), inputs())
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(before) | set(after)}
    delta = {k: v for k, v in delta.items() if v}
    removed_dropouts = {"F.dropout": -2} if before.get("F.dropout") else {}
    assert delta == {"F.gelu": -2, **removed_dropouts}
    folded = [n for n in gm.graph.nodes if n.kwargs.get("x_activation")]
    assert len(folded) == 2 and all(n.kwargs["x_activation"] == "gelu_tanh" for n in folded)
    assert all(str(n.args[0].target) == QL for n in folded)  # the first FFN GEMM's output
    assert not ctx.notes


def test_pass_leaves_a_gelu_with_another_reader():
    def add_reader(gm):
        # the last block's feed-forward GELU (the text embedder's, first, reads no quantized linear)
        gelu_node = [n for n in gm.graph.nodes if n.target in (F.gelu, torch._C._nn.gelu)][-1]
        with gm.graph.inserting_after(gelu_node):
            gm.graph.call_function(operator.mul, (gelu_node, 2.0))

    gm, ctx, before, after = run_fold(tiny_wan(num_layers=2), wan_inputs(), edit=add_reader)
    assert after["F.gelu"] == before["F.gelu"] - 1  # the first block's folded, the second's kept
    assert len(ctx.notes) == 1 and "read by mul" in ctx.notes[0]


def test_backend_folded_equals_unfolded(tmp_path):
    """Tiny Wan through the backend, the pass on and off: the same output bit for bit on the CPU
    (its reference path applies F.gelu as the graph did), and the dump shows the GELU gone."""
    inputs = wan_inputs(frames=3, height=8, width=8)
    outs = {}
    for fold in (True, False):
        compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options={
            "lowering": "eager", "dump_dir": str(tmp_path / str(fold)), "passes": {"fold_gelu": fold}})
        with torch.no_grad():
            outs[fold] = compiled(**inputs)[0]
        torch._dynamo.reset()
    assert torch.equal(outs[True], outs[False])
    (graph,) = (tmp_path / "True").glob("*/*fold_gelu*")
    assert "x_activation" in graph.read_text() and "F.gelu" not in graph.read_text()
