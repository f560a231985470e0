"""Quantized attention: INT8 Q·Kᵀ, FP8 P·V, fp32 softmax (the SageAttention recipe).

The executable spec of ``kernels.attention`` (``sixbit::quantized_attention``). Inputs are
SDPA's: q [B, H, Sq, D], k and v [B, H, Skv, D], no dropout, not causal, and no mask or a
key-padding one (a boolean [B, 1, 1, Skv]: some keys hidden from every query).

* **K is smoothed.** Its mean over the tokens, μ [B, H, 1, D] in fp32, is subtracted first.
  Every score of a query row then shifts by the same q·μ, which the softmax removes exactly,
  and K's per-token INT8 no longer spends its range on an offset all tokens share (the
  SageAttention paper reports such per-channel offsets in video DiTs' keys).
* **Q and smoothed K: per-token INT8** (:func:`formats.quantize_int8` on rows of D, one scale
  per token and head). Their products are exact in int32.
* **V: FP8 e4m3 per channel** (:func:`formats.quantize_fp8_rows` on Vᵀ): one scale per
  (b, h, d) over all tokens, since P·V sums over tokens. The codes are kept as Vᵀ
  [B, H, D, Skv]: the layout Hopper's FP8 MMA takes for its second operand.
* **Softmax in base 2, online, over blocks of** ``block_n`` **keys**, as the kernel runs it:
  logits = (int32 scores · k_scale) · (q_scale · softmax_scale · log2 e) in fp32; a running
  row max m; p = 2^(logits − m + log2 448) in fp32 (P scaled by 448 to use e4m3's range, the
  factor folded into the exponent); the row sum l adds the fp32 p; P·V multiplies e4m3(p) by
  the V codes with fp32 accumulation. Output = acc / l · v_scale.
  (The kernel's exp2 is the GPU's approximate one and its sums run in another order, so it
  matches this spec within a tolerance, not bit for bit.)

NaN follows SDPA: a NaN in a query row makes that output row NaN; in a key, every output of
its head (the softmax of every row sees it); in a value channel, that output channel. An all-zero
query row, or keys that are all equal, attend uniformly, as in exact attention.
"""

from __future__ import annotations

import math

import torch

from .fp8 import FP8_E4M3_MAX, quantize_fp8_rows
from .int8 import quantize_int8

LOG2E = math.log2(math.e)
#: P lies in [0, 1]; 448 · P uses e4m3's whole range before it is rounded
P_SCALE = FP8_E4M3_MAX
#: keys per block of the online softmax (the kernel's BLOCK_N on the GPU)
BLOCK_N = 128
#: head dims the kernels take (one power-of-two tile holds a row of D)
HEAD_DIMS = (16, 32, 64, 128, 256)


def head_dim_supported(d: int) -> bool:
    return d in HEAD_DIMS


def key_padding_mask(mask, b: int, skv: int):
    """SDPA's boolean ``attn_mask`` as a per-key mask [B or 1, Skv] if it is one (shape
    [B or 1, 1, 1, Skv]: the same keys hidden from every head and query), else None. Works on
    example values with symbolic sizes too (compared, never converted with int())."""
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or mask.dim() != 4:
        return None
    if mask.shape[1] != 1 or mask.shape[2] != 1 or mask.shape[3] != skv or (mask.shape[0] != 1 and mask.shape[0] != b):
        return None
    return mask[:, 0, 0, :]


def key_mean(k: torch.Tensor) -> torch.Tensor:
    """μ = mean of k over its tokens, fp32 [B, H, 1, D] (NaN and ±Inf propagate), accumulated
    in fp32 without an fp32 copy of k."""
    return k.mean(dim=-2, keepdim=True, dtype=torch.float32)


def rms_norm_rope(x: torch.Tensor, weight: torch.Tensor | None, eps: float | None, cos: torch.Tensor,
                  sin: torch.Tensor, heads: int) -> torch.Tensor:
    """Wan's q / k prologue, written as diffusers' ``WanAttnProcessor`` computes it (the spec of
    ``sixbit::quantized_attention_qk_norm_rope``, folded by ``fold_qk_norm_rope``).

    x [B, S, H·D] (a projection's output) -> RMS norm over its whole width (every head, as Wan's
    ``rms_norm_across_heads``), split into H heads, rotated (RoPE) on interleaved pairs: for
    x1 = n[..., 0::2], x2 = n[..., 1::2], out[..., 0::2] = x1·cos − x2·sin and out[..., 1::2] =
    x1·sin + x2·cos, with ``cos`` = freqs_cos[..., 0::2] and ``sin`` = freqs_sin[..., 1::2]
    ([.., S, .., D/2], broadcast over [B, S, H, D/2]). Returns [B, H, S, D] in x's dtype (a
    permuted view, as SDPA receives it). Rounding: the norm's output is rounded to x's dtype,
    the rotation computes in the promoted dtype (fp32 with Wan's fp32 frequencies) and is rounded
    to x's dtype again."""
    n = torch.rms_norm(x, (x.shape[-1],), weight, eps).unflatten(2, (heads, -1))
    x1, x2 = n.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(n)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.permute(0, 2, 1, 3)


def quantize_queries(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, S, D] -> (int8 codes [B, H, S, D], fp32 scale [B, H, S, 1]): per-token INT8."""
    return quantize_int8(q)


def quantize_keys(k: torch.Tensor, mean: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k [B, H, S, D] minus its token mean (:func:`key_mean`), per-token INT8."""
    return quantize_int8(k.float() - mean)


def quantize_values(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """v [B, H, S, D] -> (float8_e4m3fn codes of Vᵀ [B, H, D, S], fp32 scale [B, H, D, 1])."""
    return quantize_fp8_rows(v.transpose(-1, -2))


def quantized_attention_reference(q, k, v, scale: float | None = None, block_n: int = BLOCK_N,
                                  key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """The quantized attention of q, k, v (see the module docstring), in q's dtype.

    ``key_mask``: bool [B, Skv] (or [1, Skv]), False for keys no query may attend to (SDPA's
    boolean ``attn_mask`` of shape [B, 1, 1, Skv], e.g. HunyuanVideo's text padding). A masked
    key takes no part in the max and gets p = 0; a block with no key left changes nothing; a row
    with no key at all is NaN, as in SDPA. Masked keys still count in K's mean and V's scales."""
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    q_codes, q_scale = quantize_queries(q)
    k_codes, k_scale = quantize_keys(k, key_mean(k))
    vt_codes, v_scale = quantize_values(v)
    # exact: |Σ codes·codes| <= 127² · D < 2²⁴ for D <= 256, so fp32 products sum exactly
    qf, kf, vtf = q_codes.float(), k_codes.float(), vt_codes.float()
    row_factor = q_scale * torch.tensor(scale * LOG2E, dtype=torch.float32, device=q.device)  # [B, H, Sq, 1]
    log2_p_scale = torch.tensor(math.log2(P_SCALE), dtype=torch.float32, device=q.device)
    shape = q.shape[:-1] + (1,)
    m = torch.full(shape, float("-inf"), device=q.device)
    l = torch.zeros(shape, device=q.device)
    acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for n0 in range(0, k.shape[-2], block_n):
        scores = qf @ kf[..., n0:n0 + block_n, :].transpose(-1, -2)
        logits = (scores * k_scale[..., n0:n0 + block_n, :].transpose(-1, -2)) * row_factor
        if key_mask is None:
            m_new = torch.maximum(m, logits.amax(dim=-1, keepdim=True))
            p = torch.exp2(logits - (m_new - log2_p_scale))  # in [0, 448]
            alpha = torch.exp2(m - m_new)
        else:
            valid = key_mask[:, None, None, n0:n0 + block_n]
            m_new = torch.maximum(m, torch.where(valid, logits, float("-inf")).amax(dim=-1, keepdim=True))
            p = torch.where(valid, torch.exp2(logits - (m_new - log2_p_scale)), 0.0)
            alpha = torch.where(m == m_new, 1.0, torch.exp2(m - m_new))  # no NaN while both are -inf
        l = l * alpha + p.sum(dim=-1, keepdim=True)
        p8 = p.clamp(max=P_SCALE).to(torch.float8_e4m3fn).float()
        acc = acc * alpha + p8 @ vtf[..., n0:n0 + block_n].transpose(-1, -2)
        m = m_new
    out = acc / l * v_scale.transpose(-1, -2)
    if key_mask is not None:  # l = 0 only where every key is hidden (else l >= 448): 0, as SDPA gives
        out = torch.where(l == 0, 0.0, out)
    return out.to(q.dtype)
