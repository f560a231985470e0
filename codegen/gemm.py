"""Generated INT8 / FP8 GEMM kernels with the region's epilogue fused: the kernel issue's GEMM as a template.

A GEMM's epilogue chain (``fuse_regions``: bias-free adds and muls such as AdaLN's gate and the
residual add, GELU, casts) becomes the tail of the GEMM kernel itself. The generated kernel
calls ``sixbit_compiler.kernels.gemm.scaled_tile`` — the same main loop and scaling the
hand-written INT8 GEMM uses, imported rather than copied — and runs the chain's expression
lines (``codegen.pointwise.chain_lines``) on the fp32 tile in registers before one store. The
GEMM output and every intermediate of the chain never reach HBM.

Numerics: the tile is rounded to the GEMM node's dtype first and each op after it to its
node's dtype, exactly where eager rounds, so the fused kernel computes what the unfused INT8
path computes (the GEMM's bf16 output, then the chain). Kernels launch with FMA contraction
off, so that ``a * b + c`` rounds twice on the GPU as two PyTorch ops do.

Indexing: the output is the GEMM's [*lead, N] (contiguous); the tile covers rows ``row`` of the
flattened leading dims and columns ``col``. Each extra input (the residual, a gate broadcast
over tokens with stride 0) is read at a sympy offset of (row, col) through the leading sizes
and its own strides, all kernel arguments: one kernel serves every token count.

INT8 and FP8 activations take the fused kernel (the precision is read per call); NVFP4 and
bf16 run ``sixbit::quantized_linear`` and then the same chain as a standalone pointwise kernel
(:attr:`GemmEpilogueKernel.alone`).
"""

from __future__ import annotations

import dataclasses

import sympy
import torch
import torch.fx as fx

from .pointwise import (
    TL_DTYPES, PointwiseKernel, Unsupported, _coordinates, _rank, data_inputs, emit_pointwise,
    chain_lines, input_offsets, input_parameters, is_row_norm, layout_args, load_kernel, load_lines, named_source,
    rounded, source_head, value_dtype,
)


@dataclasses.dataclass
class GemmEpilogueKernel:
    name: str
    source: str
    gemm: str  # FX name of the GEMM node the chain reads
    inputs: list[str]  # FX names of the chain's other tensor inputs, in argument order
    output: str
    output_dtype: torch.dtype
    rank: int
    alone: PointwiseKernel  # the chain by itself, reading the GEMM's output (NVFP4 / bf16 calls)
    key: str = ""  # hash of the source without comments (pointwise.named_source)


def emit_gemm_epilogue(gemm: fx.Node, chain: list[fx.Node], prefix: str = "gemm_epilogue") -> GemmEpilogueKernel:
    """Triton source of an INT8 / FP8 GEMM whose output feeds ``chain`` (graph order, elementwise),
    computing ``chain[-1]``. Raises :class:`Unsupported` for an op with no translation or a
    chain whose output is not the GEMM's shape."""
    if not chain:
        raise Unsupported("empty epilogue")
    if any(is_row_norm(n) for n in chain):
        raise Unsupported("a row norm cannot run on a GEMM tile")
    rank = _rank(gemm)
    if _rank(chain[-1]) != rank or rank < 2:
        raise Unsupported(f"{chain[-1].name}: the chain's output does not have the GEMM's rank")
    extras = [a for a in data_inputs(chain) if a is not gemm]
    sizes = [sympy.Symbol(f"size{d}", integer=True, positive=True) for d in range(rank)]
    row, col = sympy.Symbol("row", integer=True, nonnegative=True), sympy.Symbol("col", integer=True, nonnegative=True)
    offsets = input_offsets(_coordinates(row, sizes[:-1]) + [col], len(extras))

    var = {a: f"in{j}" for j, a in enumerate(extras)}
    var[gemm] = "g"
    pointers, layout, same = input_parameters(len(extras), sizes, rank)
    constexprs = ["INDEX_64", "HAS_BIAS", "INT_ACC", "UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M",
                  "FAST_ACCUM", "PERSISTENT", "TMA", "TMA_OK"]
    params = (["a_ptr", "b_ptr", "a_scale_ptr", "b_scale_ptr", "bias_ptr"] + pointers
              + ["out_ptr", "M", "N", "K", "M_BUCKET", "stride_am", "stride_bn"] + layout + same
              + [f"{c}: tl.constexpr" for c in constexprs])
    lines = [
        *source_head("from sixbit_compiler.kernels.gemm import AUTOTUNE_KEY, autotune_kwargs, configs, scaled_tile"),
        "@triton.autotune(configs=configs(int8=True, tma_store=False), key=AUTOTUNE_KEY, **autotune_kwargs())",
        "@triton.jit",
        f"def KERNEL({', '.join(params)}):",
        "    # one tile per program, or (PERSISTENT) one program per SM walking the tiles",
        "    num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)",
        "    for tile_id in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=PERSISTENT):",
        "        # the kernel issue's GEMM: INT8 (int32 accumulation) or FP8, per-token x per-channel scales, bias",
        "        c, rm, rn = scaled_tile(tile_id, a_ptr, b_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,",
        "                                stride_am, stride_bn, True, True, HAS_BIAS, INT_ACC, UPCAST,",
        "                                BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, TMA, FAST_ACCUM)",
        "        mask = (rm[:, None] < M) & (rn[None, :] < N)",
        "        # SAMEj: input j is laid out as the output (offset row * N + col); INDEX_64: offsets may pass 2**31",
        "        row = rm[:, None].to(tl.int64) if INDEX_64 else rm[:, None]",
        "        col = rn[None, :].to(tl.int64) if INDEX_64 else rn[None, :]",
        f"        g = {rounded('c', value_dtype(gemm))}  # {gemm.name}",
    ]
    body = load_lines(extras, offsets, "row * N + col")
    body += chain_lines(chain, var, rank)  # no norms here (refused above)
    out_dtype = value_dtype(chain[-1])
    body.append(f"    tl.store(out_ptr + row * N + col, v{len(chain) - 1}.to({TL_DTYPES[out_dtype]}), mask=mask)")
    lines += ["    " + line for line in body]  # inside the tile loop
    alone = emit_pointwise(chain, prefix="epilogue")
    name, source, key = named_source(prefix, lines)
    return GemmEpilogueKernel(name, source, gemm.name, [a.name for a in extras], chain[-1].name, out_dtype, rank,
                              alone, key)


#: key -> kernel, for ``sixbit::linear_epilogue`` (process-wide, like ``pointwise.REGISTRY``)
REGISTRY: dict[str, GemmEpilogueKernel] = {}


def run_gemm_epilogue(kernel: GemmEpilogueKernel, xq, xs, wq, ws, bias, extras, lead: tuple[int, ...]):
    """The fused kernel on INT8 or FP8 operands (``xq`` [M, K] with per-row ``xs``, ``wq``
    [N, K] with per-channel ``ws``) and the chain's other inputs; returns [*lead, N], or None
    when an input would broadcast the output beyond the GEMM's shape."""
    from sixbit_compiler.kernels import interpreting
    from sixbit_compiler.kernels._common import NO_FMA
    from sixbit_compiler.kernels.gemm import FP8_FAST_ACCUM, launch_gemm, m_bucket

    int8 = xq.dtype == torch.int8
    m, k = xq.shape
    n = wq.shape[0]
    shape = (*lead, n)
    if len(shape) != kernel.rank or tuple(torch.broadcast_shapes(shape, *(t.shape for t in extras))) != shape:
        return None
    views = [t.expand(shape) for t in extras]  # broadcast dims get stride 0
    out = torch.empty(shape, dtype=kernel.output_dtype, device=xq.device)
    if out.numel() == 0:
        return out
    strides = [s for v in views for s in v.stride()]
    same, reach = layout_args(views, out)
    launch_gemm(
        load_kernel(kernel), xq, wq, m, n, xs.reshape(-1), ws.reshape(-1), bias if bias is not None else out, *views, out,
        m, n, k, m_bucket(m), xq.stride(0), wq.stride(0), *shape, *strides, **same,
        INDEX_64=reach + 256 * n >= 2**31, HAS_BIAS=bias is not None,
        INT_ACC=int8, UPCAST=interpreting() and not int8, FAST_ACCUM=not int8 and FP8_FAST_ACCUM, **NO_FMA,
    )
    return out
