"""sixbit::quantized_linear: the custom op and its reference numerics."""

import pytest
import torch

from conftest import rel_err
from sixbit_compiler.formats import (
    Precision,
    dequantize_fp8_rows,
    dequantize_int8,
    dequantize_nvfp4,
    hadamard_rotate,
    nvfp4_to_fp8,
    nvfp4_to_int8,
    quantize_fp8_rows,
    quantize_int8,
    quantize_nvfp4,
)
from sixbit_compiler.ops import QUANTIZED_LINEAR
from sixbit_compiler.weight_store import quantize_weight


def make(m=24, k=64, n=40, seed=0, dtype=torch.float32, hadamard=False, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b, quantize_weight(w, hadamard)


def run(x, qw, b, precision, hadamard=False):
    slots = torch.tensor([int(precision)], dtype=torch.int8)
    return QUANTIZED_LINEAR(x, qw.packed, qw.block_scales_bits, qw.tensor_scale, b, slots, 0, qw.in_features, hadamard)


def emulate(x, qw, b, precision, hadamard=False):
    """An independent fp64 emulation built from the format functions."""
    x2 = x.reshape(-1, x.shape[-1]).double()
    if hadamard:
        x2 = hadamard_rotate(x2.float()).double()
    kp = qw.packed.shape[1] * 2
    x2 = torch.nn.functional.pad(x2, (0, kp - x2.shape[1]))
    w = dequantize_nvfp4(qw.packed, qw.block_scales, qw.tensor_scale, dtype=torch.float64)
    if precision == Precision.BF16:
        xa = x2
    elif precision == Precision.INT8:
        xa = dequantize_int8(*quantize_int8(x2.float())).double()
        w = dequantize_int8(*nvfp4_to_int8(qw.packed, qw.block_scales, qw.tensor_scale)).double()
    elif precision == Precision.FP8:
        xa = dequantize_fp8_rows(*quantize_fp8_rows(x2.float())).double()
        w = dequantize_fp8_rows(*nvfp4_to_fp8(qw.packed, qw.block_scales, qw.tensor_scale)).double()
    else:
        xa = dequantize_nvfp4(*quantize_nvfp4(x2.float()), dtype=torch.float64)
    out = xa @ w.t() + (b.double() if b is not None else 0)
    return out.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("precision", list(Precision))
@pytest.mark.parametrize("seed", [0, 1])
def test_op_matches_fp64_emulation(precision, hadamard, seed):
    x, w, b, qw = make(seed=seed, hadamard=hadamard)
    got = run(x, qw, b, precision, hadamard)
    assert got.shape == (2, 24, 40) and got.dtype == x.dtype
    assert rel_err(got, emulate(x, qw, b, precision, hadamard)) < 1e-5


# Stated error bounds against the unquantized fp64 linear, on Gaussian data.
BOUNDS = {Precision.BF16: 0.12, Precision.INT8: 0.12, Precision.NVFP4: 0.16, Precision.FP8: 0.13}


@pytest.mark.parametrize("hadamard", [False, True])
@pytest.mark.parametrize("precision", list(Precision))
def test_op_error_against_unquantized_linear(precision, hadamard):
    x, w, b, qw = make(k=256, n=96, seed=7, hadamard=hadamard)
    ref = x.double() @ w.double().t() + b.double()
    err = rel_err(run(x, qw, b, precision, hadamard), ref)
    assert 0 < err < BOUNDS[precision]


@pytest.mark.parametrize("precision", list(Precision))
def test_int8_and_nvfp4_differ_from_bf16(precision):
    # The slot really selects the arithmetic: different precisions give different results.
    x, w, b, qw = make(seed=3)
    outs = {p: run(x, qw, b, p) for p in Precision}
    others = [p for p in Precision if p != precision]
    assert all(not torch.equal(outs[precision], outs[o]) for o in others)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k", [40, 200])
@pytest.mark.parametrize("precision", list(Precision))
def test_op_odd_k_and_dtypes(precision, k, dtype):
    x, w, b, qw = make(m=5, k=k, n=24, dtype=dtype, hadamard=(k == 200))
    got = run(x, qw, b, precision, hadamard=(k == 200))
    assert got.dtype == dtype
    tol = 1e-2 if dtype != torch.float32 else 1e-5
    assert rel_err(got, emulate(x.float(), qw, b.float(), precision, hadamard=(k == 200))) < tol


@pytest.mark.parametrize("precision", list(Precision))
def test_op_nan_row_stays_in_its_row_and_zeros_give_bias(precision):
    x, w, b, qw = make(seed=5)
    x[0, 3, 10] = float("nan")
    x[1, 7] = 0
    got = run(x, qw, b, precision)
    assert got[0, 3].isnan().all()
    others = torch.ones(got.shape[:2], dtype=torch.bool)
    others[0, 3] = False
    # Per-tensor scales ignore NaN, so no other row is affected, at any precision.
    assert got[others].isfinite().all()
    torch.testing.assert_close(got[1, 7], b)


def test_op_non_contiguous_input():
    x, w, b, qw = make(seed=2)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)
    assert not xt.is_contiguous()
    for p in Precision:
        torch.testing.assert_close(run(xt, qw, b, p), run(x.contiguous(), qw, b, p))


def test_op_rejects_wrong_in_features():
    x, w, b, qw = make()
    with pytest.raises(ValueError, match="features"):
        run(x[..., :32], qw, b, Precision.INT8)


def test_opcheck():
    x, w, b, qw = make(m=20, k=48, n=24)
    slots = torch.tensor([int(Precision.INT8), int(Precision.NVFP4)], dtype=torch.int8)
    for slot in (0, 1):
        args = (x, qw.packed, qw.block_scales_bits, qw.tensor_scale, b, slots, slot, 48, False)
        torch.library.opcheck(torch.ops.sixbit.quantized_linear.default, args)
    torch.library.opcheck(
        torch.ops.sixbit.quantized_linear.default,
        (x, qw.packed, qw.block_scales_bits, qw.tensor_scale, None, slots, 0, 48, False),
    )


def test_fallbacks_are_logged_once_per_reason(caplog):
    from sixbit_compiler.kernels import log_fallback_once

    with caplog.at_level("WARNING", logger="sixbit"):
        for _ in range(3):
            log_fallback_once("quantized_attention runs exact SDPA", "a test reason 1")
        log_fallback_once("quantized_attention runs exact SDPA", "a test reason 2")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["sixbit: quantized_attention runs exact SDPA for a test reason 1",
                     "sixbit: quantized_attention runs exact SDPA for a test reason 2"]
