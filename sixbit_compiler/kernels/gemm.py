"""One scaled-GEMM template: C = (A · Bᵀ) * a_scale * b_scale + bias, cast to C's dtype.

A is [M, K] and B is [N, K], both K-major (row-major with K contiguous): the layout Hopper's
wgmma takes for both operands, and the layout weights are stored in. Operands:

* INT8 x INT8 -> int32 accumulator (exact for K < 133,000), per-token x per-channel scales;
* FP8 e4m3 x e4m3 -> fp32 accumulator (exact products; on Hopper the MMA's own accumulator
  by default, :data:`FP8_FAST_ACCUM`), per-token x per-channel scales;
* bf16/fp16 x bf16/fp16 -> fp32 accumulator (the NVFP4 route: exact block values).

``a_scale`` is per row [M] or a scalar, ``b_scale`` per column [N] or a scalar (constexpr
flags pick). The epilogue (scales, bias, cast) runs on the accumulator in registers, so C is
written once, by masked pointer stores or (``TMA_STORE``) by the copy engine from shared
memory. Autotuned per (N, K, M bucket, TMA alignment of the operands and of C, FP8
accumulation); results are cached on disk where Triton allows.

Two launches of the same tile code: persistent programs (one per SM, tile and K loops
flattened) whose operand tiles arrive through TMA descriptors, the fast one on Hopper; and one
program per tile with pointer loads, for operands TMA cannot read (``docs/kernels.md``).
:func:`launch_gemm` launches either, for this module's kernels and the generated ones.

The main loop and the scaling live in one ``@triton.jit`` function, :func:`scaled_tile`, which
returns the scaled fp32 tile instead of storing it. ``_scaled_gemm_body`` stores it; the
codegen's generated GEMM kernels (``codegen.gemm``) import it and run their
generated epilogue on the tile first: one GEMM main loop, used by both.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os

import torch
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from . import interpreting
from ._common import NO_FMA, next_pow2


#: Set SIXBIT_GEMM_AUTOTUNE=0 to skip autotuning (the first config that takes the operands):
#: tests at small shapes then compile one config per kernel instead of eight.
AUTOTUNE_ENV = "SIXBIT_GEMM_AUTOTUNE"


def _config(m, n, k, warps, stages, fast, store_split=0):
    """``store_split``: 0 stores C with masked pointer stores; 1, 2 or 4 through a TMA
    descriptor, the tile whole or in halves or quarters of its width."""
    extra = {"TMA_STORE": True, "STORE_SPLIT": store_split} if store_split else {}
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8, "PERSISTENT": fast, "TMA": fast, **extra},
                         num_warps=warps, num_stages=stages)


def configs(int8: bool, tma_store: bool = True):
    """The autotuning space. ``int8``: the one-byte operands (INT8 and FP8), whose K tiles are
    twice as long. ``tma_store``: include the configs that store C through a TMA descriptor
    (the codegen's generated kernels store with pointers and leave them out).

    The first ones are persistent programs fed by the copy engine (``PERSISTENT`` and ``TMA``):
    one program per SM walks the tiles (:func:`gemm_grid`) in one flattened loop, so the next
    tile's first loads are in flight while this tile's epilogue runs, and operand tiles arrive
    through TMA descriptors instead of per-thread loads. On the H100 they were 1.60x bf16 cuBLAS
    on average over the six Wan shapes for INT8 against 1.43x for the best one-tile-per-program
    config, and 0.93x against 0.84x for the bf16 template (``docs/kernels.md``). Storing C
    through a descriptor (the copy engine writes it from shared memory while the program goes
    on) gained up to 5 % at K = 1536, and a fourth pipeline stage fits when C goes out in two
    halves; at other shapes the pointer store won as often, so both stay and the autotuner picks.
    TMA needs 16-byte aligned rows, so the pointer configs after them serve the other operands
    (:func:`prune_tma_configs`). Under the interpreter, 64-wide tiles of the fast kinds, several
    tiles per program, so that the CPU tests walk the same paths."""
    if interpreting():
        return [_config(64, 64, 64, 4, 1, True, 2 if tma_store else 0), _config(64, 64, 64, 4, 1, True),
                _config(64, 64, 64, 4, 1, False)]
    bk = 128 if int8 else 64
    fast = [_config(128, 256, bk, 8, 3, True), _config(256, 128, bk, 8, 3, True)]
    if tma_store:
        fast += [_config(128, 256, bk, 8, 3, True, 1), _config(128, 256, bk, 8, 4, True, 2), _config(256, 128, bk, 8, 4, True, 2)]
    return fast + [_config(256, 128, bk, 8, 3, False), _config(128, 256, bk, 8, 3, False), _config(128, 128, bk, 8, 4, False)]


def tma_takes(t: torch.Tensor) -> bool:
    """Whether a [rows, K] operand can be read through a TMA descriptor: a GPU with the copy
    engine (Hopper on) and a Triton that builds descriptors in kernels, a 16-byte aligned base
    and row stride, contiguous rows. Elsewhere the pointer configs run."""
    return (tma_available(t.device) and t.stride(1) == 1 and t.data_ptr() % 16 == 0
            and (t.stride(0) * t.element_size()) % 16 == 0)


def tma_available(device: torch.device) -> bool:
    """In-kernel TMA descriptors: the interpreter, or sm_90+ with a Triton that has them."""
    if interpreting():
        return True
    if device.type != "cuda" or not (hasattr(tl, "make_tensor_descriptor") and hasattr(triton, "set_allocator")):
        return False
    return _capability(_index(device))[0] >= 9


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def prune_tma_configs(configs, named_args, **kwargs):
    """Drop the TMA configs where TMA cannot feed the kernel (``TMA_OK`` false: operands not
    aligned for it, or no descriptors on this GPU; the GEMMs' and the attention kernel's
    autotuners share it), and the TMA-store configs where C cannot take a descriptor store
    (``TMA_STORE_OK``, passed only by kernels that have such configs). Both flags are part of
    the tuning key, so a cached choice never crosses them."""
    return [c for c in configs if (kwargs["TMA_OK"] or not c.kwargs["TMA"])
            and (kwargs.get("TMA_STORE_OK", False) or not c.kwargs.get("TMA_STORE", False))]


def single_config() -> bool:
    """No autotuning: under the interpreter, or with SIXBIT_GEMM_AUTOTUNE=0."""
    return interpreting() or os.environ.get(AUTOTUNE_ENV, "1") == "0"


def launch_gemm(kernel, a, b, m, n, *args, store_to: torch.Tensor | None = None, **kwargs):
    """Launch an autotuned GEMM-template kernel (this module's, or a generated one) on A [m, K]
    and B [n, K]: the grid per config, the TMA alignment flags, Triton's scratch allocator, and
    without autotuning the first config that takes the operands. ``store_to``: C, for kernels
    with TMA-store configs (whether C's rows take a descriptor store)."""
    aligned = tma_takes(a) and tma_takes(b)
    if store_to is not None:
        kwargs["TMA_STORE_OK"] = aligned and tma_takes(store_to)
    grid = gemm_grid(m, n, a.device)

    def launch():
        if not single_config():  # the autotuner skips configs that do not fit the card
            return kernel[grid](a, b, *args, TMA_OK=aligned, **kwargs)
        # A persistent program holds its pipeline and its epilogue's layout change in shared
        # memory at once: with an fp32 output a 128x256 tile needs 272 KB (H100: 227 KB).
        fits = prune_tma_configs(kernel.configs, {}, TMA_OK=aligned, **kwargs)
        for cfg in fits:
            try:
                return kernel.fn[grid](a, b, *args, TMA_OK=aligned, **kwargs, **cfg.all_kwargs())
            except OutOfResources:
                if cfg is fits[-1]:
                    raise

    return launch_with_scratch(launch)


def gemm_grid(m: int, n: int, device: torch.device):
    """The launch grid for a config: one program per output tile, or (``PERSISTENT``) one per
    SM, each walking tiles ``pid, pid + programs, ...``."""
    programs = _program_slots(device)

    def grid(meta):
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        return (min(tiles, programs) if meta["PERSISTENT"] else tiles,)

    return grid


def _program_slots(device: torch.device) -> int:
    """Programs a persistent launch starts: the SM count (a Hopper GEMM tile's pipeline fills
    one SM's shared memory), or 3 under the interpreter (several tiles per program)."""
    if interpreting() or device.type != "cuda":
        return 3
    return _sm_count(_index(device))


def _scratch(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if interpreting() else "cuda")


def launch_with_scratch(launch):
    """Run ``launch()`` with Triton's allocator set to ours: kernels that build TMA descriptors
    in the kernel need a little global scratch. Set in a copied context, so the caller's own
    allocator (Triton's setting is a context variable) is left as it was."""
    if not hasattr(triton, "set_allocator"):  # an older Triton: no TMA configs run (tma_available)
        return launch()

    def inner():
        triton.set_allocator(_scratch)
        return launch()
    return contextvars.copy_context().run(inner)


def autotune_kwargs() -> dict:
    """Extra ``triton.autotune`` arguments: the alignment prune, and tuning results kept across
    processes where the installed Triton can."""
    extra = {"prune_configs_by": {"early_config_prune": prune_tma_configs}}
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        extra["cache_results"] = True
    return extra


#: what the autotuning result depends on (M by power-of-two bucket, so every token count of
#: one resolution shares a choice)
AUTOTUNE_KEY = ["N", "K", "M_BUCKET", "TMA_OK"]


def _autotune(int8: bool):
    return triton.autotune(configs=configs(int8), key=AUTOTUNE_KEY + ["TMA_STORE_OK", "FAST_ACCUM"], **autotune_kwargs())


def m_bucket(m: int) -> int:
    return min(next_pow2(m), 32768)


@triton.jit
def tile_origin(tile_id, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """First row and column of output tile ``tile_id``, numbered in groups of GROUP_M row
    tiles (L2 reuse of B across a group)."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * num_n
    first_m = (tile_id // group) * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + ((tile_id % group) % size_m)
    pid_n = (tile_id % group) // size_m
    return pid_m * BLOCK_M, pid_n * BLOCK_N


@triton.jit
def scaled_tile(
    tile_id, a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
    A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    INT_ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    TMA: tl.constexpr, FAST_ACCUM: tl.constexpr = False,
):
    """Output tile ``tile_id``: (A·Bᵀ) * scales + bias in fp32, with its row and column
    indices (rows past M and columns past N are garbage; the caller masks its store).

    ``TMA``: operand tiles come through descriptors (the copy engine zero-fills past the
    edges); otherwise through pointer loads, rows clamped and K masked. The K-step pointers
    are recomputed from the step, not carried: a persistent program's flattened loop carried
    both pointer tiles across tiles and ran 5-30x slower. The scales and bias are loaded after
    the loop (loaded before it, they gained nothing on the H100 and hold registers through it)."""
    m0, n0 = tile_origin(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    rm = m0 + tl.arange(0, BLOCK_M)
    rn = n0 + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    am = tl.where(rm < M, rm, 0)  # clamp instead of masking rows: loads stay unpredicated
    bn = tl.where(rn < N, rn, 0)
    a_base = a_ptr + am[:, None] * stride_am + rk[None, :]
    b_base = b_ptr + bn[:, None] * stride_bn + rk[None, :]
    if INT_ACC:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if TMA:
        a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[N, K], strides=[stride_bn, 1], block_shape=[BLOCK_N, BLOCK_K])
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kmask = rk[None, :] < K - k * BLOCK_K
        a_ptrs = a_base + k * BLOCK_K
        b_ptrs = b_base + k * BLOCK_K
        if TMA:
            a = a_desc.load([m0, k * BLOCK_K])
            b = b_desc.load([n0, k * BLOCK_K])
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
        elif UPCAST:  # the interpreter's bf16 dot is wrong (and it cannot fill fp8 with 0): fp32 there
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
            # FP8 on Hopper: the MMA keeps ~14 mantissa bits while it accumulates. FAST_ACCUM
            # leaves it there (FP8_FAST_ACCUM); otherwise each BLOCK_K step is promoted into
            # the fp32 accumulator (DeepSeek-V3's recipe). Both ignored for bf16.
            if FAST_ACCUM:
                acc = tl.dot(a, tl.trans(b), acc)
            else:
                acc = tl.dot(a, tl.trans(b), acc, max_num_imprecise_acc=BLOCK_K)

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
def _halves(c, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The left and right halves of a [BLOCK_M, BLOCK_N] tile."""
    return tl.split(tl.permute(tl.reshape(c, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))


@triton.jit
def _store_halves(desc, c, m0, n0, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Store the [BLOCK_M, BLOCK_N] tile c at (m0, n0) as two half-width descriptor stores."""
    left, right = _halves(c, BLOCK_M, BLOCK_N)
    desc.store([m0, n0], left)
    desc.store([m0, n0 + BLOCK_N // 2], right)


@triton.jit
def _scaled_gemm_body(
    a_ptr, b_ptr, c_ptr, a_scale_ptr, b_scale_ptr, bias_ptr,
    M, N, K, M_BUCKET, stride_am, stride_bn, stride_cm,
    A_ROWWISE: tl.constexpr, B_COLWISE: tl.constexpr, HAS_BIAS: tl.constexpr,
    INT_ACC: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, TMA: tl.constexpr, TMA_OK: tl.constexpr,
    TMA_STORE_OK: tl.constexpr = False, FAST_ACCUM: tl.constexpr = False,
    TMA_STORE: tl.constexpr = False, STORE_SPLIT: tl.constexpr = 1,
):
    tl.static_assert(TMA_OK or not TMA, "TMA needs 16-byte aligned operand rows")
    tl.static_assert(TMA_STORE_OK or not TMA_STORE, "a TMA store needs 16-byte aligned rows of C")
    if TMA_STORE:  # the copy engine writes C from shared memory and clips at M and N
        c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                           block_shape=[BLOCK_M, BLOCK_N // STORE_SPLIT])
    # one tile per program, or (PERSISTENT) every programs-th tile; flattening the two loops
    # lets the software pipeliner issue the next tile's first loads before this tile's store
    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):
        c, rm, rn = scaled_tile(
            tile_id, a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K, stride_am, stride_bn,
            A_ROWWISE, B_COLWISE, HAS_BIAS, INT_ACC, UPCAST, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, FAST_ACCUM,
        )
        c = c.to(c_ptr.dtype.element_ty)
        if TMA_STORE:
            m0, n0 = tile_origin(tile_id, M, N, BLOCK_M, BLOCK_N, GROUP_M)
            # in parts of the width: a part's staging buffer in shared memory is what it takes
            if STORE_SPLIT == 2:
                _store_halves(c_desc, c, m0, n0, BLOCK_M, BLOCK_N)
            elif STORE_SPLIT == 4:
                c0, c1 = _halves(c, BLOCK_M, BLOCK_N)
                _store_halves(c_desc, c0, m0, n0, BLOCK_M, BLOCK_N // 2)
                _store_halves(c_desc, c1, m0, n0 + BLOCK_N // 2, BLOCK_M, BLOCK_N // 2)
            else:
                c_desc.store([m0, n0], c)
        else:
            cmask = (rm[:, None] < M) & (rn[None, :] < N)
            tl.store(c_ptr + rm[:, None] * stride_cm + rn[None, :], c, mask=cmask)


_int8_gemm = _autotune(True)(_scaled_gemm_body)
_fp8_gemm = _autotune(True)(_scaled_gemm_body)
_float_gemm = _autotune(False)(_scaled_gemm_body)


#: How the FP8 GEMMs accumulate on Hopper. True: in the MMA's own accumulator through the whole
#: K loop (about 14 mantissa bits kept between MMAs; cuBLAS's fast-accumulation mode, the
#: default of fbgemm's and torchao's FP8 inference). False: promoted into an fp32 accumulator
#: every BLOCK_K (DeepSeek-V3's recipe). On the H100 the promotion cost 20-25 % of the GEMM and
#: kept it under the kernel issue's 1.4x bf16, while the error it removes (0.8-2.9e-3 relative)
#: was at most 11 % of the activation's FP8 quantization error and 3 % of the FP8 tier's at the
#: Wan shapes (docs/kernels.md#fp8-on-hopper-accumulation-precision).
FP8_FAST_ACCUM = True


def scaled_gemm(a, b, a_scale, b_scale, bias=None, out_dtype=torch.bfloat16, fast_accum: bool | None = None):
    """(a [M,K] · b [N,K]ᵀ) * a_scale * b_scale + bias -> [M, N] in out_dtype. ``fast_accum``
    (FP8 only): None takes :data:`FP8_FAST_ACCUM`."""
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1]
    assert a.stride(1) == 1 and b.stride(1) == 1 and a.dtype == b.dtype
    m, k = a.shape
    n = b.shape[0]
    int8, fp8 = a.dtype == torch.int8, a.dtype == torch.float8_e4m3fn
    out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    a_scale = a_scale.reshape(-1) if a_scale.numel() > 1 else a_scale.reshape(())
    b_scale = b_scale.reshape(-1) if b_scale.numel() > 1 else b_scale.reshape(())
    kernel = _int8_gemm if int8 else _fp8_gemm if fp8 else _float_gemm
    launch_gemm(
        kernel, a, b, m, n, out, a_scale, b_scale, bias if bias is not None else out,
        m, n, k, m_bucket(m), a.stride(0), b.stride(0), out.stride(0),
        A_ROWWISE=a_scale.dim() == 1, B_COLWISE=b_scale.dim() == 1, HAS_BIAS=bias is not None,
        INT_ACC=int8, UPCAST=interpreting() and not int8,  # fp8 and bf16 dots: fp32 in the interpreter
        FAST_ACCUM=fp8 and (FP8_FAST_ACCUM if fast_accum is None else fast_accum), store_to=out,
        **NO_FMA,  # the epilogue rounds as separate PyTorch ops would (scale, scale, bias)
    )
    return out
