"""block_regions: each transformer block becomes one region the runtime can compute or skip.

Contract
--------
Expects: ``find_blocks`` has run (``ctx.blocks``); runs after ``quantize_linears``. Runs
only with ``options["block_cache"]`` (``enabled_by``): the temporal delta cache is being
built, and stays off by default until it is measured on the GPU.

For each block whose nodes are contiguous in the graph:

* its nodes move into a GraphModule of their own (inputs: every value the block reads
  from outside, placeholders included; outputs: every value read after it, as a tuple);
* the main graph calls it as ``self.sixbit_block_<i>(...)`` (one ``call_module``) and
  reads its outputs with ``getitem``;
* each output is paired with the block input it updates (its *residual stream*): the
  input position at which the next block of the same group receives that output. A
  block whose outputs cannot all be paired (or whose shapes differ) is still a region,
  but is never skipped.

* the block's quantized linears read its own slice of the precision slots
  (``sixbit_precision_slots[base:base+n]``, a view) with block-relative slot numbers, so
  blocks of one class have identical bodies and share one lowered body.

Guarantees: the main graph computes the same function; per block, its nodes move from the
main graph into ``sixbit_block_<i>`` (the backend dumps each distinct body); a block that
is not contiguous stays inline, with a note.
"""

from __future__ import annotations

import operator

import torch.fx as fx

from sixbit_compiler.blocks import BlockRunner
from sixbit_compiler.context import CompileContext
from sixbit_compiler.residuals import BlockIO, block_io, block_members, contiguous, pair_residuals
from sixbit_compiler.ops import QUANTIZED_GEMMS, REGION_KERNEL_INT8, SHARED_QUANTIZATIONS


def _extract(gm: fx.GraphModule, io: BlockIO) -> fx.GraphModule:
    """The body GraphModule of a contiguous block: placeholders for its inputs, a tuple of
    its outputs."""
    body = fx.Graph()
    env = {}
    for a in io.inputs:
        ph = body.placeholder(a.name)
        ph.meta = dict(a.meta)
        env[a] = ph
    for n in io.nodes:
        env[n] = body.node_copy(n, lambda x: env[x])
    body.output(tuple(env[o] for o in io.outputs))
    return fx.GraphModule(gm, body)


def _rebase_slots(body: fx.GraphModule) -> tuple[fx.Node, int, int] | None:
    """Make the body's precision slots relative to the block: (slots input, base, count).

    Every quantized linear reads ``precision_slots[slot]``; a block's slots are consecutive,
    so the outer graph can pass the block its own slice and the body can use 0..n-1. Then
    blocks differ only in their inputs and share one lowered body. An op that quantizes an
    activation for several GEMMs (``shared_int8_quantization`` / ``shared_fp8_quantization``,
    ``region_kernel_int8``) reads
    their slots as a list, rebased alike.
    """
    qls = [n for n in body.graph.nodes if n.op == "call_function" and n.target in QUANTIZED_GEMMS]
    if not qls:
        return None
    # ops that read a list of the GEMMs' slots: (position of the slots tensor, of the list)
    lists = {**{op: (1, 2) for op in SHARED_QUANTIZATIONS.values()}, REGION_KERNEL_INT8: (2, 3)}
    readers = [n for n in body.graph.nodes if n.op == "call_function" and n.target in lists]
    slots_inputs = {n.args[5] for n in qls} | {n.args[lists[n.target][0]] for n in readers}
    indices = [n.args[6] for n in qls]
    if len(slots_inputs) != 1 or sorted(indices) != list(range(min(indices), min(indices) + len(indices))):
        return None
    base = min(indices)
    for n in qls:
        n.update_arg(6, n.args[6] - base)
    for n in readers:
        position = lists[n.target][1]
        n.update_arg(position, [s - base for s in n.args[position]])
    body.recompile()
    return next(iter(slots_inputs)), base, len(indices)


def block_regions(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    # Membership comes from node meta, which earlier passes keep on the nodes they create
    # (BlockInfo.nodes is the list as find_blocks found it).
    members = block_members(gm)
    regions: list[BlockIO] = []
    for b in ctx.blocks:
        nodes = members.get(b.name, [])
        if not nodes or not contiguous(gm, nodes):
            ctx.notes.append(f"block_regions: {b.name} is not contiguous in the graph; left inline, never skipped")
            continue
        regions.append(block_io(b.name, b.group, nodes))
    for note in pair_residuals(regions):
        ctx.notes.append(f"block_regions: {note}; never skipped")
    info = {b.name: b for b in ctx.blocks}
    bodies = [_extract(gm, io) for io in regions]  # before any rewiring below

    replaced: dict[fx.Node, fx.Node] = {}  # an earlier block's output -> its getitem
    for io, body in zip(regions, bodies):
        b, nodes, inputs, outputs = info[io.name], io.nodes, io.inputs, io.outputs
        name = f"sixbit_block_{b.index}"
        gm.add_submodule(name, BlockRunner(b.index, b.name, body, io.streams, ctx.runtime))
        args = [replaced.get(a, a) for a in inputs]
        with graph.inserting_before(nodes[0]):
            rebased = _rebase_slots(body)
            if rebased is not None:  # the block reads its own slice of the precision slots
                slots_ph, base, count = rebased
                position = [p.name for p in body.graph.nodes if p.op == "placeholder"].index(slots_ph.name)
                args[position] = graph.call_function(operator.getitem, (args[position], slice(base, base + count)))
            call = graph.call_module(name, tuple(args))
            call.meta["sixbit_block_region"] = b.name  # the region's call sits outside every block
            getters = []
            for j, o in enumerate(outputs):
                g = graph.call_function(operator.getitem, (call, j))
                g.meta = {k: v for k, v in o.meta.items() if not k.startswith("sixbit_block")}
                getters.append(g)
        for o, g in zip(outputs, getters):
            o.replace_all_uses_with(g)  # in-block users are erased next, in reverse order
            replaced[o] = g
        for n in reversed(nodes):
            graph.erase_node(n)
        ctx.block_regions.append(name)


block_regions.enabled_by = "block_cache"
