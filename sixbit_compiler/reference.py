"""Pure-PyTorch reference of the sixbit quantized linear: the numerical spec.

``y = x · Wᵀ + b`` where W is stored once, in NVFP4, and the activation runs at
one of four precisions:

* ``BF16``:  y = x · dequant(W)ᵀ, computed in fp32.
* ``INT8``:  per-token INT8 x per-channel INT8 weights derived from the NVFP4
  weights (:func:`~sixbit_compiler.formats.nvfp4_to_int8`), exact int32-range
  accumulation, then both scales.
* ``FP8``:   per-token FP8 e4m3 x per-channel FP8 weights derived from the NVFP4 weights,
  fp32 accumulation, then both scales.
* ``NVFP4``: x quantized to NVFP4; the products of the two operands'
  ``e2m1 · e4m3`` values (exact in bf16) accumulate in fp32; the two tensor
  scales multiply the accumulator once.

With ``hadamard=True`` the stored weight was rotated before quantization, and x
is rotated the same way (blocks of 128) before any of the three.

A weight stored as per-channel INT8 (``int8_weights``; ``w_packed`` int8 [N, Kp] codes,
``w_block_scales`` fp32 [N, 1] channel scales) takes the same four routes with its codes in
place of the NVFP4-derived operand, and its channel scale applied after the GEMM:

* ``BF16``: (x · codesᵀ) * scale; ``INT8``: the codes are the GEMM's weight operand as they
  are; ``FP8``: per-channel e4m3 of the dequantized weight; ``NVFP4``: (NVFP4 values of x ·
  codesᵀ) * x's tensor scale * scale (products of an e2m1·e4m3 value and an int8 are exact in
  fp32).
"""

from __future__ import annotations

import torch

from .formats import (
    Precision,
    dequantize_nvfp4,
    hadamard_rotate,
    nvfp4_block_values,
    nvfp4_to_fp8,
    nvfp4_to_int8,
    quantize_fp8_rows,
    quantize_int8,
    quantize_nvfp4,
)
from .formats._common import pad_last
from .formats.nvfp4 import NVFP4_BLOCK


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a[M,K] int8 · b[N,K]ᵀ int8 -> exact fp64 (|sum| < 2**53 for any real K)."""
    if a.is_cuda and a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0:
        return torch._int_mm(a, b.t()).to(torch.float64)
    return a.to(torch.float64) @ b.to(torch.float64).t()


def prepare_activation(x2d: torch.Tensor, in_features: int, padded_k: int, hadamard: bool) -> torch.Tensor:
    """fp32 activation, rotated if asked, zero-padded to the stored weight's K."""
    if x2d.shape[-1] != in_features:
        raise ValueError(f"quantized_linear: input has {x2d.shape[-1]} features, weight expects {in_features}")
    xk = hadamard_rotate(x2d) if hadamard else x2d.to(torch.float32)
    xk = pad_last(xk, NVFP4_BLOCK)
    if xk.shape[-1] != padded_k:
        raise ValueError(f"quantized_linear: padded K {xk.shape[-1]} does not match the stored weight's {padded_k}")
    return xk


#: the activations a quantized linear can apply to its input (``x_activation``), as PyTorch does
ACTIVATIONS = {"gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def apply_activation(x: torch.Tensor, activation: str | None) -> torch.Tensor:
    """x, or ``ACTIVATIONS[activation](x)``."""
    return x if activation is None else ACTIVATIONS[activation](x)


def stored_k(w_packed: torch.Tensor) -> int:
    """The padded K of a stored weight: NVFP4 packs two codes a byte, INT8 one."""
    return w_packed.shape[-1] * (1 if w_packed.dtype == torch.int8 else 2)


def reference_scales(w_packed: torch.Tensor, w_block_scales: torch.Tensor) -> torch.Tensor:
    """The op's scale argument as the reference takes it: NVFP4 block scales travel as uint8
    bits and are viewed back as e4m3; INT8 channel scales are fp32 already."""
    return w_block_scales if w_packed.dtype == torch.int8 else w_block_scales.view(torch.float8_e4m3fn)


def _int8_weight_linear(xk, codes, scale, precision: Precision) -> torch.Tensor:
    """The four activation routes on a per-channel INT8 weight (module docstring), fp32 out."""
    if precision == Precision.BF16:
        return (xk @ codes.to(torch.float32).t()) * scale.t()
    if precision == Precision.INT8:
        xq, xs = quantize_int8(xk, axis=-1)
        return (_int8_matmul(xq, codes) * xs.double() * scale.double().t()).to(torch.float32)
    if precision == Precision.FP8:
        wq, ws = quantize_fp8_rows(codes.to(torch.float32) * scale)
        xq, xs = quantize_fp8_rows(xk)
        return (xq.to(torch.float32) @ wq.to(torch.float32).t()) * xs * ws.t()
    if precision == Precision.NVFP4:
        xp, xb, xt = quantize_nvfp4(xk)
        return ((nvfp4_block_values(xp, xb) @ codes.to(torch.float32).t()) * xt) * scale.t()
    raise ValueError(f"quantized_linear: unsupported precision {precision!r}")


def quantized_linear_reference(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_block_scales: torch.Tensor,
    w_tensor_scale: torch.Tensor,
    bias: torch.Tensor | None,
    precision: Precision,
    in_features: int,
    hadamard: bool,
) -> torch.Tensor:
    out_features = w_packed.shape[0]
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    xk = prepare_activation(x2d, in_features, stored_k(w_packed), hadamard)

    if w_packed.dtype == torch.int8:
        out = _int8_weight_linear(xk, w_packed, w_block_scales, precision)
    elif precision == Precision.BF16:
        w = dequantize_nvfp4(w_packed, w_block_scales, w_tensor_scale)
        out = xk @ w.t()
    elif precision == Precision.INT8:
        wq, ws = nvfp4_to_int8(w_packed, w_block_scales, w_tensor_scale)
        xq, xs = quantize_int8(xk, axis=-1)
        out = (_int8_matmul(xq, wq) * xs.double() * ws.double().t()).to(torch.float32)
    elif precision == Precision.FP8:
        wq, ws = nvfp4_to_fp8(w_packed, w_block_scales, w_tensor_scale)
        xq, xs = quantize_fp8_rows(xk)
        # e4m3 x e4m3 products are exact in fp32: fp32 accumulation, then both scales.
        out = (xq.to(torch.float32) @ wq.to(torch.float32).t()) * xs * ws.t()
    elif precision == Precision.NVFP4:
        xp, xb, xt = quantize_nvfp4(xk)
        a = nvfp4_block_values(xp, xb)
        b = nvfp4_block_values(w_packed, w_block_scales)
        # Products of bf16-exact values are exact in fp32 (and in TF32): this matmul is
        # the exact NVFP4 math with fp32 accumulation, on CPU and GPU alike.
        out = (a @ b.t()) * (xt * w_tensor_scale)
    else:
        raise ValueError(f"quantized_linear: unsupported precision {precision!r}")

    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype).reshape(*lead, out_features)
