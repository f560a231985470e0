"""lower_regions: replace each fusion region's prologue and epilogue chains by a generated kernel.

Contract
--------
Runs only with ``options={"codegen": True}`` (experimental). Expects ``fuse_regions`` ran.

For every region of ``ctx.regions``, each non-empty chain (the prologue; each GEMM's epilogue)
is emitted by ``sixbit_compiler.codegen.pointwise`` and replaced by one
``sixbit::region_kernel(key, inputs)`` call that computes the chain's last node from the
tensors the chain reads; the chain's nodes are erased. The GEMMs themselves are unchanged
(``sixbit::quantized_linear``): composing the chains into the GEMM templates is the next step.

Leaves a chain unfused, with a note in the dump index, when the codegen refuses it
(``Unsupported``) or when a value inside it is read outside it. Leaves the whole graph unfused,
with one log line, when nothing can run the kernels (no CUDA input and no Triton interpreter).

Guarantees:
* per lowered chain: +1 ``sixbit.region_kernel``, minus the chain's nodes; the outputs equal
  the unfused graph's within one rounding of the chain's dtype (each op is computed in fp32
  and rounded where eager rounds);
* ``ctx.kernels`` holds the generated kernels; the dump writes their source into
  ``kernels/`` next to the graph files.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from sixbit_compiler.codegen.pointwise import REGISTRY, Unsupported, data_inputs, emit_pointwise
from sixbit_compiler.context import CompileContext
from sixbit_compiler.kernels import interpreting, triton_available
from sixbit_compiler.ops import REGION_KERNEL

log = logging.getLogger("sixbit")


def _runs_kernels(ctx: CompileContext) -> bool:
    on_cuda = any(isinstance(t, torch.Tensor) and t.is_cuda for t in ctx.example_inputs)
    return triton_available() and (on_cuda or interpreting())


def lower_regions(gm: fx.GraphModule, ctx: CompileContext) -> None:
    if not ctx.regions:
        return
    if not _runs_kernels(ctx):
        log.warning("sixbit: codegen needs a CUDA graph (or TRITON_INTERPRET=1); %d regions left unfused",
                    len(ctx.regions))
        ctx.notes.append("codegen: no CUDA input and no Triton interpreter, regions left unfused")
        return
    names = {n.name: n for n in gm.graph.nodes}
    for region in ctx.regions:
        chains = [("prologue", region.prologue)] + [(f"epilogue{i}", e) for i, e in enumerate(region.epilogues.values())]
        for part, chain in chains:
            if not chain:
                continue
            nodes = [names[n] for n in chain]
            last = nodes[-1]
            inside = set(nodes)
            if any(u not in inside for n in nodes[:-1] for u in n.users):
                ctx.notes.append(f"codegen: region {region.index} {part}: a value inside is read outside, left unfused")
                continue
            try:
                kernel = emit_pointwise(nodes, name=f"region{region.index}_{part}")
            except Unsupported as exc:
                ctx.notes.append(f"codegen: region {region.index} {part} left unfused: {exc}")
                continue
            REGISTRY[kernel.key] = kernel
            ctx.kernels.append(kernel)
            inputs = data_inputs(nodes)
            with gm.graph.inserting_before(last):
                call = gm.graph.call_function(REGION_KERNEL, (kernel.key, inputs))
            call.meta.update({k: v for k, v in last.meta.items() if k in ("example_value", "val", "tensor_meta",
                                                                         "sixbit_block", "sixbit_block_index",
                                                                         "nn_module_stack", "stack_trace")})
            call.meta["sixbit_region"] = region.index
            call.meta["sixbit_region_part"] = "kernel"
            last.replace_all_uses_with(call)
            for n in reversed(nodes):
                gm.graph.erase_node(n)
            for n in nodes:
                names.pop(n.name, None)


lower_regions.enabled_by = "codegen"
