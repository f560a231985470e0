"""What ``sixbit::quantized_linear`` runs on CUDA: the Triton kernels, or None to fall back.

Per precision (spec: ``sixbit_compiler.reference``):

* INT8: ``quantize_int8_rows`` (x -> int8 + per-token scale) and ``decode_nvfp4_to_int8``
  (stored NVFP4 -> per-channel INT8, per call) feed the INT8 scaled GEMM.
* NVFP4: ``quantize_nvfp4_values`` (x -> exact bf16 block values + tensor scale) and
  ``decode_nvfp4_values`` feed a bf16 GEMM with fp32 accumulation (exact products); both
  tensor scales are applied in its epilogue. That GEMM is the Triton template (since it became
  persistent and TMA-fed, faster than cuBLAS plus a scaling pass at every Wan shape, see
  :func:`float_scaled_gemm`).
* BF16: x (bf16/fp16) times the decoded block values, tensor scale applied after.
* FP8: ``quantize_fp8_rows`` (per-token e4m3) and ``decode_nvfp4_to_fp8`` (per-channel e4m3,
  per call) feed cuBLAS's FP8 rowwise ``_scaled_mm`` on CUDA, or the FP8 scaled-GEMM template.

A weight stored as per-channel INT8 (``int8_weights``) needs no decode for the INT8 route (its
codes are the operand); the NVFP4 and bf16 routes multiply its codes in bf16 (exact) and apply
the channel scale in the template's epilogue; the FP8 route re-quantizes it per channel, per
call, with the activation kernel. Spec: ``reference._int8_weight_linear``.

A case the kernels do not take returns None with a reason; the caller logs it once and runs
the reference path.
"""

from __future__ import annotations

import torch

from ..formats import Precision, hadamard_rotate
from ..formats._common import pad_last
from ..reference import apply_activation, stored_k
from . import log_fallback_once
from .gemm import scaled_gemm
from .quantize import quantize_fp8_rows, quantize_int8_rows, quantize_nvfp4_values
from .weights import decode_nvfp4_to_fp8, decode_nvfp4_to_int8, decode_nvfp4_values

_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def unsupported_reason(x: torch.Tensor, precision: Precision) -> str | None:
    if x.dtype not in _FLOAT_DTYPES:
        return f"activation dtype {x.dtype}"
    if precision == Precision.BF16 and x.dtype == torch.float32:
        return "bf16 precision with fp32 activations (the kernel multiplies in bf16)"
    if x.numel() == 0:
        return "empty input"
    return None


def float_scaled_gemm(a, b, scale, bias, out_dtype, backend: str):
    """(a · bᵀ) * scale (0-d tensor) + bias for bf16/fp16 operands.

    ``"triton"`` (the default): the fused scaled-GEMM template. ``"cublas"``: torch.mm, then
    the scale and bias in place (no host sync: the scale stays a device tensor), with one
    extra pass over the output and a bf16 rounding before the scale. The whole NVFP4 linear on
    the H100 (kernel run 6, docs/benchmarks.md): 0.50-1.00x bf16 with the template against
    0.28-0.74x with cuBLAS; the bf16 tier 0.86-1.01x against 0.37-0.91x. (Before the template
    was persistent and TMA-fed, cuBLAS was the faster of the two.)
    """
    if backend == "triton" or a.dtype != torch.bfloat16 or out_dtype != torch.bfloat16:
        # fp16 products of unscaled block values can overflow before the scale is applied;
        # only bf16 (fp32's range) takes the cuBLAS route.
        return scaled_gemm(a, b, torch.ones((), device=a.device), scale, bias, out_dtype)
    out = torch.mm(a, b.t())
    out.mul_(scale)
    if bias is not None:
        out.add_(bias)
    return out


def fp8_gemm(xq, xs, wq, ws, bias, out_dtype, backend: str):
    """The FP8 tier's GEMM on its operands (per-token e4m3 activations, from
    ``quantize_fp8_rows`` or shared codes, and per-channel e4m3 weights decoded per call by
    ``decode_nvfp4_to_fp8``): either the Triton scaled-GEMM template (``"triton"``: scales, bias
    and cast fused) or cuBLAS's FP8 rowwise ``_scaled_mm`` (``"cublas"``, bias added after; it
    wants N % 16 == 0)."""
    n = wq.shape[0]
    if backend == "triton" or n % 16 or out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return scaled_gemm(xq, wq, xs, ws, bias, out_dtype)
    out = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t().contiguous(), out_dtype=out_dtype)
    if bias is not None:
        out = out + bias.to(out_dtype)
    return out


def gemm_input(x, w_packed, in_features: int, hadamard: bool, precision: Precision) -> torch.Tensor:
    """x [..., K] as the GEMM's [M, Kp] operand: rotated if the weight was, zero-padded to the
    stored weight's K, contiguous."""
    x2d = x.reshape(-1, x.shape[-1])
    if x2d.shape[-1] != in_features:
        raise ValueError(f"quantized_linear: input has {x2d.shape[-1]} features, weight expects {in_features}")
    kp = stored_k(w_packed)
    if hadamard:
        # The rotation is quantized from fp32, as in the spec; only the bf16 tier, which
        # multiplies activations as they are, takes them back to their own dtype.
        x2d = hadamard_rotate(x2d)
        if precision == Precision.BF16:
            x2d = x2d.to(x.dtype)
    if x2d.shape[-1] != kp:
        x2d = pad_last(x2d, kp)
    return x2d.contiguous()


def _int8_weight(w_packed, w_block_scales_bits, w_tensor_scale):
    """(weight codes, per-channel scale) of the INT8 GEMM: a weight stored as per-channel INT8
    as it is, an NVFP4 one decoded for this call."""
    if w_packed.dtype == torch.int8:
        return w_packed, w_block_scales_bits
    return decode_nvfp4_to_int8(w_packed, w_block_scales_bits, w_tensor_scale)


def int8_operands(x2d, w_packed, w_block_scales_bits, w_tensor_scale, gelu: bool = False):
    """(x codes, per-token scale, weight codes, per-channel scale) of the INT8 GEMM (``gelu``: of
    GELU(x), the activation applied in the quantization kernel)."""
    xq, xs, _, _ = quantize_int8_rows(x2d, gelu=gelu)
    return (xq, xs, *_int8_weight(w_packed, w_block_scales_bits, w_tensor_scale))


#: the dtype of shared codes each precision can read (FP8 codes cross op boundaries as uint8 bits)
SHARED_CODE_DTYPES = {Precision.INT8: torch.int8, Precision.FP8: torch.uint8}


def usable_codes(x_codes, x_scales, precision: Precision, hadamard: bool, w_packed):
    """(codes, scales) when an activation's shared codes (``share_quantization``,
    ``quantize_prologues``) can stand for quantizing x in this call, else None: codes of this
    call's precision (INT8 codes for an INT8 call, FP8 ones for an FP8 call), of the unrotated x
    whose width is the stored weight's K (the passes check the same; this keeps a mismatch from
    reaching the GEMM)."""
    if (x_codes is None or hadamard or SHARED_CODE_DTYPES.get(precision) != x_codes.dtype
            or x_codes.shape[-1] != stored_k(w_packed)):
        return None
    return x_codes, x_scales


def operands_from_codes(precision: Precision, x_codes, x_scales, w_packed, w_block_scales_bits, w_tensor_scale):
    """:func:`int8_operands` / :func:`fp8_operands` for an activation already quantized
    (``x_codes`` [..., K], ``x_scales`` [..., 1], from :func:`usable_codes`): only the weight is
    decoded."""
    xq, xs = x_codes.reshape(-1, x_codes.shape[-1]), x_scales.reshape(-1, 1)
    if precision == Precision.FP8:
        return (xq.view(torch.float8_e4m3fn), xs, *_fp8_weight(w_packed, w_block_scales_bits, w_tensor_scale))
    return (xq, xs, *_int8_weight(w_packed, w_block_scales_bits, w_tensor_scale))


def _fp8_weight(w_packed, w_block_scales_bits, w_tensor_scale):
    """(weight codes, per-channel scale) of the FP8 GEMM, decoded for this call."""
    if w_packed.dtype == torch.int8:  # stored per-channel INT8: re-quantize the dequantized rows
        wq, ws, _, _ = quantize_fp8_rows(w_packed.to(torch.float32) * w_block_scales_bits)
        return wq, ws
    return decode_nvfp4_to_fp8(w_packed, w_block_scales_bits, w_tensor_scale)


def fp8_operands(x2d, w_packed, w_block_scales_bits, w_tensor_scale, gelu: bool = False):
    """(x codes, per-token scale, weight codes, per-channel scale) of the FP8 GEMM (``gelu``: as
    in :func:`int8_operands`)."""
    xq, xs, _, _ = quantize_fp8_rows(x2d, gelu=gelu)
    return (xq, xs, *_fp8_weight(w_packed, w_block_scales_bits, w_tensor_scale))


#: the precisions whose GEMM is the one-byte scaled template (codegen fuses epilogues into it)
ONE_BYTE_OPERANDS = {Precision.INT8: int8_operands, Precision.FP8: fp8_operands}


def quantized_linear(
    x, w_packed, w_block_scales_bits, w_tensor_scale, bias, precision: Precision, in_features: int, hadamard: bool,
    float_gemm: str | None = None, shared_codes=None, activation: str | None = None,
):
    """Kernel path; returns None (after logging once) for a case the kernels do not take.

    ``activation`` ("gelu_tanh"): the linear's input is GELU(x) (``fold_gelu``). An INT8 or FP8
    call applies it inside the quantization kernel, so GELU(x) never goes to memory; every other
    call (and one given shared codes, or rotating x) computes it first.

    ``shared_codes``: (codes, scales) of x from :func:`usable_codes`, for an INT8 or FP8 call
    whose activation is already quantized at its precision; the call then quantizes nothing.

    ``float_gemm`` picks the GEMM of the float tiers ("cublas" / "triton"); by default the
    Triton template for all three, the faster of each pair on the H100 (kernel run 6,
    docs/benchmarks.md: the template fuses the scales, bias and cast; cuBLAS adds them after).
    NVFP4 / bf16 activations on per-channel INT8 weights always take the template (their scale
    is per column).
    """
    float_gemm = float_gemm or "triton"
    reason = unsupported_reason(x, precision)
    if reason is not None:
        log_fallback_once("quantized_linear runs the reference path", reason)
        return None
    out_dtype = x.dtype
    lead = x.shape[:-1]
    fused_gelu = (activation is not None and precision in (Precision.INT8, Precision.FP8) and shared_codes is None
                  and not hadamard)
    if activation is not None and not fused_gelu:
        x = apply_activation(x, activation)
    x2d = None if shared_codes is not None else gemm_input(x, w_packed, in_features, hadamard, precision)

    if precision in ONE_BYTE_OPERANDS:  # (zero padding past in_features is GELU(0) = 0 too)
        if shared_codes is not None:
            operands = operands_from_codes(precision, *shared_codes, w_packed, w_block_scales_bits, w_tensor_scale)
        else:
            operands = ONE_BYTE_OPERANDS[precision](x2d, w_packed, w_block_scales_bits, w_tensor_scale, gelu=fused_gelu)
        xq, xs, wq, ws = operands
        if precision == Precision.FP8:
            out = fp8_gemm(xq, xs, wq, ws, bias, out_dtype, float_gemm)
        else:
            out = scaled_gemm(xq, wq, xs, ws, bias, out_dtype)
    elif w_packed.dtype == torch.int8:  # NVFP4 / bf16 activations on per-channel INT8 codes
        codes = w_packed.to(torch.bfloat16 if precision == Precision.NVFP4 else x2d.dtype)  # exact
        if precision == Precision.NVFP4:
            xv, xts, _, _ = quantize_nvfp4_values(x2d, torch.bfloat16)
            out = scaled_gemm(xv, codes, xts, w_block_scales_bits, bias, out_dtype)
        else:
            out = scaled_gemm(x2d, codes, torch.ones((), device=x2d.device), w_block_scales_bits, bias, out_dtype)
    elif precision == Precision.NVFP4:
        xv, xts, _, _ = quantize_nvfp4_values(x2d, torch.bfloat16)
        wv = decode_nvfp4_values(w_packed, w_block_scales_bits, torch.bfloat16)
        out = float_scaled_gemm(xv, wv, xts * w_tensor_scale, bias, out_dtype, float_gemm)
    elif precision == Precision.BF16:
        wv = decode_nvfp4_values(w_packed, w_block_scales_bits, x2d.dtype)
        out = float_scaled_gemm(x2d, wv, w_tensor_scale, bias, out_dtype, float_gemm)
    else:
        log_fallback_once("quantized_linear runs the reference path", f"precision {precision!r}")
        return None
    return out.reshape(*lead, out.shape[-1])
