"""The numerics spec (sixbit_compiler.formats) against brute-force references and nasty inputs."""


import pytest
import torch

from sixbit_compiler.formats import (
    E2M1_VALUES,
    dequantize_int8,
    dequantize_nvfp4,
    hadamard_matrix,
    hadamard_rotate,
    nvfp4_block_values,
    nvfp4_to_int8,
    quantize_int8,
    quantize_nvfp4,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def brute_force_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """Nearest e2m1 value by exhaustive search; ties go to the even magnitude index."""
    grid = torch.tensor(E2M1_VALUES, dtype=torch.float64)
    mag = scaled.double().abs().clamp(max=6.0)
    dist = (mag.unsqueeze(-1) - grid).abs()
    best = dist.min(dim=-1, keepdim=True).values
    tied = dist <= best + 1e-12
    # among tied candidates, prefer an even index (mantissa bit 0)
    idx = torch.arange(8)
    score = tied.double() * (2 + (idx % 2 == 0).double()) - idx.double() * 1e-6
    chosen = score.argmax(dim=-1)
    return torch.where(scaled < 0, -grid[chosen], grid[chosen])


def reference_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """Straightforward NVFP4 fake-quantization of a finite tensor (K multiple of 16).

    The spec multiplies by the fp32 reciprocal of each block's scale (as kernels do), so that
    product is formed in fp32 here too; everything else is float64 and exhaustive search.
    """
    xf = x.float()
    ts = xf.abs().max() / (448 * 6)
    blocks = xf.reshape(*xf.shape[:-1], -1, 16)
    bs = (blocks.abs().amax(-1) / 6 / ts).to(torch.float8_e4m3fn).float()
    denom = (bs * ts).unsqueeze(-1)
    inv = 1.0 / torch.where(denom > 0, denom, torch.ones_like(denom))
    q = brute_force_e2m1(torch.where(denom > 0, blocks * inv, torch.zeros_like(blocks)))
    return (q * denom.double()).reshape(xf.shape)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_matches_brute_force(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(7, 64, generator=g) * torch.rand(7, 1, generator=g) * 10).to(dtype)
    packed, scales, ts = quantize_nvfp4(x)
    assert packed.dtype == torch.uint8 and packed.shape == (7, 32)
    assert scales.dtype == torch.float8_e4m3fn and scales.shape == (7, 4)
    assert ts.dtype == torch.float32 and ts.dim() == 0
    torch.testing.assert_close(dequantize_nvfp4(packed, scales, ts, dtype=torch.float64), reference_nvfp4(x), rtol=1e-6, atol=0)


def test_nvfp4_ties_round_to_even_and_saturate():
    # Block scale 1 and tensor scale 1 need amax = 6 * 448 in some block; put it in block 0.
    ties = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0, -0.25, -0.75, -5.0, 0.0, 6.0, 0.5, 1.5, 3.0])
    anchor = torch.zeros(16)
    anchor[0] = 6 * 448
    x = torch.stack([anchor, ties])
    packed, scales, ts = quantize_nvfp4(x)
    assert float(ts) == 1.0 and float(scales[1, 0].float()) == 1.0
    got = dequantize_nvfp4(packed, scales, ts)[1]
    want = torch.tensor([0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.0, -1.0, -4.0, 0.0, 6.0, 0.5, 1.5, 3.0])
    torch.testing.assert_close(got, want)


def test_nvfp4_saturates_when_the_block_scale_rounds_down():
    # amax 6.2 -> block scale 6.2/6 = 1.033 rounds to e4m3 1.0, so 6.2 / 1.0 > 6 saturates to 6.
    anchor = torch.zeros(16)
    anchor[0] = 6 * 448
    block = torch.zeros(16)
    block[0], block[1] = 6.2, -6.2
    packed, scales, ts = quantize_nvfp4(torch.stack([anchor, block]))
    assert float(scales[1, 0].float()) == 1.0
    got = dequantize_nvfp4(packed, scales, ts)[1]
    assert float(got[0]) == 6.0 and float(got[1]) == -6.0


def _block_errors(x: torch.Tensor, scale_search: bool) -> torch.Tensor:
    out = dequantize_nvfp4(*quantize_nvfp4(x, scale_search=scale_search), k=x.shape[-1], dtype=torch.float64)
    return (out - x.double()).square().reshape(*x.shape[:-1], -1, 16).sum(-1)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_scale_search_never_loses_a_block_and_gains_overall(seed, dtype):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(64, 256, generator=g) * torch.rand(64, 1, generator=g) * 4).to(dtype)
    searched, amax = _block_errors(x, True), _block_errors(x, False)
    assert (searched <= amax).all()
    assert (searched < amax).float().mean() > 0.2  # the search changed many blocks ...
    assert searched.sum() < amax.sum() * 0.85  # ... and lowered the total error (~1.5 dB here)


def test_nvfp4_scale_search_stays_within_its_steps_and_keeps_the_format():
    from sixbit_compiler.formats.nvfp4 import SCALE_SEARCH_STEPS

    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(5))
    packed, scales, ts = quantize_nvfp4(x, scale_search=True)
    packed0, scales0, ts0 = quantize_nvfp4(x)
    assert float(ts) == float(ts0) and packed.shape == packed0.shape and scales.dtype == torch.float8_e4m3fn
    steps = scales.view(torch.uint8).long() - scales0.view(torch.uint8).long()
    assert set(steps.unique().tolist()) <= set(SCALE_SEARCH_STEPS) and len(steps.unique()) > 2
    # given the chosen scales, each code is the nearest e2m1 value (ties to even), as in the
    # amax rule: only the scale is searched
    denom = (scales.float() * ts).unsqueeze(-1)
    scaled = x.reshape(32, -1, 16) * (1.0 / denom)
    values = nvfp4_block_values(packed, scales).reshape(32, -1, 16)
    torch.testing.assert_close(brute_force_e2m1(scaled).float() * scales.float().unsqueeze(-1), values)


def test_nvfp4_scale_search_nasty_blocks():
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(1))
    x[0, :16] = 0  # zero block
    x[1, 20] = float("nan")  # NaN block
    x[2, 40] = float("inf")  # saturates like the amax rule
    x[3, 48:] = 1e-6  # a block the amax rule flushes to zero
    out = dequantize_nvfp4(*quantize_nvfp4(x, scale_search=True))
    assert (out[0, :16] == 0).all()
    assert out[1, 16:32].isnan().all() and out[1, :16].isfinite().all() and out[1, 32:].isfinite().all()
    assert out[2].isfinite().all() and float(out[2, 40]) == pytest.approx(torch.finfo(torch.float32).max, rel=0.1)
    assert (out[3, 48:] - x[3, 48:]).abs().max() <= 1e-6  # never worse than flushing
    big = torch.zeros(1, 16)
    big[0, 0] = 6 * 448  # the largest block: scale 448 is clamped, never NaN's bit pattern
    _, scales, _ = quantize_nvfp4(big, scale_search=True)
    assert scales.float().isfinite().all()


def test_nvfp4_packing_low_nibble_first():
    anchor = torch.zeros(16)
    anchor[0] = 6 * 448
    x = torch.zeros(2, 16)
    x[0] = anchor
    x[1, 0], x[1, 1] = 0.5, -6.0  # codes 1 and 8|7 = 15
    packed, _, _ = quantize_nvfp4(x)
    assert int(packed[1, 0]) == (15 << 4) | 1


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_all_zero_and_zero_blocks(dtype):
    packed, scales, ts = quantize_nvfp4(torch.zeros(3, 32, dtype=dtype))
    out = dequantize_nvfp4(packed, scales, ts)
    assert not out.isnan().any() and (out == 0).all() and float(ts) == 0.0
    x = torch.randn(2, 48)
    x[:, 16:32] = 0
    out = dequantize_nvfp4(*quantize_nvfp4(x))
    assert (out[:, 16:32] == 0).all() and not out.isnan().any()


@pytest.mark.parametrize("seed", range(3))
def test_nvfp4_nan_poisons_only_its_block(seed):
    x = torch.randn(4, 48, generator=torch.Generator().manual_seed(seed))
    x[1, 20] = float("nan")
    out = dequantize_nvfp4(*quantize_nvfp4(x))
    assert out[1, 16:32].isnan().all()
    mask = torch.ones_like(out, dtype=torch.bool)
    mask[1, 16:32] = False
    assert out[mask].isfinite().all()
    # the NaN did not change the tensor scale: other blocks match the quantization of the
    # same tensor with the NaN replaced by 0 (NaN counts as 0 in the tensor amax)
    clean = x.clone()
    clean[1, 20] = 0
    torch.testing.assert_close(out[mask], dequantize_nvfp4(*quantize_nvfp4(clean))[mask])


@pytest.mark.parametrize("dtype", DTYPES)
def test_nvfp4_inf_saturates_to_dtype_max(dtype):
    x = torch.randn(2, 16).to(dtype)
    x[0, 3] = float("inf")
    x[1, 5] = float("-inf")
    out = dequantize_nvfp4(*quantize_nvfp4(x))
    assert out.isfinite().all()
    big = torch.finfo(dtype).max
    assert float(out[0, 3]) == pytest.approx(big, rel=0.1)
    assert float(out[1, 5]) == pytest.approx(-big, rel=0.1)


@pytest.mark.parametrize("scale", [1e-30, 1e-6, 1.0, 1e6, 1e30])
def test_nvfp4_tiny_and_huge_values_keep_relative_accuracy(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 64, generator=g, dtype=torch.float64).float() * scale
    out = dequantize_nvfp4(*quantize_nvfp4(x))
    assert out.isfinite().all()
    assert float((out.double() - x.double()).norm() / x.double().norm()) < 0.15


def test_nvfp4_block_scale_underflow_flushes_small_blocks():
    x = torch.zeros(1, 32)
    x[0, 0] = 1.0
    x[0, 16:] = 1e-6  # far below 2**-9 of the tensor amax relative to the e4m3 range
    out = dequantize_nvfp4(*quantize_nvfp4(x))
    assert out[0, 0] == 1.0 and (out[0, 16:] == 0).all()


@pytest.mark.parametrize("k", [1, 15, 17, 33, 100])
def test_nvfp4_pads_k(k):
    x = torch.randn(3, k)
    packed, scales, ts = quantize_nvfp4(x)
    kp = -(-k // 16) * 16
    assert packed.shape == (3, kp // 2) and scales.shape == (3, kp // 16)
    full = dequantize_nvfp4(packed, scales, ts)
    assert (full[:, k:] == 0).all()
    assert dequantize_nvfp4(packed, scales, ts, k=k).shape == (3, k)


def test_nvfp4_non_contiguous_input_equals_contiguous():
    base = torch.randn(64, 10)
    x = base.t()  # [10, 64], non-contiguous
    assert not x.is_contiguous()
    for a, b in zip(quantize_nvfp4(x), quantize_nvfp4(x.contiguous())):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_nvfp4_block_values_exact_in_bf16():
    packed, scales, _ = quantize_nvfp4(torch.randn(16, 128) * 3)
    v = nvfp4_block_values(packed, scales)
    assert torch.equal(v, v.to(torch.bfloat16).float())


def test_nvfp4_output_dtype():
    packed, scales, ts = quantize_nvfp4(torch.randn(2, 32))
    for dtype in DTYPES:
        assert dequantize_nvfp4(packed, scales, ts, dtype=dtype).dtype == dtype


# ---- INT8 -------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_int8_per_token_matches_reference(dtype):
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(5, 3, 40, generator=g) * 4).to(dtype)
    codes, scale = quantize_int8(x)
    assert codes.dtype == torch.int8 and scale.shape == (5, 3, 1) and scale.dtype == torch.float32
    xf = x.double()
    ref_scale = xf.abs().amax(-1, keepdim=True) / 127
    ref_codes = torch.round(xf / ref_scale).clamp(-127, 127)
    torch.testing.assert_close(scale.double(), ref_scale, rtol=1e-6, atol=0)
    assert (codes.double() - ref_codes).abs().max() <= 1  # fp32 reciprocal vs fp64 division at .5 ties
    assert int(codes.abs().max()) == 127 and int(codes.min()) >= -127


def test_int8_per_channel_axis():
    w = torch.randn(6, 32)
    w[2] *= 100
    codes, scale = quantize_int8(w, axis=-1)
    assert scale.shape == (6, 1)
    torch.testing.assert_close(dequantize_int8(codes, scale), w, rtol=0, atol=float(scale.max()) / 2 + 1e-6)
    codes0, scale0 = quantize_int8(w, axis=0)
    assert scale0.shape == (1, 32)


def test_int8_edge_cases():
    x = torch.randn(4, 32)
    x[0] = 0
    x[1, 3] = float("nan")
    x[2, 7] = float("inf")
    codes, scale = quantize_int8(x)
    out = dequantize_int8(codes, scale)
    assert (out[0] == 0).all() and float(scale[0]) == 0
    assert out[1].isnan().all()
    assert out[2].isfinite().all() and float(out[2, 7]) == pytest.approx(torch.finfo(torch.float32).max, rel=1e-2)
    assert out[3].isfinite().all()


def test_int8_from_nvfp4_weights_is_close_to_nvfp4():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0))
    packed, scales, ts = quantize_nvfp4(w)
    codes, scale = nvfp4_to_int8(packed, scales, ts)
    w4 = dequantize_nvfp4(packed, scales, ts)
    err = (dequantize_int8(codes, scale) - w4).norm() / w4.norm()
    assert float(err) < 0.01


# ---- Hadamard ---------------------------------------------------------------------------

def test_hadamard_is_orthonormal_and_self_inverse():
    h = hadamard_matrix(128)
    torch.testing.assert_close(h @ h, torch.eye(128), atol=1e-5, rtol=0)
    x = torch.randn(3, 256)
    torch.testing.assert_close(hadamard_rotate(hadamard_rotate(x)), x, atol=1e-5, rtol=0)


def test_hadamard_preserves_products_and_pads():
    x, w = torch.randn(4, 200), torch.randn(6, 200)
    xr, wr = hadamard_rotate(x), hadamard_rotate(w)
    assert xr.shape == (4, 256)
    torch.testing.assert_close(xr @ wr.t(), x @ w.t(), atol=1e-4, rtol=1e-4)


def test_hadamard_spreads_outliers():
    x = torch.randn(64, 128)
    x[:, 5] = 200.0
    ratio = lambda t: float((t.abs().amax(-1) / t.abs().mean(-1)).mean())
    assert ratio(hadamard_rotate(x)) < ratio(x) / 4


@pytest.mark.parametrize("bad", [torch.int32, torch.float64])
def test_formats_reject_unsupported_dtypes(bad):
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        quantize_nvfp4(torch.zeros(2, 16, dtype=bad))


# ---- FP8 rows -----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_fp8_rows_roundtrip_and_edge_cases(dtype):
    from sixbit_compiler.formats import dequantize_fp8_rows, quantize_fp8_rows

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(6, 40, generator=g) * 3).to(dtype)
    x[1] = 0
    x[2, 4] = float("nan")
    x[3, 1] = float("inf")
    codes, scale = quantize_fp8_rows(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (6, 1)
    out = dequantize_fp8_rows(codes, scale)
    assert (out[1] == 0).all() and out[2].isnan().all() and out[3].isfinite().all()
    good = torch.tensor([0, 4, 5])
    err = (out[good] - x[good].float()).norm() / x[good].float().norm()
    assert 0 < float(err) < 0.04  # 3 mantissa bits
    # each row's largest magnitude maps to exactly +-448
    assert float(codes[0].float().abs().max()) == 448.0
