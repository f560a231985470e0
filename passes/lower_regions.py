"""lower_regions: replace each fusion region's prologue and epilogue chains by a generated kernel.

Contract
--------
Runs only with ``options={"codegen": True}`` (experimental). Expects ``fuse_regions`` ran.

For every region of ``ctx.regions``:

* **each GEMM with an epilogue chain**: the GEMM (``sixbit::quantized_linear``) and its chain
  become one ``sixbit::linear_epilogue(x, <the GEMM's arguments>, key, extras)`` call
  (``codegen.gemm``: the kernel issue's INT8 GEMM as a template, the chain as its generated
  epilogue; other precisions run the GEMM, then the chain as one generated kernel);
* **the prologue chain** (norm, AdaLN modulation, casts): one ``sixbit::region_kernel(key,
  inputs)`` call (``codegen.pointwise``) computing the chain's last node from what it reads;
  a chain with a norm also gets (registered, not called) its chunked variant that writes the
  output's INT8 codes too (``codegen.rows``), when the opt-in ``quantize_prologues`` is on;
* an epilogue the GEMM template refuses is lowered like a prologue, on its own.

The replaced nodes are erased. Leaves a chain unfused, with a note in the dump index, when the
codegen refuses it (``Unsupported``) or when a value inside it (or the GEMM) is read outside it.
Leaves the whole graph unfused, with one log line, when nothing can run the kernels (no CUDA
input and no Triton interpreter).

Guarantees:
* per fused GEMM: +1 ``sixbit.linear_epilogue``, −1 ``sixbit.quantized_linear``, minus the
  chain's nodes; per other lowered chain: +1 ``sixbit.region_kernel``, minus its nodes;
* the outputs equal the unfused graph's within rounding (each op is computed in fp32 and
  rounded where eager rounds; the GEMM's output is rounded to its dtype before the chain);
* identical chains (the same region of every block) share one kernel: its key hashes the
  source without comments, so a 40-block model compiles and autotunes each kernel once;
* ``ctx.kernels`` holds the distinct generated kernels, each region lists its kernels' names
  (``FusionRegion.kernels``); the dump writes the sources into ``kernels/`` next to the graph
  files.
"""

from __future__ import annotations

import logging

import torch
import torch.fx as fx

from sixbit_compiler.codegen import gemm as gemm_codegen
from sixbit_compiler.codegen import rows as rows_codegen
from sixbit_compiler.codegen.pointwise import REGISTRY, Unsupported, data_inputs, emit_pointwise
from sixbit_compiler.context import CompileContext, FusionRegion
from sixbit_compiler.kernels import interpreting, triton_available
from sixbit_compiler.ops import LINEAR_EPILOGUE, REGION_KERNEL

_KEPT_META = ("example_value", "val", "tensor_meta", "sixbit_block", "sixbit_block_index", "nn_module_stack",
              "stack_trace")

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
        chains = [("prologue", None, region.prologue)]
        chains += [(f"epilogue{i}", gemm, chain) for i, (gemm, chain) in enumerate(region.epilogues.items())]
        for part, gemm, chain in chains:
            if not chain:
                continue
            nodes = [names[n] for n in chain]
            inside = set(nodes)
            if any(u not in inside for n in nodes[:-1] for u in n.users):
                ctx.notes.append(f"codegen: region {region.index} {part}: a value inside is read outside, left unfused")
                continue
            if gemm is not None and _fuse_into_gemm(gm, ctx, region, part, names[gemm], nodes):
                names.pop(gemm)
            elif not _lower_chain(gm, ctx, region, part, nodes):
                continue
            for n in nodes:
                names.pop(n.name, None)


def _record(ctx: CompileContext, region: FusionRegion, kernel) -> None:
    """List ``kernel`` once in ``ctx.kernels`` (blocks share kernels) and under its region."""
    if all(k.key != kernel.key for k in ctx.kernels):
        ctx.kernels.append(kernel)
    region.kernels.append(kernel.name)


def _replace(gm: fx.GraphModule, nodes: list[fx.Node], call: fx.Node, region: FusionRegion, part: str) -> None:
    """Make ``call`` stand for ``nodes[-1]`` and erase ``nodes``."""
    last = nodes[-1]
    call.meta.update({k: v for k, v in last.meta.items() if k in _KEPT_META})
    call.meta["sixbit_region"] = region.index
    call.meta["sixbit_region_part"] = part
    last.replace_all_uses_with(call)
    for n in reversed(nodes):
        gm.graph.erase_node(n)


def _fuse_into_gemm(gm, ctx, region: FusionRegion, part: str, gemm: fx.Node, nodes: list[fx.Node]) -> bool:
    """GEMM + epilogue chain -> one ``sixbit::linear_epilogue``; False if the template refuses."""
    if any(u not in nodes for u in gemm.users):
        ctx.notes.append(f"codegen: region {region.index} {part}: the GEMM's output is read outside its epilogue")
        return False
    try:
        kernel = gemm_codegen.emit_gemm_epilogue(gemm, nodes)
    except Unsupported as exc:
        ctx.notes.append(f"codegen: region {region.index} {part}: not fused into its GEMM ({exc})")
        return False
    kernel = gemm_codegen.REGISTRY.setdefault(kernel.key, kernel)
    _record(ctx, region, kernel)
    _record(ctx, region, kernel.alone)
    extras = [a for a in data_inputs(nodes) if a is not gemm]
    with gm.graph.inserting_before(nodes[-1]):
        call = gm.graph.call_function(LINEAR_EPILOGUE, (*gemm.args, kernel.key, extras))
    _replace(gm, nodes, call, region, "gemm+epilogue")
    gm.graph.erase_node(gemm)
    return True


def _lower_chain(gm, ctx, region: FusionRegion, part: str, nodes: list[fx.Node]) -> bool:
    """A chain -> one ``sixbit::region_kernel``; False (with a note) if the codegen refuses it."""
    try:
        kernel = emit_pointwise(nodes, prefix="prologue" if part == "prologue" else "epilogue")
    except Unsupported as exc:
        ctx.notes.append(f"codegen: region {region.index} {part} left unfused: {exc}")
        return False
    kernel = REGISTRY.setdefault(kernel.key, kernel)
    if kernel.rows and not kernel.int8_key and ctx.options.pass_enabled("quantize_prologues"):
        # a norm prologue, for the opt-in quantize_prologues: also its variant writing INT8 codes
        try:
            variant = rows_codegen.emit_quantizing_rows(nodes)
            kernel.int8_key = rows_codegen.REGISTRY.setdefault(variant.key, variant).key
        except Unsupported:
            pass  # quantize_prologues leaves it writing bf16 only
    _record(ctx, region, kernel)
    with gm.graph.inserting_before(nodes[-1]):
        call = gm.graph.call_function(REGION_KERNEL, (kernel.key, data_inputs(nodes)))
    _replace(gm, nodes, call, region, "kernel")
    return True


lower_regions.enabled_by = "codegen"
