"""Device helpers shared by the kernels: exact rounding, portable and with hardware conversions.

The Triton interpreter rounds fp32->fp8 badly and has no rint, so the portable helpers round
with plain fp32 arithmetic that behaves the same compiled and interpreted. Compiled for a GPU,
the quantization kernels encode with :func:`encode_rows_hw` instead (one conversion
instruction per value; the same codes, checked against the spec by the GPU tests). The few divisions
(one per row or block) use ``tl.math.div_rn``: Triton's ``/`` on the GPU is approximate,
which moved codes across rounding boundaries (seen on the H100), and an IEEE division per
element cost 3x the bandwidth. Per element the kernels multiply by that reciprocal, as the
spec does, launched with FMA contraction off (``NO_FMA``) so that ``x * inv`` is rounded
before the rounding trick adds its constant.
"""

import triton
import triton.language as tl
from triton.language.extra import libdevice

# Adding and subtracting 1.5 * 2**23 rounds an fp32 |v| < 2**22 to the nearest integer,
# ties to even (the FPU's own rounding), with no libdevice call.
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def rne(v):
    """Round to nearest integer, ties to even, for |v| < 2**22."""
    return (v + _RNE_MAGIC) - _RNE_MAGIC


@triton.jit
def is_nan(x):
    """NaN test on the fp32 bits: exponent all ones, mantissa non-zero. (Not ``x != x``,
    which an optimizer assuming no NaNs may fold to False.)"""
    return (x.to(tl.int32, bitcast=True) & 0x7FFFFFFF) > 0x7F800000


@triton.jit
def round_to_bf16(v):
    """fp32 v rounded to the nearest bf16, ties to even, returned as fp32. By hand: the Triton
    interpreter's fp32 -> bf16 cast truncates. NaN stays NaN; past bf16's range it rounds to
    ±Inf, as the cast does."""
    bits = v.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
    return tl.where(is_nan(v), v, rounded.to(tl.float32, bitcast=True))


@triton.jit
def round_to(v, dtype: tl.constexpr, HW_CVT: tl.constexpr = False):
    """fp32 v rounded to ``dtype`` (bf16, fp16 or fp32) and back, as a cast to it would.
    ``HW_CVT`` (compiled kernels): the cast itself, one conversion instruction, where the bf16
    rounding by hand costs about ten."""
    if dtype == tl.bfloat16 and not HW_CVT:
        return round_to_bf16(v)
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def gelu_tanh(x):
    """GELU, tanh approximation (``F.gelu(x, approximate="tanh")``) of fp32 x, written as
    x·sigmoid(2y) = 0.5·x·(1 + tanh(y)), y = √(2/π)·(x + 0.044715·x³): no cancellation where
    tanh(y) is close to −1, and no libdevice call (the interpreter has none). The codegen's
    pointwise GELU is the same expression."""
    return x * tl.sigmoid(1.5957691216057308 * (x + 0.044715 * x * x * x))


@triton.jit
def saturate(x, limit):
    """x clamped to [-limit, limit] (±Inf to ±limit, the formats' convention); NaN passes."""
    return tl.where(x > limit, limit, tl.where(x < -limit, -limit, x))


@triton.jit
def where_nan(cond, x):
    """fp32 x with NaN where cond holds (a NaN constant global trips Triton's
    "global changed" check, since NaN != NaN, so the NaN is built from its bits)."""
    nan = (x.to(tl.int32, bitcast=True) * 0 + 0x7FC00000).to(tl.float32, bitcast=True)
    return tl.where(cond, nan, x)


@triton.jit
def int8_rows(x, HW_CVT: tl.constexpr = False):
    """Per-row symmetric INT8 of fp32 x [R, C], as ``formats.quantize_int8`` (axis=-1).

    Returns (codes as fp32, or int32 with ``HW_CVT``: encoded by :func:`encode_rows_hw`; scale
    [R] with NaN for rows holding NaN, row amax, |x| with NaN as 0). Infinities must already be
    saturated.
    """
    isnan = is_nan(x)
    a = tl.where(isnan, 0.0, tl.abs(x))
    amax = tl.max(a, axis=1)
    has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
    scale = tl.math.div_rn(amax, 127.0)
    inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
    if HW_CVT:
        q = encode_rows_hw(x, inv, False)
    else:
        q = rne(tl.where(isnan, 0.0, x) * inv[:, None])
        q = tl.minimum(tl.maximum(q, -127.0), 127.0)
    return q, where_nan(has_nan, scale), amax, a


@triton.jit
def round_to_e4m3(v):
    """Round non-negative fp32 v (<= 448) to the nearest e4m3 value, ties to even (exact)."""
    bits = v.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    exp = tl.maximum(exp, -6)  # e4m3 subnormals share the quantum of 2**-9
    quantum = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)
    inv_quantum = ((127 - (exp - 3)) << 23).to(tl.float32, bitcast=True)  # exact power of two
    return tl.minimum(rne(v * inv_quantum) * quantum, 448.0)


@triton.jit
def e4m3_bits(v):
    """float8_e4m3fn bits (as int32) of fp32 v, |v| <= 448, rounded to nearest even: the
    bits are assembled by hand (the interpreter's own fp32 -> fp8 conversion rounds wrongly)."""
    sign = (v.to(tl.int32, bitcast=True) >> 31) & 1  # -0.0 keeps its sign, as torch's cast does
    mag = round_to_e4m3(tl.abs(v))
    bits = mag.to(tl.int32, bitcast=True)
    exp = ((bits >> 23) & 0xFF) - 127
    code = tl.where(exp >= -6, ((exp + 7) << 3) | ((bits >> 20) & 7), (mag * 512.0).to(tl.int32))
    return code | (sign << 7)


@triton.jit
def encode_rows(x, inv, FP8: tl.constexpr):
    """Codes of fp32 x [R, C] (Inf saturated) scaled by inv [R]: INT8 values as fp32, or e4m3
    bits as int32. NaN encodes as 0 (its row's scale carries the NaN). Plain fp32 arithmetic,
    the same compiled and interpreted."""
    s = tl.where(is_nan(x), 0.0, x) * inv[:, None]
    if FP8:
        return e4m3_bits(tl.minimum(tl.maximum(s, -448.0), 448.0))
    else:
        return tl.minimum(tl.maximum(rne(s), -127.0), 127.0)


@triton.jit
def encode_rows_hw(x, inv, FP8: tl.constexpr):
    """:func:`encode_rows` with the GPU's conversion instructions (compiled only: the
    interpreter cannot run them): the same codes, as int32, in about a third of the
    instructions. Rounding, clamping, NaN and Inf are each one instruction's job:
    ``cvt.rni.s32.f32`` (ties to even; NaN -> 0; ±Inf -> the int range, then clamped to ±127)
    and ``cvt.rn.satfinite.e4m3x2.f32`` (ties to even; ±Inf -> ±448). x need not be saturated."""
    s = x * inv[:, None]
    if FP8:
        s = tl.where(is_nan(s), 0.0, s)  # satfinite keeps NaN; the spec writes code 0
        return s.to(tl.float8e4nv).to(tl.uint8, bitcast=True).to(tl.int32)
    else:
        return tl.minimum(tl.maximum(libdevice.float2int_rn(s), -127), 127)


@triton.jit
def fp8_rows(x):
    """Per-row FP8 e4m3 of fp32 x [R, C], as ``formats.quantize_fp8_rows``; returns like
    :func:`int8_rows` (e4m3 bits as int32, scale [R] with NaN for rows holding NaN, row amax,
    |x| with NaN as 0). Infinities must already be saturated."""
    isnan = is_nan(x)
    a = tl.where(isnan, 0.0, tl.abs(x))
    amax = tl.max(a, axis=1)
    has_nan = tl.max(isnan.to(tl.int32), axis=1) > 0
    scale = tl.math.div_rn(amax, 448.0)
    inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))
    return encode_rows(x, inv, True), where_nan(has_nan, scale), amax, a


@triton.jit
def e4m3_value(bits):
    """fp32 value of float8_e4m3fn ``bits`` (integer). Its NaN (S.1111.111) is set by hand: the
    Triton interpreter decodes it as ±480, the GPU's conversion as NaN."""
    v = bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
    return where_nan((bits & 0x7F) == 0x7F, v)


@triton.jit
def e2m1_round(mag):
    """Nearest e2m1 magnitude (0, .5, 1, 1.5, 2, 3, 4, 6) of mag >= 0, ties to even, saturating."""
    v = tl.where(mag > 0.25, 0.5, 0.0)
    v += tl.where(mag >= 0.75, 0.5, 0.0)
    v += tl.where(mag > 1.25, 0.5, 0.0)
    v += tl.where(mag >= 1.75, 0.5, 0.0)
    v += tl.where(mag > 2.5, 1.0, 0.0)
    v += tl.where(mag >= 3.5, 1.0, 0.0)
    v += tl.where(mag > 5.0, 2.0, 0.0)
    return v


@triton.jit
def e2m1_decode(code):
    """uint8/int32 e2m1 code (sign bit 3) -> fp32 value."""
    idx = code & 7
    mag = tl.where(idx < 4, idx.to(tl.float32) * 0.5, tl.where(idx < 6, (idx - 2).to(tl.float32), tl.where(idx == 6, 4.0, 6.0)))
    return tl.where((code & 8) != 0, -mag, mag)


#: Launch option of the quantization kernels: no fused multiply-add (module docstring).
NO_FMA = {"enable_fp_fusion": False}


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


#: widest chunk of a row the chunked kernels load at once (elements)
MAX_CHUNK = 1024


def row_tiling(k: int) -> tuple[int, int, int, bool]:
    """(rows per program, chunk width, warps, whole row in one chunk).

    A row up to 1024 wide is one power-of-two tile. A wider one goes in chunks of 256, 512 or
    1024, whichever pads the row least (5120 -> 1024, 1536 -> 512, 13824 -> 512, 8960 -> 256):
    a whole-row tile padded to the next power of two wasted 37.5 % of the lanes at K = 5120.
    """
    if k <= MAX_CHUNK:
        block_k = next_pow2(k)
        one = True
    else:
        block_k = min((256, 512, 1024), key=lambda c: (-(-k // c) * c, -c))
        one = False
    block_m = max(1, min(64, 4096 // block_k))
    warps = 4 if block_k * block_m <= 4096 else 8
    return block_m, block_k, warps, one
