"""Block inputs, outputs and residual streams in an FX graph (shared by block passes).

A transformer block reads some values from outside (its inputs) and produces some values
read after it (its outputs). Each output updates one *residual stream*: the input at the
position where the next block of the same group receives that output. ``block_regions``
needs the pairing to skip a block (output = input + cached Δ); ``precision_guards`` needs it
to measure Γ = ‖Y − X‖₁ / ‖X‖₁.
"""

from __future__ import annotations

import dataclasses

import torch.fx as fx

from .fx_utils import example_value, external_inputs


@dataclasses.dataclass
class BlockIO:
    name: str
    group: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]
    streams: list[int] | None = None  # per output, the input position it updates; None: unpaired


def block_io(name: str, group: str, nodes: list[fx.Node]) -> BlockIO:
    """Inputs (values from outside read inside, in first-use order) and outputs (values
    used after the block, in graph order) of a block's nodes."""
    inside = set(nodes)
    inputs = external_inputs(nodes)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return BlockIO(name, group, nodes, inputs, outputs)


def _same_kind(a: fx.Node, b: fx.Node) -> bool:
    av, bv = example_value(a), example_value(b)
    return av is not None and bv is not None and tuple(av.shape) == tuple(bv.shape) and av.dtype == bv.dtype


def pair_residuals(blocks: list[BlockIO]) -> list[str]:
    """Set ``streams`` on each block (in execution order); returns a note per unpaired block.

    Output j of block i feeds block i+1 at some input position k: block i's own input at k
    is the stream output j updates. The last block of a group has no successor (and may drop
    a stream nothing reads, like CogVideoX's text stream): each of its outputs takes the one
    stream position of its predecessor with the same shape and dtype.
    """
    notes = []
    for r, b in enumerate(blocks):
        nxt = blocks[r + 1] if r + 1 < len(blocks) and blocks[r + 1].group == b.group else None
        if nxt is not None:
            positions = [nxt.inputs.index(o) if o in nxt.inputs else None for o in b.outputs]
        else:
            prev = blocks[r - 1].streams if r > 0 and blocks[r - 1].group == b.group else None
            positions = []
            for o in b.outputs:
                fits = [k for k in (prev or []) if k < len(b.inputs) and _same_kind(b.inputs[k], o)]
                positions.append(fits[0] if len(fits) == 1 else None)
        ok = all(p is not None and p < len(b.inputs) for p in positions)
        ok = ok and all(_same_kind(b.inputs[p], o) for o, p in zip(b.outputs, positions))
        b.streams = positions if ok else None
        if not ok:
            notes.append(f"{b.name}: outputs not paired with residual inputs")
    return notes


def block_members(gm: fx.GraphModule) -> dict[str, list[fx.Node]]:
    """Block name -> its nodes, from the ``sixbit_block`` meta earlier passes keep."""
    members: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.meta.get("sixbit_block") is not None:
            members.setdefault(n.meta["sixbit_block"], []).append(n)
    return members


def contiguous(gm: fx.GraphModule, nodes: list[fx.Node]) -> bool:
    order = list(gm.graph.nodes)
    first, last = order.index(nodes[0]), order.index(nodes[-1])
    return len(order[first : last + 1]) == len(nodes)
