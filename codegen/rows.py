"""Chunked row kernels: a norm prologue that also writes its output's per-token INT8 codes.

``codegen.pointwise`` runs a norm chain one row a program, the whole row in registers. Writing
the row's INT8 codes from there measured 1.9x the plain kernel on the H100 (the extra max and
encode phases lengthen each program's serial chain, which one row a program cannot hide;
docs/benchmarks.md). This emitter walks rows in chunks instead, a few rows a program, the way
the activation quantization kernels do (``kernels/quantize.py``), in passes over the row:

1. the norm's statistics (layer norm: the mean, then the centred variance, two passes; RMS
   norm: the mean square), computed from the chain before the norm;
2. the chain recomputed through the norm and the ops after it; the output stored (unless
   ``WRITE_OUT`` is off) and its per-row max|y| taken;
3. the chain recomputed once more and encoded: per-token INT8 codes and the row's scale.

Only the first pass reads HBM; the others re-read the program's rows from L2 (a few tens of KB).
Every pass computes the same fp32 expressions in the same order (FMA contraction off), so pass 3
encodes exactly the values pass 2 stored: the codes equal ``formats.quantize_int8`` of the
output bit for bit. Each op rounds where eager rounds, as in ``pointwise``; only the norm's sums
run in another order than the whole-row kernel's (chunk by chunk), a last-bit difference.

Chains with exactly one layer / RMS norm over the last dim are taken; anything else raises
:class:`Unsupported` (the caller keeps the plain prologue).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from .pointwise import (
    _LAYER_NORMS, TL_DTYPES, Unsupported, _arg, _index_expressions, _literal, _rank,
    broadcast_inputs, chain_lines, data_inputs, input_parameters, is_row_norm, layout_args, load_kernel, load_lines,
    named_source, rounded, source_head, value_dtype,
)


@dataclasses.dataclass
class RowQuantKernel:
    name: str
    source: str
    inputs: list[str]  # FX names of the external tensor inputs, in argument order
    output: str
    output_dtype: torch.dtype
    rank: int
    key: str = ""


def _norm_apply(norm: fx.Node, x: str, out: str, var: dict[fx.Node, str]) -> list[str]:
    """The norm of ``x`` from the row statistics the first passes computed (``mean`` and
    ``var_``, or ``ms``), then its weight and bias."""
    if norm.target in _LAYER_NORMS:
        weight, bias, eps = _arg(norm, 2, "weight"), _arg(norm, 3, "bias"), _arg(norm, 4, "eps", 1e-5)
        lines = [f"    {out} = ({x} - mean[:, None]) * tl.rsqrt(var_[:, None] + {_literal(eps)})"]
    else:
        weight, bias, eps = _arg(norm, 2, "weight"), None, _arg(norm, 3, "eps")
        if eps is None:  # torch's default: the input dtype's machine epsilon
            eps = torch.finfo(value_dtype(norm.args[0])).eps
        lines = [f"    {out} = {x} * tl.rsqrt(ms[:, None] + {_literal(eps)})"]
    if weight is not None:
        lines.append(f"    {out} = {out} * {var[weight]}")
    if bias is not None:
        lines.append(f"    {out} = {out} + {var[bias]}")
    return lines


def emit_quantizing_rows(nodes: list[fx.Node], prefix: str = "prologue_int8") -> RowQuantKernel:
    """Triton source computing ``nodes[-1]`` (a chain holding one norm over the last dim) and
    its per-token INT8 codes, in chunks of the row. Raises :class:`Unsupported` otherwise."""
    norms = [k for k, n in enumerate(nodes) if is_row_norm(n)]
    if len(norms) != 1:
        raise Unsupported(f"{len(norms)} norms in the chain (the chunked kernel takes one)")
    out_node, norm = nodes[-1], nodes[norms[0]]
    rank = _rank(out_node)
    shape = _arg(norm, 1, "normalized_shape")
    if rank == 0 or len(shape) != 1:
        raise Unsupported(f"{norm.name}: a norm over more than the last dim")
    out_dtype = value_dtype(out_node)
    if out_dtype not in TL_DTYPES or value_dtype(norm) not in TL_DTYPES:
        raise Unsupported(f"{out_node.name}: dtype {out_dtype}")
    pre, post = nodes[:norms[0]], nodes[norms[0] + 1:]
    inputs = data_inputs(nodes)
    sizes, offsets = _index_expressions(rank, len(inputs))
    n = f"size{rank - 1}"

    def chunk(through_norm: bool) -> tuple[list[str], dict[fx.Node, str]]:
        """One chunk's statements: the loads it needs, the chain before the norm, and with
        ``through_norm`` the norm (from the row statistics) and the chain after it."""
        var = {a: f"in{j}" for j, a in enumerate(inputs)}
        needed = set(data_inputs(pre)) | ({norm.args[0]} - set(pre))
        wanted = [j for j, a in enumerate(inputs) if through_norm or a in needed]
        lines = load_lines([inputs[j] for j in wanted], [offsets[j] for j in wanted], "i", wanted)
        lines += chain_lines(pre, var, rank)
        if through_norm:
            k = len(pre)
            lines += _norm_apply(norm, var[norm.args[0]], f"v{k}", var)
            lines.append(f"    v{k} = {rounded(f'v{k}', value_dtype(norm))}  # {norm.name}")
            var[norm] = f"v{k}"
            lines += chain_lines(post, var, rank, first=k + 1)
        return lines, var

    def loop(body: list[str]) -> list[str]:
        return [f"    for k0 in range(0, {n}, CHUNK):",
                "        cols = k0 + tl.arange(0, CHUNK)",
                f"        i = rows[:, None] * {n} + cols[None, :]",
                f"        mask = row_ok[:, None] & (cols[None, :] < {n})"] + ["    " + ln for ln in body]

    pointers, layout, same = input_parameters(len(inputs), sizes, rank)
    params = (pointers + ["out_ptr", "codes_ptr", "scales_ptr", "n_rows"] + layout + same
              + ["INDEX_64: tl.constexpr", "WRITE_OUT: tl.constexpr", "ROWS: tl.constexpr", "CHUNK: tl.constexpr"])
    lines = [
        *source_head("from sixbit_compiler.kernels._common import encode_rows, is_nan, saturate, where_nan"),
        "@triton.jit",
        f"def KERNEL({', '.join(params)}):",
        "    # ROWS rows a program, in chunks of CHUNK; SAMEj / INDEX_64 as in the pointwise kernels;",
        "    # WRITE_OUT off: only the codes (every reader takes INT8 this call)",
        "    pid = tl.program_id(0).to(tl.int64) if INDEX_64 else tl.program_id(0)",
        "    rows = pid * ROWS + tl.arange(0, ROWS)",
        "    row_ok = rows < n_rows",
    ]
    pre_lines, pre_var = chunk(False)
    x = pre_var[norm.args[0]]
    if norm.target in _LAYER_NORMS:
        lines += ["    # pass 1: the norm's mean, then its centred variance (as the whole-row kernel)",
                  "    acc = tl.zeros((ROWS,), dtype=tl.float32)"]
        lines += loop(pre_lines + [f"    acc += tl.sum(tl.where(mask, {x}, 0.0), axis=1)"])
        lines += [f"    mean = acc / {n}", "    acc = tl.zeros((ROWS,), dtype=tl.float32)"]
        lines += loop(pre_lines + [f"    c = tl.where(mask, {x} - mean[:, None], 0.0)", "    acc += tl.sum(c * c, axis=1)"])
        lines += [f"    var_ = acc / {n}"]
    else:
        lines += ["    # pass 1: the norm's mean square", "    acc = tl.zeros((ROWS,), dtype=tl.float32)"]
        lines += loop(pre_lines + [f"    acc += tl.sum(tl.where(mask, {x} * {x}, 0.0), axis=1)"])
        lines += [f"    ms = acc / {n}"]
    full_lines, full_var = chunk(True)
    y = full_var[out_node]
    limit = _literal(torch.finfo(out_dtype).max)
    lines += ["    # pass 2: the output (stored) and its per-row max|y|, ±Inf saturated, NaN apart",
              "    amax = tl.zeros((ROWS,), dtype=tl.float32)",
              "    has_nan = tl.zeros((ROWS,), dtype=tl.int32)"]
    lines += loop(full_lines + [
        "    if WRITE_OUT:",
        f"        tl.store(out_ptr + i, {y}.to({TL_DTYPES[out_dtype]}), mask=mask)",
        f"    y = saturate(tl.where(mask, {y}, 0.0), {limit})",
        "    nan = is_nan(y)",
        "    amax = tl.maximum(amax, tl.max(tl.where(nan, 0.0, tl.abs(y)), axis=1))",
        "    has_nan = tl.maximum(has_nan, tl.max(nan.to(tl.int32), axis=1))",
    ])
    lines += ["    scale = tl.math.div_rn(amax, 127.0)",
              "    inv = tl.math.div_rn(1.0, tl.where(scale > 0, scale, 1.0))",
              "    tl.store(scales_ptr + rows, where_nan(has_nan > 0, scale), mask=row_ok)",
              "    # pass 3: the same values again, encoded: formats.quantize_int8 of the stored output"]
    lines += loop(full_lines + [
        f"    q = encode_rows(saturate({y}, {limit}), inv, False)",
        "    tl.store(codes_ptr + i, q.to(tl.int8), mask=mask)",
    ])
    name, source, key = named_source(prefix, lines)
    return RowQuantKernel(name, source, [a.name for a in inputs], out_node.name, out_dtype, rank, key)


#: key -> kernel, for ``sixbit::region_kernel_int8`` (process-wide, as pointwise.REGISTRY)
REGISTRY: dict[str, RowQuantKernel] = {}


def chunking(width: int) -> tuple[int, int, int]:
    """(rows a program, chunk, warps) for rows ``width`` wide: the chunk of 2048 / 1024 / 512 /
    256 that pads the row least (5120 -> 1024, 1536 -> 512), about 2,048 elements a program."""
    chunk = min((2048, 1024, 512, 256), key=lambda c: (-(-width // c) * c, -c))
    chunk = min(chunk, max(16, 1 << (max(1, width) - 1).bit_length()))
    return max(1, 2048 // chunk), chunk, 4


def run_quantizing_rows(kernel: RowQuantKernel, *tensors: torch.Tensor, write_out: bool = True):
    """-> (output, INT8 codes [*output.shape], scales [*output.shape[:-1], 1]): the codes are
    ``formats.quantize_int8`` of the output over its last dim. With ``write_out=False`` the
    output is allocated and left unwritten (every reader takes the codes)."""
    shape, views = broadcast_inputs(kernel, tensors)
    device = tensors[0].device
    out = torch.empty(shape, dtype=kernel.output_dtype, device=device)
    codes = torch.empty(shape, dtype=torch.int8, device=device)
    scales = torch.empty((*shape[:-1], 1), dtype=torch.float32, device=device)
    if out.numel() == 0:
        return out, codes, scales
    width = shape[-1]
    n_rows = out.numel() // width
    rows, chunk, warps = chunking(width)
    strides = [s for v in views for s in v.stride()]
    same, reach = layout_args(views, out)
    fn = load_kernel(kernel)
    fn[(-(-n_rows // rows),)](*views, out, codes, scales, n_rows, *shape, *strides, **same,
                              INDEX_64=reach + rows * width >= 2**31, WRITE_OUT=write_out, ROWS=rows, CHUNK=chunk,
                              num_warps=warps, enable_fp_fusion=False)
    return out, codes, scales
