"""find_blocks: mark the transformer-block regions of a Dynamo graph.

Contract
--------
Expects: a graph captured by Dynamo, whose call nodes carry ``nn_module_stack``
meta (any diffusers transformer, or a DiT written from scratch).

Finds: the repeated blocks, generically. A *block group* is a container
(``nn.ModuleList`` / ``nn.Sequential``) whose integer-indexed children of one
class each contain a linear call and submodules of their own. Groups nested
inside another group's member are ignored (an FFN's ``net.0`` is not a block).
Of the outermost groups, every one with at least two members and more than a
quarter of the largest group's members is kept: HunyuanVideo's 20 dual-stream and
40 single-stream blocks are both found, its 2-layer text token refiner (an
auxiliary network on the conditioning path) is not. No model names are hard-coded.

Guarantees:
* every node inside block ``blocks.3`` has ``meta["sixbit_block"] == "blocks.3"``
  and ``meta["sixbit_block_index"]`` (execution order); other nodes have neither;
* ``ctx.blocks`` lists the blocks in execution order with their nodes, the nodes
  they read from outside, and the nodes read after them;
* the graph itself is unchanged: this pass adds and removes no nodes.
"""

from __future__ import annotations

import collections

import torch.fx as fx

from sixbit_compiler.context import BlockInfo, CompileContext
from sixbit_compiler.fx_utils import is_linear, module_stack


def _is_index(part: str) -> bool:
    return part.isdigit()


def find_blocks(gm: fx.GraphModule, ctx: CompileContext) -> None:
    # (group path, class) -> member path -> nodes, in graph order
    members: dict[tuple[str, type], dict[str, list[fx.Node]]] = collections.defaultdict(dict)
    node_paths: dict[fx.Node, list[str]] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        stack = module_stack(node)
        node_paths[node] = [p for p, _ in stack]
        for path, cls in stack:
            parent, _, last = path.rpartition(".")
            if _is_index(last):
                members[(parent, cls)].setdefault(path, []).append(node)

    def qualifies(member_nodes: dict[str, list[fx.Node]]) -> bool:
        # Every member must hold a linear and code of its own submodules (not a bare leaf).
        for path, nodes in member_nodes.items():
            has_linear = any(is_linear(n) for n in nodes)
            has_children = any(any(p.startswith(path + ".") for p in node_paths[n]) for n in nodes)
            if not (has_linear and has_children):
                return False
        return True

    candidates = [(key, m) for key, m in members.items() if qualifies(m)]
    # Outermost first, then the most members.
    candidates.sort(key=lambda c: (c[0][0].count(".") + (1 if c[0][0] else 0), -len(c[1])))
    largest = max((len(m) for _, m in candidates), default=0)
    accepted: list[tuple[tuple[str, type], dict[str, list[fx.Node]]]] = []
    for key, m in candidates:
        group = key[0]
        nested = any(group == mp or group.startswith(mp + ".") for _, am in accepted for mp in am)
        if nested:
            continue
        if len(m) < min(2, largest) or len(m) <= largest / 4:
            ctx.notes.append(
                f"find_blocks: ignored {group!r} ({key[1].__name__} x{len(m)}): too short a run "
                f"(largest block group has {largest})"
            )
            continue
        accepted.append((key, m))

    blocks: list[BlockInfo] = []
    for (group, cls), m in accepted:
        for path, nodes in m.items():
            blocks.append(BlockInfo(name=path, index=-1, cls=cls.__name__, group=group, nodes=[n.name for n in nodes]))
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    blocks.sort(key=lambda b: order[b.nodes[0]])

    by_name = {n.name: n for n in gm.graph.nodes}
    for i, b in enumerate(blocks):
        b.index = i
        inside = set(b.nodes)
        for name in b.nodes:
            node = by_name[name]
            node.meta["sixbit_block"] = b.name
            node.meta["sixbit_block_index"] = i
        ins, outs = [], []
        for name in b.nodes:
            node = by_name[name]
            for a in node.all_input_nodes:
                if a.name not in inside and a.op != "placeholder" and a.name not in ins:
                    ins.append(a.name)
            if any(u.name not in inside for u in node.users) and name not in outs:
                outs.append(name)
        b.inputs, b.outputs = ins, outs
    ctx.blocks = blocks
