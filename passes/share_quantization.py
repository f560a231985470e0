"""share_quantization: the quantized GEMMs that read one activation share its quantization.

Contract
--------
Expects ``quantize_linears`` ran (and ``lower_regions``, with ``codegen``: it must see the
final GEMM ops, since lowering rebuilds them). Activations whose norm prologue already writes
the codes (``quantize_prologues``) are left alone.

For each activation read (as ``x``) by two or more quantized GEMMs (``sixbit::quantized_linear``
/ ``sixbit::linear_epilogue``) of one block (the text states every block reads are shared
within each block, never across blocks, which the block cache may skip), all unrotated (no ``hadamard``) and unpadded (K a whole number of
16-blocks, so the stored weight's K is x's width): one
``sixbit::shared_int8_quantization(x, precision_slots, slots)`` is inserted after x, returning
x's per-token INT8 codes and scales, and each of those GEMMs gets them as its ``x_codes`` /
``x_scales`` keyword arguments. With ``activation="fp8"`` the op is
``sixbit::shared_fp8_quantization`` (per-token e4m3 codes, as uint8 bits) instead. (A model
switched to the other tier at run time, ``set_activation``, stays correct: its GEMMs then find
no codes of their precision and quantize x themselves.)

Why: a Wan block's self-attention q, k and v (a CogVideoX / HunyuanVideo block's too) read one
normed, modulated activation, and each quantized it again: at W-14B's width three reads of a
335 MB bf16 activation and three INT8 writes where one of each will do (0.21 ms per pass on an
H100, docs/benchmarks.md).

Per call, the op writes the codes only if one of the GEMMs reads its precision this call (their
slots); a GEMM uses them only when its own precision is the codes' one. Every other path (the
other precisions, the CPU reference, calibration) reads x as before.

Guarantees:
* per shared activation: +1 ``sixbit.shared_int8_quantization`` (or ``shared_fp8_quantization``),
  +2 ``getitem``; the GEMMs gain
  two keyword arguments and keep their positional ones; nothing is removed;
* the codes and scales equal ``formats.quantize_int8`` (``formats.quantize_fp8_rows``) of x over
  its last dim, bit for bit (the activation kernel each GEMM ran before), so the outputs are
  unchanged;
* an activation read by several GEMMs but left alone gets a note in the dump index, with the
  reason.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from sixbit_compiler.context import CompileContext
from sixbit_compiler.formats import NVFP4_BLOCK, Precision
from sixbit_compiler.ops import QUANTIZED_GEMMS, SHARED_QUANTIZATIONS

_KEPT_META = ("sixbit_block", "sixbit_block_index", "nn_module_stack", "stack_trace")


def codes_refusal(gemms: list[fx.Node]) -> str | None:
    """None if quantized GEMMs reading one activation can all take its per-token codes in
    place of quantizing it (the condition ``dispatch.usable_codes`` checks per call), else why
    not. Shared with ``quantize_prologues``."""
    for g in gemms:
        if g.kwargs.get("x_activation") is not None:
            return f"{g.name} applies {g.kwargs['x_activation']} to its activation before quantizing"
        if g.args[8]:
            return f"{g.name} rotates its activation (hadamard) before quantizing"
        if g.args[7] % NVFP4_BLOCK:  # both weight formats store K padded to a whole block
            return f"{g.name}'s stored weight is padded past the activation's width ({g.args[7]})"
    if len({g.args[5] for g in gemms}) != 1:
        return "the GEMMs read different precision-slot tensors"
    return None


def _why_not(gemms: list[fx.Node]) -> str | None:
    """None if ``gemms`` (all reading one activation) can share its codes, else why not."""
    taken = next((g for g in gemms if "x_codes" in g.kwargs), None)
    if taken is not None:
        return f"{taken.name} already reads shared codes"
    return codes_refusal(gemms)


def share_quantization(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    # FP8 codes where every GEMM runs FP8; INT8 ones otherwise (the precision DMPQ falls back to)
    op = SHARED_QUANTIZATIONS[Precision.FP8 if ctx.options.precision == Precision.FP8 else Precision.INT8]
    # per block: a block skipped by the block cache must not leave another block's codes unwritten
    readers: dict[tuple[fx.Node, str | None], list[fx.Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in QUANTIZED_GEMMS and isinstance(node.args[0], fx.Node):
            readers.setdefault((node.args[0], node.meta.get("sixbit_block")), []).append(node)
    for (x, _), gemms in readers.items():
        if len(gemms) < 2 or all("x_codes" in g.kwargs for g in gemms):  # (quantize_prologues fed them)
            continue
        reason = _why_not(gemms)
        if reason:
            ctx.notes.append(f"share_quantization: {x.name} (read by {len(gemms)} GEMMs) left alone: {reason}")
            continue
        with graph.inserting_before(gemms[0]):  # x and the slots exist by the first reader
            call = graph.call_function(op, (x, gemms[0].args[5], [g.args[6] for g in gemms]))
            codes, scales = (graph.call_function(operator.getitem, (call, i)) for i in range(2))
        for node in (call, codes, scales):
            node.meta.update({k: v for k, v in gemms[0].meta.items() if k in _KEPT_META})
        for g in gemms:
            g.kwargs = {**g.kwargs, "x_codes": codes, "x_scales": scales}
