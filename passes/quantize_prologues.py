"""quantize_prologues: a norm prologue that feeds quantized GEMMs also writes their INT8 operand.

Contract
--------
Opt-in: runs only with ``options={"codegen": True, "passes": {"quantize_prologues": True}}``;
expects ``lower_regions`` ran (and runs before ``share_quantization``, which then leaves these
activations alone). It measured no faster than the plain prologues plus ``share_quantization``
on an H100 (docs/benchmarks.md, block run 7): the chunked kernel with codes took 623 µs
at W-14B's 5,120-wide rows against 624 µs for the plain prologue and a quantization pass, and
in the W-1.3B block its prologues took 0.53 ms against 0.47 ms for the plain ones with their
share of the quantization passes.

A prologue lowered to a row kernel (``sixbit::region_kernel`` whose chain holds a norm, with
the chunked variant ``codegen.rows`` emitted for it) is rewritten when every reader of its
output is a quantized GEMM (``sixbit::quantized_linear`` / ``sixbit::linear_epilogue``) of its
block taking it as the activation, unrotated (no ``hadamard``) and unpadded (K a whole number of
16-blocks). It becomes one ``sixbit::region_kernel_int8(key, inputs, precision_slots, slots)``
returning (output, per-token INT8 codes, scales), and each GEMM gets the codes and scales as its
``x_codes`` / ``x_scales``.

Why: the issue's prologue is "norm, modulation, rotation, quantize". A Wan block's
self-attention q, k and v, its cross-attention q and its FFN each read a normed, modulated
activation that otherwise goes to HBM in bf16 and is read back to be quantized. The chunked
kernel quantizes the row while it is on chip (two or three more passes over it from L2).

Per call, ``region_kernel_int8`` runs the chunked kernel only if one of the GEMMs reads INT8
this call (their slots), else the plain prologue; a GEMM uses the codes only when its own
precision is INT8, on the kernels. Every other path (NVFP4, FP8, bf16, the CPU reference,
calibration) reads the output, which is always written.

Guarantees:
* per rewritten prologue: +1 ``sixbit.region_kernel_int8``, +3 ``getitem``, −1
  ``sixbit.region_kernel``; the GEMMs gain two keyword arguments and keep their positional
  ones; the chunked kernel is listed with its region's kernels (and its source dumped);
* the codes and scales equal ``formats.quantize_int8`` of the output over its last dim, bit
  for bit (the same codes each GEMM computed from the output before);
* a norm prologue left alone gets a note in the dump index with the reason.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from sixbit_compiler.codegen import rows as rows_codegen
from sixbit_compiler.codegen.pointwise import REGISTRY
from sixbit_compiler.context import CompileContext
from sixbit_compiler.ops import QUANTIZED_GEMMS, REGION_KERNEL, REGION_KERNEL_INT8

from .share_quantization import codes_refusal

_KEPT_META = ("sixbit_block", "sixbit_block_index", "sixbit_region", "sixbit_region_part", "nn_module_stack",
              "stack_trace")
_VALUE_META = ("example_value", "val", "tensor_meta")


def _why_not(prologue: fx.Node) -> str | None:
    """None if the prologue can write its readers' INT8 operand, else why not."""
    if not REGISTRY[prologue.args[0]].int8_key:
        return "the chunked kernel does not take its chain (more than one norm)"
    if not prologue.users:
        return "its output is unused"
    for user in prologue.users:
        if user.target not in QUANTIZED_GEMMS or user.args[0] is not prologue or prologue in user.args[1:]:
            return f"read by {user.name}, which is not a quantized GEMM taking it as its activation"
        if user.meta.get("sixbit_block") != prologue.meta.get("sixbit_block"):
            return f"read by {user.name} of another block"
    return codes_refusal(list(prologue.users))


def quantize_prologues(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    regions = {r.index: r for r in ctx.regions}
    for prologue in [n for n in graph.nodes if n.op == "call_function" and n.target is REGION_KERNEL]:
        kernel = REGISTRY[prologue.args[0]]
        if not kernel.rows:  # a norm-free prologue or a lowered epilogue: no whole rows
            continue
        region = prologue.meta.get("sixbit_region")
        reason = _why_not(prologue)
        if reason:
            ctx.notes.append(f"quantize_prologues: region {region} prologue left writing bf16 only: {reason}")
            continue
        gemms = list(prologue.users)
        with graph.inserting_before(prologue):
            call = graph.call_function(REGION_KERNEL_INT8, (prologue.args[0], prologue.args[1], gemms[0].args[5],
                                                            [g.args[6] for g in gemms]))
            out, codes, scales = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
        for node in (call, out, codes, scales):
            node.meta.update({k: v for k, v in prologue.meta.items() if k in _KEPT_META})
        out.meta.update({k: v for k, v in prologue.meta.items() if k in _VALUE_META})
        prologue.replace_all_uses_with(out)
        graph.erase_node(prologue)
        for g in gemms:
            g.kwargs = {**g.kwargs, "x_codes": codes, "x_scales": scales}
        variant = rows_codegen.REGISTRY[kernel.int8_key]
        if all(k.key != variant.key for k in ctx.kernels):
            ctx.kernels.append(variant)
        if region in regions and variant.name not in regions[region].kernels:
            regions[region].kernels.append(variant.name)


quantize_prologues.enabled_by = "codegen"
quantize_prologues.opt_in = True
