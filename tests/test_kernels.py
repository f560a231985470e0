"""Triton kernels against the numerics spec, on fresh random and nasty inputs.

On CPU they run under TRITON_INTERPRET=1 (set in conftest) with large blocks; on a GPU the
same tests run compiled. Every comparison is exact where the spec is exact (quantization,
decoding) and to fp32 rounding where only the accumulation order differs (GEMMs).
"""

import pytest
import torch

pytest.importorskip("triton")

from conftest import rel_err  # noqa: E402
from sixbit_compiler.formats import (  # noqa: E402
    Precision,
    dequantize_nvfp4,
    nvfp4_block_values,
    nvfp4_to_fp8,
    nvfp4_to_int8,
    quantize_fp8_rows,
    quantize_int8,
    quantize_nvfp4,
)
from sixbit_compiler.kernels import dispatch  # noqa: E402
from sixbit_compiler.kernels.gemm import scaled_gemm  # noqa: E402
from sixbit_compiler.kernels import quantize as qk  # noqa: E402
from sixbit_compiler.kernels.quantize import quantize_int8_rows, quantize_nvfp4_values  # noqa: E402
from sixbit_compiler.kernels.weights import decode_nvfp4_to_fp8, decode_nvfp4_to_int8, decode_nvfp4_values  # noqa: E402
from sixbit_compiler.reference import quantized_linear_reference  # noqa: E402
from sixbit_compiler.weight_store import quantize_weight  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def nasty(m, k, dtype, seed):
    """Gaussian rows with an outlier channel, an all-zero row, a NaN, +Inf and -Inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4
    x[:, k // 3] *= 50  # outlier channel
    x[1] = 0
    x[2, 5] = float("nan")
    x[3, 0] = float("inf")
    x[4, k - 1] = float("-inf")
    return x.to(dtype).to(DEV)


def same(a, b):
    """Bitwise-equal values with NaN == NaN."""
    return a.shape == b.shape and torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0), b.nan_to_num(0))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k", [(37, 96), (5, 40), (70, 1000), (9, 1552), (6, 5120 + 48)])  # the last two: chunked rows
def test_int8_row_quant_matches_spec(m, k, dtype):
    x = nasty(m, k, dtype, seed=m + k)
    q, scale, amax, abssum = quantize_int8_rows(x)
    ref_q, ref_scale = quantize_int8(x)
    assert torch.equal(q, ref_q) and same(scale, ref_scale)
    xs = torch.nan_to_num(x.float(), nan=0.0, posinf=torch.finfo(dtype).max, neginf=-torch.finfo(dtype).max).abs()
    torch.testing.assert_close(amax, xs.amax(-1))
    torch.testing.assert_close(abssum, xs.sum(-1), rtol=1e-5, atol=0)


@pytest.mark.parametrize("tiling", qk.ROW_TILINGS)
@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("hints", qk.HINTS)
def test_every_autotuned_row_tiling_matches_spec(tiling, fp8, hints, monkeypatch):
    """Each tiling the autotuner may pick, with and without the L2 eviction hints, forced as
    the untuned choice, on a row that is not a multiple of any chunk (5 rows: programs of 2, 4
    and 8 rows with a ragged last one)."""
    monkeypatch.setattr(qk, "ROW_TILINGS", (tiling,))
    monkeypatch.setattr(qk, "HINTS", (hints,))
    monkeypatch.setattr(qk, "single_config", lambda: True)
    x = nasty(5, 2048 + 528, torch.bfloat16, seed=7)
    q, scale, _, _ = qk.quantize_fp8_rows(x) if fp8 else quantize_int8_rows(x)
    ref_q, ref_scale = quantize_fp8_rows(x) if fp8 else quantize_int8(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8)) and same(scale, ref_scale)


def fp8_bits(t):
    return t.view(torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k", [(37, 96), (8, 40), (9, 1552)])
def test_fp8_row_quant_matches_spec_bit_for_bit(m, k, dtype):
    x = nasty(m, k, dtype, seed=5 * m + k)
    # row 6 has scale 1 (max 448): e4m3 subnormals (quantum 2^-9) with ties to even, and -0
    x[6, :] = torch.tensor([2.0 ** -10, 3 * 2.0 ** -11, -(5 * 2.0 ** -11), 2.0 ** -8, -0.0] * k)[:k].to(dtype)
    x[6, 1] = 448.0
    q, scale, amax, _ = qk.quantize_fp8_rows(x)
    ref_q, ref_scale = quantize_fp8_rows(x)
    assert q.dtype == torch.float8_e4m3fn and torch.equal(fp8_bits(q), fp8_bits(ref_q)) and same(scale, ref_scale)


def test_fp8_codes_cover_every_e4m3_value():
    """Each of the 254 finite e4m3 values (times a row max of 448) encodes to its own bits."""
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(torch.float8_e4m3fn).float()
    values = values[values.isfinite()]
    x = torch.cat([values, torch.tensor([448.0])]).reshape(1, -1).to(DEV)
    q, scale, _, _ = qk.quantize_fp8_rows(x)
    assert float(scale) == 1.0 and torch.equal(fp8_bits(q).cpu()[0, :-1], values.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m, k", [(37, 96), (5, 16), (70, 1024), (9, 1552)])
def test_nvfp4_values_match_spec(m, k, dtype):
    x = nasty(m, k, dtype, seed=3 * m + k)
    values, ts, _, _ = quantize_nvfp4_values(x, torch.float32)
    packed, scales, ref_ts = quantize_nvfp4(x)
    assert torch.equal(ts, ref_ts)
    assert same(values * ts, dequantize_nvfp4(packed, scales, ref_ts))
    assert same(values, nvfp4_block_values(packed, scales))  # and the bf16 operand is exact
    bf16, _, _, _ = quantize_nvfp4_values(x, torch.bfloat16)
    assert same(bf16.float(), values)


def test_nvfp4_values_all_zero():
    values, ts, _, _ = quantize_nvfp4_values(torch.zeros(4, 32, device=DEV), torch.float32)
    assert float(ts) == 0 and (values == 0).all()


@pytest.mark.parametrize("n, k", [(40, 200), (1, 16), (33, 1024), (5, 1552), (3, 4112)])  # the last two: several tiles a row
@pytest.mark.parametrize("nasty_rows", [False, True])
def test_weight_decode_matches_spec(n, k, nasty_rows):
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g) * 0.05
    w[0, 3] = 4.0  # an outlier weight
    if nasty_rows:
        w[-1] = 0.0  # an all-zero channel
        w[0, k // 2] = float("nan")  # a NaN weight: its block scale is NaN, so is its channel's scale
    packed, scales, ts = quantize_nvfp4(w.to(DEV))
    q, s = decode_nvfp4_to_int8(packed, scales.view(torch.uint8), ts)
    ref_q, ref_s = nvfp4_to_int8(packed, scales, ts)
    assert torch.equal(q, ref_q) and same(s, ref_s)
    values = nvfp4_block_values(packed, scales)
    assert same(decode_nvfp4_values(packed, scales.view(torch.uint8), torch.float32), values)
    for dtype in (torch.bfloat16, torch.float16):  # exact in both: each element's 16 bits, stored in pairs
        assert same(decode_nvfp4_values(packed, scales.view(torch.uint8), dtype).float(), values)
    f, fs = decode_nvfp4_to_fp8(packed, scales.view(torch.uint8), ts)
    ref_f, ref_fs = nvfp4_to_fp8(packed, scales, ts)
    assert torch.equal(fp8_bits(f), fp8_bits(ref_f)) and same(fs, ref_fs)
    if nasty_rows:  # an infinite tensor scale: zero codes decode to NaN (0 · inf), the others saturate
        inf = torch.full_like(ts, float("inf"))
        q, s = decode_nvfp4_to_int8(packed, scales.view(torch.uint8), inf)
        ref_q, ref_s = nvfp4_to_int8(packed, scales, inf)
        assert torch.isnan(ref_s).any() and torch.equal(q, ref_q) and same(s, ref_s)


@pytest.mark.parametrize("m, n, k", [(70, 40, 208), (130, 72, 64), (1, 8, 16)])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_gemm_exact_accumulation(m, n, k, bias):
    g = torch.Generator().manual_seed(m + n + k)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEV)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
    sa, sb = torch.rand(m, 1, generator=g).to(DEV), torch.rand(n, 1, generator=g).to(DEV)
    bv = torch.randn(n, generator=g).to(DEV) if bias else None
    c = scaled_gemm(a, b, sa, sb, bv, torch.float32)
    ref = (a.double() @ b.double().t()) * sa.double() * sb.double().t() + (bv.double() if bias else 0)
    assert c.shape == (m, n) and rel_err(c, ref) < 1e-6


@pytest.mark.parametrize("persistent, tma, store", [
    (False, False, None), (True, False, None), (False, True, None), (True, True, None),
    (True, True, 1), (True, True, 2), (True, True, 4), (False, True, 2)])
def test_gemm_every_tile_written_once_each_tiling_and_feed(persistent, tma, store):
    """The template body launched directly with each tiling (one program per tile, or a few
    programs each walking every programs-th tile, an odd count so the last pass is ragged),
    each operand feed (pointer loads, or TMA descriptors that zero-fill past the edges) and each
    store (masked pointer stores, or ``store``: a TMA descriptor store of the whole tile or of
    its two halves, which the copy engine clips at M and N). C is a view into a larger buffer:
    nothing outside it may be written."""
    import triton

    from sixbit_compiler.kernels.gemm import _scaled_gemm_body, launch_with_scratch

    g = torch.Generator().manual_seed(7)
    m, n, k = 300, 200, 80  # 5 x 4 tiles of 64, ragged in every dimension (K: 64 + 16)
    a = torch.randint(-127, 128, (m, k), generator=g, dtype=torch.int8).to(DEV)
    b = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(DEV)
    sa, sb = torch.rand(m, generator=g).to(DEV), torch.rand(n, generator=g).to(DEV)
    bias = torch.randn(n, generator=g).to(DEV)
    buffer = torch.full((m + 5, n + 8), 7.0, device=DEV)  # rows of 208 fp32: 16-byte aligned for TMA
    c = buffer[:m, :n].fill_(float("nan"))  # a tile never written stays NaN
    tiles = triton.cdiv(m, 64) * triton.cdiv(n, 64)
    launch_with_scratch(lambda: _scaled_gemm_body[(3 if persistent else tiles,)](
        a, b, c, sa, sb, bias, m, n, k, 512, a.stride(0), b.stride(0), c.stride(0),
        A_ROWWISE=True, B_COLWISE=True, HAS_BIAS=True, INT_ACC=True, UPCAST=False,
        BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, GROUP_M=2, PERSISTENT=persistent, TMA=tma, TMA_OK=True, num_warps=4,
        TMA_STORE=store is not None, STORE_SPLIT=store or 1, TMA_STORE_OK=store is not None,
    ))
    ref = (a.double() @ b.double().t()) * sa.double()[:, None] * sb.double()[None, :] + bias.double()
    assert not c.isnan().any() and rel_err(c, ref) < 1e-6
    assert (buffer[m:] == 7).all() and (buffer[:, n:] == 7).all()


def test_gemm_unaligned_operands_take_the_pointer_configs():
    """TMA needs 16-byte aligned rows: K = 72 INT8 rows (72 B) and an offset view still run,
    on the pointer configs, and give the exact result."""
    from sixbit_compiler.kernels.gemm import prune_tma_configs, configs, tma_takes

    g = torch.Generator().manual_seed(3)
    a = torch.randint(-127, 128, (40, 73), generator=g, dtype=torch.int8).to(DEV)[:, 1:]  # base off by 1 B
    b = torch.randint(-127, 128, (24, 72), generator=g, dtype=torch.int8).to(DEV)
    assert not tma_takes(a) and tma_takes(torch.zeros(4, 64, dtype=torch.int8, device=DEV))
    assert [c for c in configs(True) if not c.kwargs["TMA"]] == prune_tma_configs(configs(True), {}, TMA_OK=False)
    assert any(c.kwargs["TMA"] for c in configs(True))
    # TMA-store configs only where C takes a descriptor store (scaled_gemm's TMA_STORE_OK)
    stores = [c for c in configs(True) if c.kwargs.get("TMA_STORE")]
    assert stores and not any(c in stores for c in prune_tma_configs(configs(True), {}, TMA_OK=True))
    assert all(c in prune_tma_configs(configs(True), {}, TMA_OK=True, TMA_STORE_OK=True) for c in stores)
    assert not any(c.kwargs.get("TMA_STORE") for c in configs(True, tma_store=False))
    sa, sb = torch.rand(40, 1, generator=g).to(DEV), torch.rand(24, 1, generator=g).to(DEV)
    c = scaled_gemm(a, b, sa, sb, None, torch.float32)
    ref = (a.double() @ b.double().t()) * sa.double() * sb.double().t()
    assert rel_err(c, ref) < 1e-6


def test_tma_configs_only_where_the_gpu_and_triton_have_descriptors(monkeypatch):
    import sixbit_compiler.kernels.gemm as gemm

    monkeypatch.setattr(gemm, "interpreting", lambda: False)
    assert not gemm.tma_available(torch.device("cpu"))
    monkeypatch.delattr(gemm.tl, "make_tensor_descriptor")  # a Triton from before in-kernel descriptors
    assert not gemm.tma_available(torch.device("cuda", 0))


@pytest.mark.parametrize("m, n, k", [(70, 40, 208), (1, 8, 16), (130, 64, 1536)])
@pytest.mark.parametrize("fast_accum", [True, False])
def test_fp8_gemm_exact_products(m, n, k, fast_accum):
    g = torch.Generator().manual_seed(m * n + k)
    a = (torch.randn(m, k, generator=g) * 20).to(torch.float8_e4m3fn)
    b = (torch.randn(n, k, generator=g) * 20).to(torch.float8_e4m3fn)
    sa, sb = torch.rand(m, 1, generator=g), torch.rand(n, 1, generator=g)
    bias = torch.randn(n, generator=g)
    c = scaled_gemm(a.to(DEV), b.to(DEV), sa.to(DEV), sb.to(DEV), bias.to(DEV), torch.float32, fast_accum=fast_accum)
    ref = (a.double() @ b.double().t()) * sa.double() * sb.double().t() + bias.double()
    # exact products; fp32 accumulation (interpreter), or on Hopper ~14-bit accumulation through
    # the K loop (fast_accum) or inside each 128-wide K step, promoted into fp32 between steps
    tol = 1e-6 if DEV == "cpu" else 1e-3 if fast_accum else 2e-4
    assert c.shape == (m, n) and rel_err(c.cpu(), ref) < tol


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_bf16_gemm_scalar_scales(out_dtype):
    g = torch.Generator().manual_seed(11)
    a = torch.randn(65, 96, generator=g).bfloat16().to(DEV)
    b = torch.randn(33, 96, generator=g).bfloat16().to(DEV)
    bias = torch.randn(33, generator=g).to(DEV)
    c = scaled_gemm(a, b, torch.tensor(0.5, device=DEV), torch.tensor(3.0, device=DEV), bias, out_dtype)
    ref = (a.double() @ b.double().t()) * 1.5 + bias.double()
    assert c.dtype == out_dtype and rel_err(c, ref) < (1e-6 if out_dtype == torch.float32 else 8e-3)


def test_gemm_nan_row_stays_in_its_row():
    a = torch.randn(20, 32).bfloat16().to(DEV)
    a[3, 4] = float("nan")
    c = scaled_gemm(a, torch.randn(8, 32).bfloat16().to(DEV), torch.ones((), device=DEV), torch.ones((), device=DEV))
    assert c[3].isnan().all() and torch.cat([c[:3], c[4:]]).isfinite().all()


# Every combination the kernel path takes: the INT8 route has one GEMM (no float_gemm
# choice), and the bf16 tier takes bf16/fp16 activations (fp32 ones fall back, tested below).
DISPATCH_CASES = [
    (p, dtype, hadamard, gemm)
    for p in Precision
    for dtype in (torch.bfloat16, torch.float16, torch.float32)
    for hadamard in (False, True)
    for gemm in (("triton",) if p == Precision.INT8 else ("triton", "cublas"))
    if not (p == Precision.BF16 and dtype == torch.float32)
]


@pytest.mark.parametrize("precision, dtype, hadamard, float_gemm", DISPATCH_CASES)
def test_dispatch_matches_reference_op(precision, dtype, hadamard, float_gemm):
    g = torch.Generator().manual_seed(int(precision) * 7 + hadamard)
    k = 200 if hadamard else 80  # K not a multiple of 16 / 128: padded
    x = (torch.randn(2, 33, k, generator=g) * 2).to(dtype).to(DEV)
    x[0, 3, 7] = float("nan")
    x[1, 5] = 0
    w = torch.randn(48, k, generator=g) / k**0.5
    b = torch.randn(48, generator=g).to(dtype).to(DEV)
    qw = quantize_weight(w.to(DEV), hadamard)
    got = dispatch.quantized_linear(x, qw.packed, qw.block_scales_bits, qw.tensor_scale, b, precision, k, hadamard, float_gemm)
    ref = quantized_linear_reference(x, qw.packed, qw.block_scales, qw.tensor_scale, b, precision, k, hadamard)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan()) and got[0, 3].isnan().all()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if precision == Precision.FP8 and DEV == "cuda":
        tol = max(tol, 1e-3)  # Hopper's FP8 MMA accumulates in ~14 mantissa bits (FP8_FAST_ACCUM)
    if float_gemm == "cublas" and precision != Precision.INT8:
        tol = max(tol, 8e-3)  # the product is rounded to bf16 before the tensor scales
    assert rel_err(got.nan_to_num(0), ref.nan_to_num(0)) < tol
    torch.testing.assert_close(got[1, 5], b)


INT8_WEIGHT_CASES = [(p, dtype, hadamard) for p, dtype, hadamard, gemm in DISPATCH_CASES if gemm == "triton"]


@pytest.mark.parametrize("precision, dtype, hadamard", INT8_WEIGHT_CASES)
def test_int8_weights_dispatch_matches_reference(precision, dtype, hadamard):
    """A weight stored as per-channel INT8 (``int8_weights``) through each activation route:
    the kernels against the spec, with NaN, a zero row, K off 16, and an all-zero channel."""
    g = torch.Generator().manual_seed(int(precision) * 5 + hadamard + 100)
    k = 200 if hadamard else 72
    x = (torch.randn(2, 33, k, generator=g) * 2).to(dtype).to(DEV)
    x[0, 3, 7] = float("nan")
    x[1, 5] = 0
    w = torch.randn(48, k, generator=g) / k**0.5
    w[5] = 0  # an all-zero channel: scale 0, codes 0
    b = torch.randn(48, generator=g).to(dtype).to(DEV)
    qw = quantize_weight(w.to(DEV), hadamard, "int8")
    pad = 128 if hadamard else 16  # the rotation works on 128-blocks
    assert qw.packed.dtype == torch.int8 and qw.packed.shape == (48, -(-k // pad) * pad) and qw.block_scales.shape == (48, 1)
    got = dispatch.quantized_linear(x, qw.packed, qw.block_scales_bits, qw.tensor_scale, b, precision, k, hadamard)
    ref = quantized_linear_reference(x, qw.packed, qw.block_scales, qw.tensor_scale, b, precision, k, hadamard)
    assert got.dtype == dtype and got.shape == ref.shape
    assert torch.equal(got.isnan(), ref.isnan()) and got[0, 3].isnan().all()
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    if precision == Precision.FP8 and DEV == "cuda":
        tol = max(tol, 1e-3)
    assert rel_err(got.nan_to_num(0), ref.nan_to_num(0)) < tol
    torch.testing.assert_close(got[1, 5], b)


@pytest.mark.parametrize("precision", list(Precision))
def test_int8_weight_spec_is_the_dequantized_weight_at_each_precision(precision):
    """The spec's four routes on an INT8 weight stay within each precision's error of
    x · (codes * scale)ᵀ; at BF16 they are that product up to fp32 rounding."""
    g = torch.Generator().manual_seed(int(precision))
    x = torch.randn(16, 64, generator=g)
    qw = quantize_weight(torch.randn(24, 64, generator=g), False, "int8")
    exact = x.double() @ (qw.packed.double() * qw.block_scales.double()).t()
    out = quantized_linear_reference(x, qw.packed, qw.block_scales, qw.tensor_scale, None, precision, 64, False)
    tol = {Precision.BF16: 1e-6, Precision.INT8: 2e-2, Precision.FP8: 6e-2, Precision.NVFP4: 0.15}[precision]
    assert rel_err(out, exact) < tol


def test_int8_weight_round_trip_and_size():
    w = torch.randn(40, 100) * torch.rand(40, 1) * 3
    qw = quantize_weight(w, False, "int8")
    back = (qw.packed.float() * qw.block_scales)[:, :100]
    assert rel_err(back, w) < 1e-2 and qw.packed[:, 100:].eq(0).all()
    assert qw.nbytes == 40 * 112 + 40 * 4 + 4 and qw.format == "int8"
    with pytest.raises(ValueError, match="weight format"):
        quantize_weight(w, False, "int4")


def test_dispatch_declines_what_it_cannot_take(caplog):
    x = torch.randn(4, 32, device=DEV)
    qw = quantize_weight(torch.randn(8, 32, device=DEV), False)
    assert dispatch.quantized_linear(x, qw.packed, qw.block_scales_bits, qw.tensor_scale, None, Precision.BF16, 32, False) is None
    assert dispatch.unsupported_reason(x.double(), Precision.INT8) == "activation dtype torch.float64"
