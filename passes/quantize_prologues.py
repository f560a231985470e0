"""quantize_prologues: a prologue kernel that feeds quantized GEMMs also writes their INT8 operand.

Contract
--------
Runs only with ``options={"codegen": True}``; expects ``lower_regions`` ran.

A prologue lowered to a row kernel (``sixbit::region_kernel`` whose chain holds a norm, so
one program holds a whole row: a token) is rewritten when every reader of its output is a
quantized GEMM (``sixbit::quantized_linear`` / ``sixbit::linear_epilogue``) taking it as the
activation, unrotated (no ``hadamard``) and unpadded (the stored weight's K is the row's
width). It becomes one ``sixbit::region_kernel_int8(key, inputs, precision_slots, slots)``
returning (output, per-token INT8 codes, scales), and each GEMM gets the codes and scales as
its ``x_codes`` / ``x_scales``.

Why: a Wan block's self-attention q, k and v read one normed, modulated activation, which
otherwise each quantize again (three reads of a 335 MB bf16 activation at W-14B's width and
three INT8 writes). The row is in registers when the prologue stores it, so its per-token
codes cost the INT8 write alone.

Per call, ``region_kernel_int8`` writes the codes only if one of the GEMMs reads INT8 this call
(their slots); a GEMM uses them only when its own precision is INT8, on the kernels. Every
other path (NVFP4, FP8, bf16, the CPU reference, calibration) reads the output as before,
which the kernel always writes.

Guarantees:
* per rewritten prologue: +1 ``sixbit.region_kernel_int8``, +3 ``getitem``, −1
  ``sixbit.region_kernel``; the GEMMs gain two keyword arguments and keep their nine
  positional ones;
* the codes and scales equal ``formats.quantize_int8`` of the output over its last dim, bit
  for bit, so the outputs are those of the unrewritten graph;
* a prologue left alone gets a note in the dump index with the reason.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from sixbit_compiler.codegen.pointwise import REGISTRY
from sixbit_compiler.context import CompileContext
from sixbit_compiler.formats import NVFP4_BLOCK
from sixbit_compiler.ops import QUANTIZED_GEMMS, REGION_KERNEL, REGION_KERNEL_INT8

_KEPT_META = ("example_value", "val", "tensor_meta", "sixbit_block", "sixbit_block_index", "sixbit_region",
              "sixbit_region_part", "nn_module_stack", "stack_trace")


def _why_not(prologue: fx.Node) -> str | None:
    """None if the prologue can write its readers' INT8 operand, else why not."""
    if not REGISTRY[prologue.args[0]].rows:
        return "no norm in the chain (a flat kernel holds no whole row)"
    if not prologue.users:
        return "its output is unused"
    for user in prologue.users:
        if user.target not in QUANTIZED_GEMMS or user.args[0] is not prologue or prologue in user.args[1:]:
            return f"read by {user.name}, which is not a quantized GEMM taking it as its activation"
        if user.args[8]:
            return f"{user.name} rotates its activation (hadamard) before quantizing"
        if user.args[7] % NVFP4_BLOCK:  # both weight formats store K padded to a whole block
            return f"{user.name}'s stored weight is padded past the activation's width ({user.args[7]})"
    return None


def quantize_prologues(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    for prologue in [n for n in graph.nodes if n.op == "call_function" and n.target is REGION_KERNEL]:
        region = prologue.meta.get("sixbit_region")
        reason = _why_not(prologue)
        if reason:
            if REGISTRY[prologue.args[0]].rows:  # flat kernels are epilogues or norm-free prologues: no news
                ctx.notes.append(f"quantize_prologues: region {region} prologue left writing bf16 only: {reason}")
            continue
        gemms = list(prologue.users)
        slots_node = gemms[0].args[5]
        with graph.inserting_before(prologue):
            call = graph.call_function(REGION_KERNEL_INT8, (prologue.args[0], prologue.args[1], slots_node,
                                                            [g.args[6] for g in gemms]))
            out, codes, scales = (graph.call_function(operator.getitem, (call, i)) for i in range(3))
        for node in (call, out, codes, scales):
            node.meta.update({k: v for k, v in prologue.meta.items() if k in _KEPT_META and k not in
                              ("example_value", "val", "tensor_meta")})
        out.meta.update({k: v for k, v in prologue.meta.items() if k in ("example_value", "val", "tensor_meta")})
        prologue.replace_all_uses_with(out)
        graph.erase_node(prologue)
        for g in gemms:
            g.kwargs = {**g.kwargs, "x_codes": codes, "x_scales": scales}


quantize_prologues.enabled_by = "codegen"
