"""fuse_regions: partition each block's graph into fusion regions around its quantized GEMMs.

Contract
--------
Expects: ``find_blocks`` and ``quantize_linears`` ran (``sixbit::quantized_linear`` nodes carry
``meta["sixbit_block"]``).

Finds, per block, one region per distinct activation feeding quantized linears (q, k and v read
one normed input: one region with three GEMMs):

* **gemm**: the ``sixbit::quantized_linear`` nodes reading that activation;
* **prologue**: the chain producing the activation from the block's tensors, walked backwards
  while every op is one the codegen can emit (norms over the last dim, dtype casts, elementwise
  arithmetic such as AdaLN's ``x * (1 + scale) + shift``, inert dropout) and every node's users
  lie inside the region, plus producers of the chain's other operands (``1 + scale``) whose
  users all lie inside it;
* **epilogue** of each GEMM: the elementwise chain after it (bias-free adds and muls such as
  the gate and the residual, GELU / SiLU, casts, inert dropout), walked forwards while each
  node has one user, plus operand producers used only there (``residual.float()``). Row
  reductions (norms) are never epilogue ops: a GEMM tile does not hold a whole row.

A node belongs to at most one region; an epilogue wins over the next GEMM's prologue (the
output of ``ffn.net.0``'s GELU is ``ffn.net.2``'s input: it stays in the first region, whose
epilogue can later write the second GEMM's quantized operand directly). An op the codegen
cannot handle ends the chain and stays outside, for Inductor or eager; nothing raises. Each
region is checked convex with networkx (no path leaves it and comes back, which fusing would
turn into a cycle); a region that is not loses its epilogues and prologue operands.

Guarantees:
* every node of region ``r`` has ``meta["sixbit_region"] == r`` and
  ``meta["sixbit_region_part"]`` in ``{"prologue", "gemm", "epilogue"}``; ``ctx.regions``
  lists the regions (dump index: "Fusion regions");
* the graph is unchanged: this pass adds and removes no nodes (the codegen lowers the regions).
"""

from __future__ import annotations

import networkx as nx
import torch.fx as fx

# what the codegen can emit decides what a region may hold: one definition, in the codegen
from sixbit_compiler.codegen.pointwise import is_row_norm, translates
from sixbit_compiler.context import CompileContext, FusionRegion
from sixbit_compiler.ops import QUANTIZED_LINEAR


def _absorb_operands(part: set[fx.Node], users_ok: set[fx.Node], block: str, taken: dict[fx.Node, str]) -> None:
    """Grow ``part`` by producers of its operands that are elementwise, in the block, free, and
    read only by ``users_ok`` or ``part`` itself (``1 + scale``, ``residual.float()``)."""
    changed = True
    while changed:
        changed = False
        for node in list(part):
            for arg in node.all_input_nodes:
                if arg in part or arg in taken or arg.meta.get("sixbit_block") != block:
                    continue
                if translates(arg) and all(u in part or u in users_ok for u in arg.users):
                    part.add(arg)
                    changed = True


def _prologue(activation: fx.Node, gemms: set[fx.Node], block: str, taken: dict[fx.Node, str]) -> list[fx.Node]:
    chain: set[fx.Node] = set()
    inside = set(gemms)
    stack = [activation]
    while stack:
        node = stack.pop()
        if node in taken or node.meta.get("sixbit_block") != block:
            continue
        if not (translates(node) or is_row_norm(node)):
            continue
        if not all(u in inside or u in chain for u in node.users):
            continue
        chain.add(node)
        inside.add(node)
        # follow the main path: the first tensor argument (norms and casts have one)
        args = node.all_input_nodes
        if args:
            stack.append(args[0])
    return list(chain)


def _epilogue(gemm: fx.Node, block: str, taken: dict[fx.Node, str]) -> list[fx.Node]:
    chain, node = [], gemm
    while len(node.users) == 1:
        (user,) = node.users
        if user in taken or user.meta.get("sixbit_block") != block or not translates(user):
            break
        chain.append(user)
        node = user
    return chain


def _convex(nodes: set[fx.Node], ordered: list[fx.Node], order: dict[fx.Node, int]) -> bool:
    """No path leaves ``nodes`` and comes back (fusing them would make a cycle). Such a path only
    runs through nodes between the region's first and last in graph (topological) order, so the
    search stays within that window."""
    lo, hi = min(order[n] for n in nodes), max(order[n] for n in nodes)
    window = ordered[lo:hi + 1]
    graph = nx.DiGraph()
    graph.add_nodes_from(window)
    graph.add_edges_from((n, u) for n in window for u in n.users if lo <= order.get(u, -1) <= hi)
    after = set().union(*(nx.descendants(graph, n) for n in nodes)) - nodes
    return not any(nx.descendants(graph, n) & nodes for n in after)


def fuse_regions(gm: fx.GraphModule, ctx: CompileContext) -> None:
    ordered = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(ordered)}
    groups: dict[tuple[str, fx.Node], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is QUANTIZED_LINEAR and node.meta.get("sixbit_block"):
            groups.setdefault((node.meta["sixbit_block"], node.args[0]), []).append(node)
    taken: dict[fx.Node, str] = {g: "gemm" for gemms in groups.values() for g in gemms}
    # every epilogue first, so that an epilogue wins over the next GEMM's prologue
    epilogues: dict[fx.Node, set[fx.Node]] = {}
    for (block, _), gemms in groups.items():
        for g in gemms:
            epilogues[g] = set(_epilogue(g, block, taken))
            taken.update({n: "epilogue" for n in epilogues[g]})
    ctx.regions = []
    for (block, activation), gemms in sorted(groups.items(), key=lambda kv: order[kv[1][0]]):
        prologue = set(_prologue(activation, set(gemms), block, taken))
        taken.update({n: "prologue" for n in prologue})
        _absorb_operands(prologue, set(gemms), block, taken)
        taken.update({n: "prologue" for n in prologue})
        for g in gemms:
            _absorb_operands(epilogues[g], set(), block, taken)
            taken.update({n: "epilogue" for n in epilogues[g]})
        nodes = prologue | set(gemms) | set().union(*(epilogues[g] for g in gemms))
        note = ""
        if not _convex(nodes, ordered, order):  # keep what is always safe: the GEMMs and their prologue
            for g in gemms:
                for n in epilogues[g]:
                    del taken[n]
                epilogues[g] = set()
            nodes = prologue | set(gemms)
            note = "epilogues dropped: the region was not convex"
        index = len(ctx.regions)
        named = lambda ns: [n.name for n in sorted(ns, key=order.get)]  # noqa: E731
        for n in nodes:
            n.meta["sixbit_region"] = index
            n.meta["sixbit_region_part"] = "gemm" if n in gemms else "prologue" if n in prologue else "epilogue"
        ctx.regions.append(FusionRegion(index=index, block=block, gemms=named(gemms), prologue=named(prologue),
                                        epilogues={g.name: named(epilogues[g]) for g in gemms}, note=note))
