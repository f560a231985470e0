"""One scaled-GEMM template: C = (A · Bᵀ) * a_scale * b_scale + bias, cast to C's dtype.

A is [M, K] and B is [N, K], both K-major (row-major with K contiguous): the layout Hopper's
wgmma takes for both operands, and the layout weights are stored in. Operands:

* INT8 x INT8 -> int32 accumulator (exact for K < 133,000), per-token x per-channel scales;
* FP8 e4m3 x e4m3 -> fp32 accumulator (exact products), per-token x per-channel scales;
* bf16/fp16 x bf16/fp16 -> fp32 accumulator (the NVFP4 route: exact block values).

``a_scale`` is per row [M] or a scalar, ``b_scale`` per column [N] or a scalar (constexpr
flags pick). The epilogue (scales, bias, cast) runs on the accumulator in registers, so C is
written once. Autotuned per (N, K, M bucket); results are cached on disk where Triton allows.

The main loop and the scaling live in one ``@triton.jit`` function, :func:`scaled_tile`, which
returns the scaled fp32 tile instead of storing it. ``_scaled_gemm_body`` stores it; the
codegen's generated GEMM kernels (``sixbit_compiler.codegen.gemm``) import it and run their
generated epilogue on the tile first: one GEMM main loop, used by both.
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from . import interpreting
from ._common import NO_FMA, next_pow2


#: Set SIXBIT_GEMM_AUTOTUNE=0 to skip autotuning (one good Hopper tile): tests at small shapes
#: then compile one config per kernel instead of seven.
AUTOTUNE_ENV = "SIXBIT_GEMM_AUTOTUNE"


def configs(int8: bool):
    """The autotuning space (Hopper tiles; one big tile under the interpreter). ``int8``: the
    one-byte operands (INT8 and FP8), whose K tiles are twice as long."""
    if interpreting():  # the interpreter is slow with small blocks; one big tile
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=1)]
    bk = 128 if int8 else 64
    if os.environ.get(AUTOTUNE_ENV, "1") == "0":
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=8, num_stages=3)]
    shapes = [(128, 256, bk, 8, 3), (256, 128, bk, 8, 3), (128, 128, bk, 8, 4), (128, 128, bk, 4, 4), (128, 256, bk // 2, 8, 4)]
    if int8:  # deeper pipelines: an int8 stage of 256x128x128 is 48 KB of shared memory
        shapes += [(256, 128, bk, 8, 4), (128, 256, bk, 8, 4)]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for m, n, k, w, s in shapes
    ]


def autotune_kwargs() -> dict:
    """Extra ``triton.autotune`` arguments: keep tuning results across processes where the
    installed Triton can."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        return {"cache_results": True}
    return {}


#: what the autotuning result depends on (M by power-of-two bucket, so every token count of
#: one resolution shares a choice)
AUTOTUNE_KEY = ["N", "K", "M_BUCKET"]


def _autotune(int8: bool):
    return triton.autotune(configs=configs(int8), key=AUTOTUNE_KEY, **autotune_kwargs())


def m_bucket(m: int) -> int:
    return min(next_pow2(m), 32768)


@triton.jit
def scaled_tile(
    a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
    A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    INT_ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """This program's output tile: (A·Bᵀ) * scales + bias in fp32, with its row and column
    indices (rows past M and columns past N are garbage; the caller masks its store)."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((pid % group) % size_m)
    pid_n = (pid % group) // size_m

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    am = tl.where(rm < M, rm, 0)  # clamp instead of masking rows: loads stay unpredicated
    bn = tl.where(rn < N, rn, 0)
    a_ptrs = a_ptr + am[:, None] * stride_am + rk[None, :]
    b_ptrs = b_ptr + bn[:, None] * stride_bn + rk[None, :]
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk[None, :] < K - k * BLOCK_K
        if UPCAST:  # the interpreter's bf16 dot is wrong (and it cannot fill fp8 with 0): fp32 there
            a = tl.where(kmask, tl.load(a_ptrs, mask=kmask).to(tl.float32), 0.0)
            b = tl.where(kmask, tl.load(b_ptrs, mask=kmask).to(tl.float32), 0.0)
        elif INT_ACC:
            a = tl.load(a_ptrs, mask=kmask, other=0)
            b = tl.load(b_ptrs, mask=kmask, other=0)
        else:  # bf16 / fp8: a float zero (Triton casts no integer to fp8)
            a = tl.load(a_ptrs, mask=kmask, other=0.0)
            b = tl.load(b_ptrs, mask=kmask, other=0.0)
        if INT_ACC:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=tl.int32)
        else:
            # FP8 on Hopper: the MMA keeps ~14 mantissa bits while it accumulates; promote into
            # the fp32 accumulator once per BLOCK_K (DeepSeek-V3's recipe). Ignored for bf16.
            acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    c = acc.to(tl.float32)
    if A_ROWWISE:
        c = c * tl.load(a_scale_ptr + rm, mask=rm < M, other=0.0)[:, None]
    else:
        c = c * tl.load(a_scale_ptr)
    if B_COLWISE:
        c = c * tl.load(b_scale_ptr + rn, mask=rn < N, other=0.0)[None, :]
    else:
        c = c * tl.load(b_scale_ptr)
    if HAS_BIAS:
        c = c + tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    return c, rm, rn


@triton.jit
def _scaled_gemm_body(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
    A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    INT_ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    c, rm, rn = scaled_tile(
        a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
        A_ROWWISE, B_COLWISE, HAS_BIAS, INT_ACC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
    )
    cmask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], c.to(c_ptr.dtype.element_ty), mask=cmask)


_int8_gemm = _autotune(True)(_scaled_gemm_body)
_fp8_gemm = _autotune(True)(_scaled_gemm_body)
_float_gemm = _autotune(False)(_scaled_gemm_body)


def scaled_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16):
    """(a [M,K] · b [N,K]ᵀ) * a_scale * b_scale + bias -> [M, N] in out_dtype."""
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1]
    assert a.stride(1) == 1 and b.stride(1) == 1 and a.dtype == b.dtype
    m, k = a.shape
    n = b.shape[0]
    int8, fp8 = a.dtype == torch.int8, a.dtype == torch.float8_e4m3fn
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_scale = a_scale.reshape(-1) if a_scale.numel() > 1 else a_scale.reshape(())
    b_scale = b_scale.reshape(-1) if b_scale.numel() > 1 else b_scale.reshape(())
    kernel = _int8_gemm if int8 else _fp8_gemm if fp8 else _float_gemm
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    kernel[grid](
        a, b, out, a_scale, b_scale, bias if bias is not None else out,
        m, n, k, m_bucket(m), a.stride(0), b.stride(0), out.stride(0),
        A_ROWWISE=a_scale.dim() == 1, B_COLWISE=b_scale.dim() == 1, HAS_BIAS=bias is not None,
        INT_ACC=int8, UPCAST=interpreting() and not int8,  # fp8 and bf16 dots: fp32 in the interpreter
        **NO_FMA,  # the epilogue rounds as separate PyTorch ops would (scale, scale, bias)
    )
    return out
