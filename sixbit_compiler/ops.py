"""The custom ops the passes insert: ``sixbit::quantized_linear`` (``quantize_linears``),
``sixbit::linear_epilogue`` and ``sixbit::region_kernel`` (``lower_regions``, generated kernels),
``sixbit::region_kernel_int8`` (``quantize_prologues``), ``sixbit::shared_int8_quantization``
and ``sixbit::shared_fp8_quantization`` (``share_quantization``),
``sixbit::residual_abs_sums`` (``precision_guards``), ``sixbit::quantized_attention``
(``quantize_attention``), ``sixbit::quantized_attention_qk_norm_rope`` (``fold_qk_norm_rope``).

They are ``torch.library`` custom ops, so Inductor and AOTAutograd treat them as opaque
kernels with known output shapes (the fake implementations), and they pass
``torch.library.opcheck``.

On CUDA ``quantized_linear`` runs the Triton kernels (``sixbit_compiler.kernels.dispatch``);
on CPU, and for any case the kernels do not take (logged once), the pure-PyTorch reference path.

Its precision is not a compile-time constant: the op reads it from
``precision_slots[slot]``, a small CPU int8 tensor that the runtime writes once
per model call. One compiled graph therefore serves every precision schedule
without recompiling, and reading the slot never syncs the GPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

from .formats import Precision
from .reference import ACTIVATIONS, apply_activation, quantized_linear_reference, reference_scales

#: Set SIXBIT_KERNELS=0 to run the reference path on GPU too (debugging, A/B checks).
KERNELS_ENV = "SIXBIT_KERNELS"

#: Set only while ``sixbit calibrate`` runs: called as ``recorder(slot, x, weight args...)``
#: by every quantized linear, to measure its NVFP4 activation error (see calibrate.py).
CALIBRATION_RECORDER = None


def use_kernels() -> bool:
    from .kernels import triton_available

    return os.environ.get(KERNELS_ENV, "1") != "0" and triton_available()


def linear_kernels_run_on(x: torch.Tensor) -> bool:
    """Whether ``quantized_linear`` runs the Triton kernels on ``x``: on CUDA only (on CPU the
    reference path is the spec; tests point this at the interpreter to run the kernels there)."""
    return x.is_cuda and use_kernels()


@torch.library.custom_op("sixbit::quantized_linear", mutates_args=())
def quantized_linear(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_block_scales: torch.Tensor,
    w_tensor_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    precision_slots: torch.Tensor,
    slot: int,
    in_features: int,
    hadamard: bool,
    x_codes: Optional[torch.Tensor] = None,
    x_scales: Optional[torch.Tensor] = None,
    x_activation: Optional[str] = None,
) -> torch.Tensor:
    """y = x · W_nvfp4ᵀ + bias, activations at precision ``precision_slots[slot]``.

    ``w_packed`` (uint8, [N, Kp/2]), ``w_block_scales`` (the float8_e4m3fn scales as
    uint8 bits, [N, Kp/16]) and ``w_tensor_scale`` (fp32 scalar) are the stored NVFP4
    weight (see ``sixbit_compiler.formats.nvfp4``). FP8 tensors cross the op boundary
    as raw uint8 bits, the convention Triton kernels use too. A weight stored as
    per-channel INT8 (``int8_weights``) comes as int8 codes [N, Kp], fp32 channel scales
    [N, 1] and an unused 1.0 (``weight_store.QuantizedWeight``).

    ``x_codes`` / ``x_scales`` (``share_quantization``, ``quantize_prologues``): x's per-token
    codes and scales, computed once for every GEMM reading x: INT8 codes (int8), valid whenever
    this call's precision is INT8 and the kernels run on x, or FP8 e4m3 codes (as uint8 bits),
    valid likewise for FP8 calls. Such a call then skips quantizing x; every other path (the
    other precisions, the reference, calibration) reads x itself.

    ``x_activation`` (``fold_gelu``): None, or "gelu_tanh": the linear's input is
    ``F.gelu(x, approximate="tanh")``. INT8 and FP8 calls on the kernels apply it in their
    quantization kernel; every other path computes it first (``reference.ACTIVATIONS``).
    """
    if x_activation is not None and x_activation not in ACTIVATIONS:
        raise ValueError(f"sixbit::quantized_linear: x_activation must be None or one of {sorted(ACTIVATIONS)}, "
                         f"got {x_activation!r}")
    if x_activation is not None and x_codes is not None:  # the codes would be x's, not the activation's
        raise ValueError("sixbit::quantized_linear: x_codes cannot come with x_activation")
    precision = Precision(int(precision_slots[slot]))
    if CALIBRATION_RECORDER is not None:
        CALIBRATION_RECORDER(slot, apply_activation(x, x_activation), w_packed, w_block_scales, w_tensor_scale,
                             in_features, hadamard)
    if linear_kernels_run_on(x):
        from .kernels import dispatch

        codes = dispatch.usable_codes(x_codes, x_scales, precision, hadamard, w_packed)
        out = dispatch.quantized_linear(x, w_packed, w_block_scales, w_tensor_scale, bias, precision, in_features, hadamard,
                                        shared_codes=codes, activation=x_activation)
        if out is not None:
            return out
    scales = reference_scales(w_packed, w_block_scales)
    return quantized_linear_reference(apply_activation(x, x_activation), w_packed, scales, w_tensor_scale, bias,
                                      precision, in_features, hadamard)


@quantized_linear.register_fake
def _quantized_linear_fake(x, w_packed, w_block_scales, w_tensor_scale, bias, precision_slots, slot, in_features, hadamard,
                           x_codes=None, x_scales=None, x_activation=None):
    torch._check(x.shape[-1] == in_features, lambda: f"quantized_linear: expected {in_features} input features")
    return x.new_empty((*x.shape[:-1], w_packed.shape[0]))


QUANTIZED_LINEAR = torch.ops.sixbit.quantized_linear.default


@torch.library.custom_op("sixbit::linear_epilogue", mutates_args=())
def linear_epilogue(
    x: torch.Tensor,
    w_packed: torch.Tensor,
    w_block_scales: torch.Tensor,
    w_tensor_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    precision_slots: torch.Tensor,
    slot: int,
    in_features: int,
    hadamard: bool,
    key: str,
    extras: list[torch.Tensor],
    x_codes: Optional[torch.Tensor] = None,
    x_scales: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """A quantized linear and its elementwise epilogue chain (``lower_regions``), registered
    under ``key`` in ``sixbit_compiler.codegen.gemm.REGISTRY``; ``extras`` are the chain's
    other inputs. The first nine arguments are ``quantized_linear``'s, in its order.

    INT8 and FP8 calls run one generated kernel: the GEMM with the chain as its epilogue.
    NVFP4 and bf16 calls (DMPQ may pick NVFP4 for this call) run ``quantized_linear`` and then
    the chain as its own generated kernel: the same values either way. ``x_codes`` /
    ``x_scales`` are as for ``quantized_linear``.
    """
    from .codegen.gemm import REGISTRY, run_gemm_epilogue
    from .codegen.pointwise import run_pointwise

    kernel = REGISTRY[key]
    precision = Precision(int(precision_slots[slot]))
    if precision in (Precision.INT8, Precision.FP8) and CALIBRATION_RECORDER is None and generated_kernels_run_on(x):
        from .kernels import dispatch

        if dispatch.unsupported_reason(x, precision) is None:
            codes = dispatch.usable_codes(x_codes, x_scales, precision, hadamard, w_packed)
            if codes is not None:
                operands = dispatch.operands_from_codes(precision, *codes, w_packed, w_block_scales, w_tensor_scale)
            else:
                x2d = dispatch.gemm_input(x, w_packed, in_features, hadamard, precision)
                operands = dispatch.ONE_BYTE_OPERANDS[precision](x2d, w_packed, w_block_scales, w_tensor_scale)
            out = run_gemm_epilogue(kernel, *operands, bias, extras, tuple(x.shape[:-1]))
            if out is not None:
                return out
    y = quantized_linear(x, w_packed, w_block_scales, w_tensor_scale, bias, precision_slots, slot, in_features, hadamard,
                         x_codes, x_scales)
    tensors = dict(zip(kernel.inputs, extras), **{kernel.gemm: y})
    return run_pointwise(kernel.alone, *(tensors[name] for name in kernel.alone.inputs))


@linear_epilogue.register_fake
def _linear_epilogue_fake(x, w_packed, w_block_scales, w_tensor_scale, bias, precision_slots, slot, in_features,
                          hadamard, key, extras, x_codes=None, x_scales=None):
    from .codegen.gemm import REGISTRY

    torch._check(x.shape[-1] == in_features, lambda: f"linear_epilogue: expected {in_features} input features")
    shape = torch.broadcast_shapes((*x.shape[:-1], w_packed.shape[0]), *(t.shape for t in extras))
    return x.new_empty(shape, dtype=REGISTRY[key].output_dtype)


LINEAR_EPILOGUE = torch.ops.sixbit.linear_epilogue.default

#: the ops that run a quantized GEMM: their first nine arguments are ``quantized_linear``'s
#: (x, packed weight, block scales, tensor scale, bias, precision slots, slot, in_features, hadamard)
QUANTIZED_GEMMS = (QUANTIZED_LINEAR, LINEAR_EPILOGUE)


def generated_kernels_run_on(x: torch.Tensor) -> bool:
    """Whether generated Triton kernels can run on ``x``: on CUDA, or anywhere under
    ``TRITON_INTERPRET=1`` (tests); never with ``SIXBIT_KERNELS=0``."""
    from .kernels import interpreting

    return use_kernels() and (x.is_cuda or interpreting())


@torch.library.custom_op("sixbit::region_kernel", mutates_args=())
def region_kernel(key: str, inputs: list[torch.Tensor]) -> torch.Tensor:
    """A generated kernel (``lower_regions``): the chain registered under ``key`` in
    ``sixbit_compiler.codegen.pointwise.REGISTRY``, applied to ``inputs`` (broadcast)."""
    from .codegen.pointwise import REGISTRY, run_pointwise

    return run_pointwise(REGISTRY[key], *inputs)


@region_kernel.register_fake
def _region_kernel_fake(key, inputs):
    from .codegen.pointwise import REGISTRY

    shape = torch.broadcast_shapes(*(t.shape for t in inputs))
    return inputs[0].new_empty(shape, dtype=REGISTRY[key].output_dtype)


REGION_KERNEL = torch.ops.sixbit.region_kernel.default


def any_reads(precision_slots: torch.Tensor, slots: list[int], precision: Precision) -> bool:
    """Whether one of the GEMMs with these ``slots`` reads ``precision`` activations this call."""
    return any(Precision(int(precision_slots[s])) == precision for s in slots)


@torch.library.custom_op("sixbit::region_kernel_int8", mutates_args=())
def region_kernel_int8(
    key: str, inputs: list[torch.Tensor], precision_slots: torch.Tensor, slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A norm prologue (``region_kernel`` ``key``) whose output feeds quantized GEMMs only
    (``quantize_prologues``): returns (output, its per-token INT8 codes, their fp32 scales
    [..., 1]). When one of the GEMMs' ``slots`` reads INT8 this call, the chunked variant
    (``codegen.rows``) computes the output and the codes in one kernel; otherwise the plain
    kernel runs and the codes stay unwritten (a GEMM reads them only when its precision is INT8)."""
    from .codegen.pointwise import REGISTRY, run_pointwise
    from .codegen.rows import REGISTRY as ROW_KERNELS, run_quantizing_rows

    kernel = REGISTRY[key]
    if any_reads(precision_slots, slots, Precision.INT8):
        return run_quantizing_rows(ROW_KERNELS[kernel.int8_key], *inputs)
    out = run_pointwise(kernel, *inputs)
    return (out, out.new_empty(out.shape, dtype=torch.int8),
            out.new_empty((*out.shape[:-1], 1), dtype=torch.float32))


@region_kernel_int8.register_fake
def _region_kernel_int8_fake(key, inputs, precision_slots, slots):
    out = _region_kernel_fake(key, inputs)
    return out, out.new_empty(out.shape, dtype=torch.int8), out.new_empty((*out.shape[:-1], 1), dtype=torch.float32)


REGION_KERNEL_INT8 = torch.ops.sixbit.region_kernel_int8.default


def _shared_codes(x: torch.Tensor, precision_slots: torch.Tensor, slots: list[int], precision: Precision):
    """x's per-token codes [..., K] (int8 for INT8, e4m3 bits as uint8 for FP8) and fp32 scales
    [..., 1], written when one of the ``slots`` reads ``precision`` this call and the kernels run
    on x (the only path that reads codes: on CPU without them every GEMM runs the reference,
    which reads x), and left unwritten otherwise: a GEMM reads them only when its own precision
    is the codes' one, on the kernels."""
    fp8 = precision == Precision.FP8
    codes = torch.empty(x.shape, dtype=torch.uint8 if fp8 else torch.int8, device=x.device)
    scales = torch.empty((*x.shape[:-1], 1), dtype=torch.float32, device=x.device)
    if (x.numel() and x.dtype in (torch.bfloat16, torch.float16, torch.float32) and generated_kernels_run_on(x)
            and any_reads(precision_slots, slots, precision)):
        from .kernels.quantize import quantize_rows_into

        # written in place (a copy after the kernel was one more read and write of the codes)
        quantize_rows_into(x.reshape(-1, x.shape[-1]).contiguous(), codes.view(-1, x.shape[-1]),
                           scales.view(-1, 1), fp8=fp8)
    return codes, scales


@torch.library.custom_op("sixbit::shared_int8_quantization", mutates_args=())
def shared_int8_quantization(
    x: torch.Tensor, precision_slots: torch.Tensor, slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """x's per-token INT8 codes [..., K] and fp32 scales [..., 1] (``formats.quantize_int8`` over
    the last dim), computed once for the quantized GEMMs that read x (``share_quantization``),
    when one of their ``slots`` reads INT8 this call (:func:`_shared_codes`)."""
    return _shared_codes(x, precision_slots, slots, Precision.INT8)


@shared_int8_quantization.register_fake
def _shared_int8_quantization_fake(x, precision_slots, slots):
    return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


@torch.library.custom_op("sixbit::shared_fp8_quantization", mutates_args=())
def shared_fp8_quantization(
    x: torch.Tensor, precision_slots: torch.Tensor, slots: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The FP8 tier's twin of ``shared_int8_quantization``: x's per-token e4m3 codes (as uint8
    bits, ``formats.quantize_fp8_rows``) and fp32 scales, when one of the ``slots`` reads FP8
    this call."""
    return _shared_codes(x, precision_slots, slots, Precision.FP8)


@shared_fp8_quantization.register_fake
def _shared_fp8_quantization_fake(x, precision_slots, slots):
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)


SHARED_INT8_QUANTIZATION = torch.ops.sixbit.shared_int8_quantization.default
SHARED_FP8_QUANTIZATION = torch.ops.sixbit.shared_fp8_quantization.default
#: the shared quantization op of each precision whose codes GEMMs can share
SHARED_QUANTIZATIONS = {Precision.INT8: SHARED_INT8_QUANTIZATION, Precision.FP8: SHARED_FP8_QUANTIZATION}


@torch.library.custom_op("sixbit::residual_abs_sums", mutates_args=())
def residual_abs_sums(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """[Σ|y − x|, Σ|x|] in fp32, y − x rounded to the activation dtype: a block's Γ is their ratio.

    An opaque op on purpose: Inductor schedules it where it stands, so a block's input is
    freed right after the block. (As fused reductions, Inductor moved all blocks' Γ to the end
    of the graph, keeping every block's input alive: +2.3 GB peak on Wan2.1-1.3B at 480p.)
    """
    from .kernels import cache_kernels_take

    if cache_kernels_take(y) and use_kernels():
        from .kernels.cache import residual_abs_sums as kernel

        return kernel(y, x)
    return torch.stack([(y - x).float().abs().sum(), x.float().abs().sum()])


@residual_abs_sums.register_fake
def _residual_abs_sums_fake(y, x):
    return y.new_empty((2,), dtype=torch.float32)


RESIDUAL_ABS_SUMS = torch.ops.sixbit.residual_abs_sums.default


@torch.library.custom_op("sixbit::quantized_attention", mutates_args=())
def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float],
                        attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SDPA without dropout or causality, with INT8 Q·Kᵀ and FP8 P·V (``quantize_attention``;
    spec ``formats.attention``). q [B, H, Sq, D], k and v [B, H, Skv, D]; ``attn_mask``: None
    or a boolean key-padding mask [B or 1, 1, 1, Skv] (the pass passes no other).

    On CUDA (or the interpreter) the Triton kernels; on CPU the spec (sixbit's emulation, as for
    the linears). Inputs the kernels do not take on the GPU run exact SDPA, with one log line.
    The output is laid out as [B, Sq, H, D] (as the flash backends lay out theirs).
    """
    from .formats.attention import key_padding_mask, quantized_attention_reference

    key_mask = key_padding_mask(attn_mask, q.shape[0], k.shape[-2])
    if attn_mask is not None and key_mask is None:
        raise ValueError(f"sixbit::quantized_attention: attn_mask must be a boolean [B, 1, 1, Skv] key-padding "
                         f"mask (got {attn_mask.dtype} {tuple(attn_mask.shape)})")
    if generated_kernels_run_on(q):
        from .kernels import attention, log_fallback_once

        reason = attention.unsupported_reason(q, k, v)
        if reason is None:
            return attention.quantized_attention(q, k, v, scale, key_mask=key_mask)
        log_fallback_once("quantized_attention runs exact SDPA", reason)
        result = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    else:
        result = quantized_attention_reference(q, k, v, scale, key_mask=key_mask)
    return _attention_output(q, v).copy_(result)  # the layout the fake promises


@quantized_attention.register_fake
def _quantized_attention_fake(q, k, v, scale, attn_mask=None):
    return _attention_output(q, v)


@torch.library.custom_op("sixbit::quantized_attention_qk_norm_rope", mutates_args=())
def quantized_attention_qk_norm_rope(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: Optional[torch.Tensor],
                                     k_weight: Optional[torch.Tensor], q_eps: Optional[float], k_eps: Optional[float],
                                     q_cos: torch.Tensor, q_sin: torch.Tensor, k_cos: torch.Tensor, k_sin: torch.Tensor,
                                     scale: Optional[float]) -> torch.Tensor:
    """``quantized_attention`` of Wan's normed, rotated q and k (``fold_qk_norm_rope``).

    q and k are the projections' outputs [B, S, H·D] before their RMS norms (weights and eps
    ``q_weight``, ``q_eps``, ...), ``q_cos`` / ``q_sin`` (and k's) the halves of the RoPE
    frequencies their rotations read, v [B, H, S, D]. The spec is ``quantized_attention(
    rms_norm_rope(q, q_weight, q_eps, q_cos, q_sin, H), rms_norm_rope(k, ...), v, scale)``
    (``formats.attention.rms_norm_rope``); the output is laid out as ``quantized_attention``'s.

    On CUDA (or the interpreter) one kernel per operand norms, rotates and quantizes
    (``kernels.attention_prologue``); on CPU the spec. Inputs the kernels do not take on the GPU
    run the eager prologue and exact SDPA, with one log line."""
    from .formats.attention import quantized_attention_reference, rms_norm_rope

    heads = v.shape[1]
    if generated_kernels_run_on(q):
        from .kernels import attention, attention_prologue, log_fallback_once

        reason = (attention_prologue.unsupported_reason(q, q_weight, q_cos, q_sin, heads)
                  or attention_prologue.unsupported_reason(k, k_weight, k_cos, k_sin, heads))
        if reason is None:  # the attention's own limits, on the shapes SDPA would get (expanded
            # views of one element: the check reads shapes, dtypes and devices, and allocates nothing)
            b, d = q.shape[0], q.shape[2] // heads
            normed_q, normed_k = (t.new_empty((1, 1, 1, 1)).expand(b, heads, t.shape[1], d) for t in (q, k))
            reason = attention.unsupported_reason(normed_q, normed_k, v)
        if reason is None:
            return attention_prologue.quantized_attention_qk_norm_rope(
                q, k, v, q_weight, k_weight, q_eps, k_eps, q_cos, q_sin, k_cos, k_sin, scale)
        log_fallback_once("quantized_attention_qk_norm_rope runs the eager prologue and exact SDPA", reason)
        attend = torch.nn.functional.scaled_dot_product_attention
    else:
        attend = quantized_attention_reference
    result = attend(rms_norm_rope(q, q_weight, q_eps, q_cos, q_sin, heads),
                    rms_norm_rope(k, k_weight, k_eps, k_cos, k_sin, heads), v, scale=scale)
    return _attention_output(result, v).copy_(result)


@quantized_attention_qk_norm_rope.register_fake
def _quantized_attention_qk_norm_rope_fake(q, k, v, q_weight, k_weight, q_eps, k_eps, q_cos, q_sin, k_cos, k_sin, scale):
    b, h, _, d = v.shape
    return q.new_empty((b, q.shape[1], h, d)).transpose(1, 2)


def _attention_output(q: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    b, h, sq, _ = q.shape
    return q.new_empty((b, sq, h, v.shape[-1])).transpose(1, 2)


QUANTIZED_ATTENTION = torch.ops.sixbit.quantized_attention.default
QUANTIZED_ATTENTION_QK_NORM_ROPE = torch.ops.sixbit.quantized_attention_qk_norm_rope.default
