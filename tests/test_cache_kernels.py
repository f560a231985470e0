"""Block-cache kernels (kernels/cache.py) against the reference numerics, under TRITON_INTERPRET on CPU."""

import pytest
import torch

import sixbit_compiler.ops  # noqa: F401  (registers the sixbit ops)
from sixbit_compiler.formats import dequantize_int8, quantize_int8
import triton
import triton.language as tl

from sixbit_compiler.kernels.cache import _to_act, apply_delta, delta_refresh, residual_abs_sums


@triton.jit
def _round_kernel(v_ptr, ref_ptr, out_ptr, N: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, _to_act(tl.load(v_ptr + i), tl.load(ref_ptr + i)))


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on CPU


def pair(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    y = (x.float() + 0.3 * torch.randn(shape, generator=g)).to(dtype)
    return x.to(DEV), y.to(DEV)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 37, 48), (5, 100), (1, 3, 1)], ids=str)
def test_delta_refresh_matches_the_reference(dtype, shape):
    x, y = pair(shape, dtype)
    x[..., 0, :] = y[..., 0, :]  # a row with Δ = 0
    codes, scales, sums = delta_refresh(x, y)
    d = y - x  # the activation dtype, as the runtime's reference path
    ref_codes, ref_scales = quantize_int8(d)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    torch.testing.assert_close(sums[:2], torch.stack([d.float().abs().sum(), x.float().abs().sum()]), rtol=1e-5, atol=1e-5)
    assert sums[2] == 0 and sums[3] == 0  # no previous entry
    # with the previous entry: the change against Δ_prev as the reference loads it
    x2, y2 = pair(shape, dtype, seed=1)
    _, _, sums2 = delta_refresh(x2, y2, (codes, scales))
    p = dequantize_int8(codes, scales, dtype).float()
    d2 = (y2 - x2).float()
    torch.testing.assert_close(sums2[2:], torch.stack([(d2 - p).abs().sum(), p.abs().sum()]), rtol=1e-5, atol=1e-5)


def test_apply_delta_is_x_plus_the_dequantized_residual():
    x, y = pair((3, 33, 40), torch.bfloat16)
    codes, scales = quantize_int8(y - x)
    out = apply_delta(x, codes, scales)
    assert out.dtype == x.dtype and torch.equal(out, x + dequantize_int8(codes, scales, x.dtype))


def test_nasty_rows_nan_inf_and_outliers():
    x, y = pair((4, 64), torch.bfloat16)
    y[1, 5] = float("nan")
    y[2, 7] = float("inf")
    y[3, 9] = 1e30
    codes, scales, sums = delta_refresh(x, y)
    ref_codes, ref_scales = quantize_int8(y - x)
    bad_rows = (codes != ref_codes).any(-1).nonzero().flatten().tolist()
    assert not bad_rows, f"codes differ in rows {bad_rows}: {scales.flatten().tolist()} vs {ref_scales.flatten().tolist()}"
    torch.testing.assert_close(scales, ref_scales, equal_nan=True)
    assert torch.isnan(scales[1]).item() and torch.isfinite(scales[2]).item()  # NaN poisons its row only; Inf saturates
    out = apply_delta(x, codes, scales)
    assert torch.isnan(out[1]).all() and torch.isfinite(out[0]).all()


def test_residual_abs_sums_and_its_op():
    x, y = pair((2, 21, 32), torch.bfloat16)
    expected = torch.stack([(y - x).float().abs().sum(), x.float().abs().sum()])
    torch.testing.assert_close(residual_abs_sums(y, x), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.ops.sixbit.residual_abs_sums(y, x), expected, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.sixbit.residual_abs_sums.default, (y, x))


def test_bf16_rounding_keeps_every_nan_a_nan():
    """The GPU's canonical NaN is 0x7FFFFFFF: rounding its bits to bf16 must not carry into the sign."""
    k = _round_kernel
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x3F808000, 0x3F818000, 0x7F7FFFFF, 0x00000001, 0], dtype=torch.int32)
    v = bits.view(torch.float32).to(DEV)
    out = torch.empty_like(v)
    k[(1,)](v, torch.zeros(8, dtype=torch.bfloat16, device=DEV), out, N=8)
    expected = v.cpu().to(torch.bfloat16).float()
    assert torch.isnan(out[:3]).all()
    torch.testing.assert_close(out.cpu()[3:], expected[3:], rtol=0, atol=0)
