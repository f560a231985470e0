"""Quantized attention on the GPU: INT8 Q·Kᵀ, FP8 P·V (spec: ``formats.attention``).

Three steps, each one pass over its tensor:

* ``_qk_rows_kernel``: Q, and K minus its token mean, to per-token INT8 codes and scales, read
  through SDPA's strides (Wan's q/k/v are transposed views) and written contiguous, tokens
  padded to a multiple of 128 with zero codes;
* ``_v_kernel``: V to FP8 e4m3 per channel, written transposed (Vᵀ [B, H, D, S]), the
  operand layout Hopper's FP8 MMA takes for P·V;
* ``_attention_kernel``: one program per (128 queries, head): the flash-attention loop over
  key blocks with an INT8 MMA for the scores and an FP8 MMA for P·V, the softmax in fp32.

Why: on the H100 attention is over half of a Wan block (docs/benchmarks.md), and INT8 and
FP8 MMAs run at twice bf16's rate. The padding lets the main loop load unmasked (a key past
the end has zero codes and its logit is masked to −inf).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..formats._common import div_exact
from ..formats.attention import HEAD_DIMS, LOG2E, P_SCALE, key_mean
from ..formats.fp8 import FP8_E4M3_MAX
from . import interpreting
from ._common import NO_FMA, encode_rows, encode_rows_hw, int8_rows, round_to_e4m3, saturate
from .gemm import autotune_kwargs, launch_with_scratch, prune_tma_configs, single_config, tma_available

#: tokens are padded to a multiple of this (the largest BLOCK_M / BLOCK_N of the configs)
TOKEN_PAD = 128
LOG2_P_SCALE = tl.constexpr(math.log2(P_SCALE))
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_QUANT_ROWS = 64  # tokens per program of the quantization kernels


@triton.jit
def _token_tile(stride_b, stride_h, H, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr):
    """This program's (batch · head) index, the offset of its head in the input, and its token
    and channel indices (the quantization kernels' grid: token tiles × heads)."""
    bh = tl.program_id(1)
    head = (bh // H).to(tl.int64) * stride_b + (bh % H) * stride_h
    return bh, head, tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S), tl.arange(0, HEAD_DIM)


@triton.jit
def _qk_rows_kernel(
    x_ptr, mean_ptr, codes_ptr, scale_ptr, H, S, S_PAD, stride_b, stride_h, stride_s, stride_d, limit,
    HAS_MEAN: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Per-token INT8 of x[b, h] (minus mean[b, h] if HAS_MEAN) into codes [B·H, S_PAD, D]."""
    bh, head, s, d = _token_tile(stride_b, stride_h, H, BLOCK_S, HEAD_DIM)
    ok = s < S
    x = tl.load(x_ptr + head + s[:, None] * stride_s + d[None, :] * stride_d, mask=ok[:, None], other=0.0).to(tl.float32)
    if HAS_MEAN:
        x = tl.where(ok[:, None], x - tl.load(mean_ptr + bh * HEAD_DIM + d)[None, :], 0.0)
    x = saturate(x, limit)
    q, scale, _, _ = int8_rows(x)
    row = bh.to(tl.int64) * S_PAD + s
    tl.store(codes_ptr + row[:, None] * HEAD_DIM + d[None, :], q.to(tl.int8))
    tl.store(scale_ptr + row, scale)


@triton.jit
def _v_kernel(
    v_ptr, inv_ptr, codes_ptr, H, S, S_PAD, stride_b, stride_h, stride_s, stride_d, limit,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, HW_CVT: tl.constexpr,
):
    """e4m3 codes of v[b, h] · inv[b, h, d], stored transposed into codes [B·H, D, S_PAD]."""
    bh, head, s, d = _token_tile(stride_b, stride_h, H, BLOCK_S, HEAD_DIM)
    x = tl.load(v_ptr + head + s[None, :] * stride_s + d[:, None] * stride_d,
                mask=(s < S)[None, :], other=0.0).to(tl.float32)  # [D, BLOCK_S]: rows are channels
    inv = tl.load(inv_ptr + bh * HEAD_DIM + d)
    if HW_CVT:
        codes = encode_rows_hw(x, inv, True)
    else:
        codes = encode_rows(saturate(x, limit), inv, True)
    row = bh.to(tl.int64) * HEAD_DIM + d
    tl.store(codes_ptr + row[:, None] * S_PAD + s[None, :], codes.to(tl.uint8))


@triton.jit
def _attend(acc, m_i, l_i, q, row_factor, k_desc, k_base, ks_base, vt_desc, vt_base, mask_base, kv_row, vt_row, n0,
            SKV, S_PAD_KV, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
            UPCAST: tl.constexpr, TMA: tl.constexpr, KEY_MASK: tl.constexpr):
    """One block of BLOCK_N keys of the online softmax (``formats.attention``'s loop body).

    Per score: int32 -> fp32, times the key's scale, a max, one FMA and one exp2: the query's
    scale, softmax scale, log2(e) and P's factor 448 all sit in the FMA's row terms."""
    cols = n0 + tl.arange(0, BLOCK_N)
    d = tl.arange(0, HEAD_DIM)
    if TMA:
        k = k_desc.load([kv_row + n0, 0])
    else:
        k = tl.load(k_base + cols[:, None] * HEAD_DIM + d[None, :])
    t = tl.dot(q, tl.trans(k), out_dtype=tl.int32).to(tl.float32) * tl.load(ks_base + cols)[None, :]
    if MASKED:  # keys past the end (zero codes, padding) or hidden by the key mask: no part in
        # the max, p = 0 (the mask is zero past the end too)
        if KEY_MASK:
            valid = (tl.load(mask_base + cols) != 0)[None, :]
        else:
            valid = (cols < SKV)[None, :]
        t_max = tl.max(tl.where(valid, t, float("-inf")), axis=1)
    else:
        t_max = tl.max(t, axis=1)
    # row_factor >= 0, so the row max of the logits t · row_factor is row_factor · max(t)
    if KEY_MASK:  # a block may hide every key: keep its max -inf (not -inf · 0 = NaN)
        m_new = tl.maximum(m_i, tl.where(t_max == float("-inf"), float("-inf"), t_max * row_factor))
    else:
        m_new = tl.maximum(m_i, t_max * row_factor)
    p = tl.math.exp2(t * row_factor[:, None] - (m_new - LOG2_P_SCALE)[:, None])  # 448 · 2^(logit - max)
    if MASKED:
        p = tl.where(valid, p, 0.0)
    if KEY_MASK:  # no key seen yet: m_i = m_new = -inf, and exp2(-inf + inf) would be NaN
        alpha = tl.where(m_i == m_new, 1.0, tl.math.exp2(m_i - m_new))
    else:
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None]
    if TMA:
        vt = vt_desc.load([vt_row, n0])
    else:
        vt = tl.load(vt_base + d[:, None] * S_PAD_KV + cols[None, :])  # [D, BLOCK_N] e4m3, keys contiguous
    if UPCAST:  # the interpreter: fp8 rounding by hand, the dot in fp32 (exact values, same sums)
        acc += tl.dot(round_to_e4m3(p), tl.trans(vt.to(tl.float32)))
    else:
        acc += tl.dot(p.to(tl.float8e4nv), tl.trans(vt))
    return acc, m_new, l_i


def _config(bm, bn, warps, stages, tma):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "TMA": tma}, num_warps=warps, num_stages=stages)


def _configs():
    """The autotuning space. On the H100 (benchmarks/attention.py) 64 query rows and 4 warps
    were fastest at head dim 128, 128 x 64 at head dim 64."""
    if interpreting():
        return [_config(32, 32, 4, 1, True), _config(32, 32, 4, 1, False)]
    return [_config(64, 128, 4, 3, True), _config(64, 128, 4, 3, False), _config(128, 128, 8, 3, True),
            _config(128, 64, 4, 3, True), _config(128, 64, 4, 3, False), _config(64, 128, 4, 4, True)]


# (autotune_kwargs: the TMA prune, and the choice kept across processes like the GEMM's)
@triton.autotune(configs=_configs(), key=["HEAD_DIM", "SQ_BUCKET", "SKV_BUCKET", "TMA_OK", "KEY_MASK"],
                 **autotune_kwargs())
@triton.jit
def _attention_kernel(
    q_ptr, qs_ptr, k_ptr, ks_ptr, vt_ptr, vs_ptr, o_ptr, mask_ptr, softmax_factor,
    H, SQ, SKV, S_PAD_Q, S_PAD_KV, stride_ob, stride_oh, stride_os, stride_mask_b, SQ_BUCKET, SKV_BUCKET,
    HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, TMA_OK: tl.constexpr, KEY_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr,
):
    """One program: BLOCK_M queries of one (batch, head) against all its keys. ``TMA``: key and
    value tiles arrive through descriptors (the codes' rows are 16-byte multiples by padding)."""
    tl.static_assert(TMA_OK or not TMA, "TMA descriptors need sm_90+")
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_row = bh.to(tl.int64) * S_PAD_Q + rows
    q = tl.load(q_ptr + q_row[:, None] * HEAD_DIM + d[None, :])
    row_factor = tl.load(qs_ptr + q_row) * softmax_factor  # q_scale · softmax scale · log2(e)
    kv_row = bh * S_PAD_KV
    vt_row = bh * HEAD_DIM
    k_base = k_ptr + kv_row.to(tl.int64) * HEAD_DIM
    ks_base = ks_ptr + kv_row.to(tl.int64)
    vt_base = vt_ptr + vt_row.to(tl.int64) * S_PAD_KV
    k_desc = None
    vt_desc = None
    if TMA:
        total = tl.num_programs(1)
        k_desc = tl.make_tensor_descriptor(k_ptr, shape=[total * S_PAD_KV, HEAD_DIM], strides=[HEAD_DIM, 1],
                                           block_shape=[BLOCK_N, HEAD_DIM])
        vt_desc = tl.make_tensor_descriptor(vt_ptr, shape=[total * HEAD_DIM, S_PAD_KV], strides=[S_PAD_KV, 1],
                                            block_shape=[HEAD_DIM, BLOCK_N])
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), dtype=tl.float32)
    mask_base = mask_ptr + b.to(tl.int64) * stride_mask_b
    if KEY_MASK:  # every block may hide keys
        for n0 in range(0, SKV, BLOCK_N):
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, row_factor, k_desc, k_base, ks_base, vt_desc, vt_base, mask_base,
                                    kv_row, vt_row, n0, SKV, S_PAD_KV, HEAD_DIM, BLOCK_N, True, UPCAST, TMA, True)
    else:  # full blocks unmasked, the last (partial) one masked
        n_full = (SKV // BLOCK_N) * BLOCK_N
        for n0 in range(0, n_full, BLOCK_N):
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, row_factor, k_desc, k_base, ks_base, vt_desc, vt_base, mask_base,
                                    kv_row, vt_row, n0, SKV, S_PAD_KV, HEAD_DIM, BLOCK_N, False, UPCAST, TMA, False)
        if n_full < SKV:
            acc, m_i, l_i = _attend(acc, m_i, l_i, q, row_factor, k_desc, k_base, ks_base, vt_desc, vt_base, mask_base,
                                    kv_row, vt_row, n_full, SKV, S_PAD_KV, HEAD_DIM, BLOCK_N, True, UPCAST, TMA, False)
    out = acc / l_i[:, None] * tl.load(vs_ptr + bh * HEAD_DIM + d)[None, :]
    if KEY_MASK:  # l = 0 only where every key is hidden (else l >= 448): 0, as SDPA gives
        out = tl.where((l_i == 0.0)[:, None], 0.0, out)
    o = o_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + rows[:, None] * stride_os + d[None, :]
    tl.store(o, out.to(o_ptr.dtype.element_ty), mask=(rows < SQ)[:, None])


def unsupported_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these SDPA inputs, or None."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        return f"{q.dim()}-d inputs (the kernels take [B, H, S, D])"
    if q.dtype not in _DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        return f"shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)} (grouped or differing heads)"
    if q.shape[-1] not in HEAD_DIMS:
        return f"head dim {q.shape[-1]} (the kernels take {HEAD_DIMS})"
    if q.numel() == 0 or k.numel() == 0:
        return "empty input"
    if q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        return "a GPU without FP8 tensor cores (sm_89+)"
    if q.is_cuda and q.shape[-1] < 32:
        return f"head dim {q.shape[-1]} on the GPU (its INT8 MMA takes K >= 32)"
    return None


def _pad(s: int) -> int:
    return -(-s // TOKEN_PAD) * TOKEN_PAD


def quantize_qk(x: torch.Tensor, mean: torch.Tensor | None):
    """x [B, H, S, D] (any strides), minus ``mean`` [B, H, 1, D] fp32 if given -> (int8 codes
    [B, H, S_pad, D], fp32 scale [B, H, S_pad]); rows past S are zero. Equals
    ``formats.attention.quantize_queries`` / ``quantize_keys`` on the first S rows."""
    b, h, s, d = x.shape
    s_pad = _pad(s)
    codes = torch.empty((b, h, s_pad, d), dtype=torch.int8, device=x.device)
    scale = torch.empty((b, h, s_pad), dtype=torch.float32, device=x.device)
    # the smoothed keys are fp32, so they saturate at fp32's limit, as the spec's fp32 tensor does
    limit = torch.finfo(torch.float32 if mean is not None else x.dtype).max
    _qk_rows_kernel[(s_pad // _QUANT_ROWS, b * h)](
        x, mean.contiguous() if mean is not None else x, codes, scale, h, s, s_pad, *x.stride(), limit,
        HAS_MEAN=mean is not None, HEAD_DIM=d, BLOCK_S=_QUANT_ROWS, num_warps=4, **NO_FMA,
    )
    return codes, scale


def value_scales(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, 1/scale) [B, H, D] fp32 of V per channel, as ``formats.quantize_fp8_rows`` on Vᵀ,
    without an fp32 copy of V: min and max over the tokens in V's dtype (exact) in one reduction
    (``aminmax``: one read of V, where ``amax`` and ``amin`` took two: 156 against 373 µs at W-14B
    on an H100, ``benchmarks/value_range.py``), NaN kept by it. (The spec's codes of a NaN channel are those of its other values;
    here they are scaled by 1: either way its NaN scale makes that output channel NaN.)"""
    limit = torch.finfo(v.dtype).max
    low, high = torch.aminmax(v, dim=-2)
    amax = torch.maximum(high.abs(), low.abs()).float()
    has_nan = torch.isnan(amax)
    amax = torch.where(has_nan, torch.zeros_like(amax), amax.clamp(max=limit))
    scale = div_exact(amax, FP8_E4M3_MAX)
    inv = torch.ones_like(scale) / torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch.where(has_nan, torch.full_like(scale, float("nan")), scale), inv


def quantize_v(v: torch.Tensor):
    """v [B, H, S, D] -> (e4m3 codes of Vᵀ as uint8 [B, H, D, S_pad], fp32 scale [B, H, D])."""
    b, h, s, d = v.shape
    s_pad = _pad(s)
    scale, inv = value_scales(v)
    codes = torch.empty((b, h, d, s_pad), dtype=torch.uint8, device=v.device)
    _v_kernel[(s_pad // _QUANT_ROWS, b * h)](
        v, inv, codes, h, s, s_pad, *v.stride(), torch.finfo(v.dtype).max,
        HEAD_DIM=d, BLOCK_S=_QUANT_ROWS, HW_CVT=not interpreting(), num_warps=4, **NO_FMA,
    )
    return codes, scale


def _bucket(n: int) -> int:
    return min(1 << max(0, (n - 1).bit_length()), 65536)


def quantized_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                        config: triton.Config | None = None, key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``formats.attention.quantized_attention_reference`` on the GPU (or the interpreter).
    ``config``: one of ``_attention_kernel.configs`` instead of the autotuner's (tests, sweeps).
    ``key_mask``: bool [B or 1, Skv], False for keys hidden from every query.

    The output is [B, H, Sq, D] laid out as [B, Sq, H, D], like the flash SDPA backends', so
    the usual ``transpose(1, 2).flatten(2)`` after attention is free."""
    q_codes, q_scale = quantize_qk(q, None)
    k_codes, k_scale = quantize_qk(k, key_mean(k))
    vt_codes, v_scale = quantize_v(v)
    return attend(q_codes, q_scale, k_codes, k_scale, vt_codes, v_scale, q.shape[-2], k.shape[-2], q.dtype, scale,
                  config, key_mask)


def attend(q_codes, q_scale, k_codes, k_scale, vt_codes, v_scale, sq: int, skv: int, dtype: torch.dtype,
           scale: float | None = None, config: triton.Config | None = None,
           key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The attention kernel on quantized operands (:func:`quantize_qk` / :func:`quantize_v`'s
    outputs, or ``attention_prologue``'s): the output [B, H, Sq, D] in ``dtype``, laid out as
    [B, Sq, H, D]."""
    b, h, _, d = q_codes.shape
    softmax_factor = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    out = torch.empty((b, sq, h, d), dtype=dtype, device=q_codes.device).transpose(1, 2)
    upcast = interpreting()
    tma_ok = tma_available(q_codes.device)
    s_pad_kv = k_codes.shape[2]
    if key_mask is not None:  # uint8 [B or 1, S_pad], zero past the end
        mask = torch.zeros((key_mask.shape[0], s_pad_kv), dtype=torch.uint8, device=q_codes.device)
        mask[:, :skv] = key_mask
        mask_stride = mask.stride(0) if mask.shape[0] > 1 else 0
    else:
        mask, mask_stride = v_scale, 0  # any pointer: never read
    args = (q_codes, q_scale, k_codes, k_scale, vt_codes.view(torch.float8_e4m3fn), v_scale, out, mask, softmax_factor,
            h, sq, skv, q_codes.shape[2], s_pad_kv, out.stride(0), out.stride(1), out.stride(2), mask_stride,
            _bucket(sq), _bucket(skv))

    def grid(meta):
        return (triton.cdiv(sq, meta["BLOCK_M"]), b * h)

    def launch():
        if not single_config():
            return _attention_kernel[grid](*args, HEAD_DIM=d, UPCAST=upcast, TMA_OK=tma_ok, KEY_MASK=key_mask is not None)
        cfg = config or prune_tma_configs(_attention_kernel.configs, {}, TMA_OK=tma_ok)[0]
        return _attention_kernel.fn[grid](*args, HEAD_DIM=d, UPCAST=upcast, TMA_OK=tma_ok, KEY_MASK=key_mask is not None,
                                          **cfg.all_kwargs())

    launch_with_scratch(launch)
    return out


__all__ = ["P_SCALE", "attend", "quantize_qk", "quantize_v", "quantized_attention", "unsupported_reason",
           "value_scales"]
