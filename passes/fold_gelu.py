"""fold_gelu: a quantized linear whose input is GELU(h) reads h and applies the GELU itself.

Contract
--------
Expects ``quantize_linears`` ran (and ``lower_regions``, with ``codegen``: a GELU it made a
GEMM's epilogue is no longer a node here). Runs before ``share_quantization``.

For each ``F.gelu(h, approximate="tanh")`` node whose every reader is a
``sixbit::quantized_linear`` taking it as its activation (directly or through inert dropouts,
p = 0 or not training), unrotated (no ``hadamard``) and without shared codes: each reader
takes h instead, with ``x_activation="gelu_tanh"``, and the GELU and dropouts are removed.

Why: between a DiT feed-forward's two GEMMs the GELU's output is the widest activation of the
block (W-14B: 32,760 × 13,824). Unfolded, a GELU kernel writes it in bf16 and the
quantization reads it back (0.68 ms of a W-14B block on an H100, docs/benchmarks.md block run
9); folded, an INT8 or FP8 call's quantization kernel computes GELU(h) as it reads h
(``kernels.quantize``'s ``GELU``), so GELU(h) never goes to memory. Calls at other precisions,
the reference path and calibration apply ``F.gelu`` first: the same values as before.

Guarantees:
* per folded GELU: −1 ``F.gelu``, −n inert ``F.dropout`` between it and its readers; each
  reader gains the ``x_activation`` keyword argument; nothing is added;
* outputs unchanged on every path but the INT8 / FP8 kernels', where the kernel's GELU (the
  codegen's expression, in fp32, rounded to h's dtype) may differ from PyTorch's in the last bit
  of a value;
* a GELU left alone gets a note in the dump index with the reason.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from sixbit_compiler.codegen.pointwise import is_inert_dropout
from sixbit_compiler.context import CompileContext
from sixbit_compiler.ops import QUANTIZED_LINEAR

_GELUS = (torch.nn.functional.gelu, torch._C._nn.gelu)


def _approximate(node: fx.Node) -> str:
    return node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")


def _readers(node: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """(the readers of ``node`` past inert dropouts, the dropouts)."""
    readers, dropouts = [], []
    for user in node.users:
        if is_inert_dropout(user) and user.args[0] is node:
            more, deeper = _readers(user)
            readers += more
            dropouts += [user, *deeper]
        else:
            readers.append(user)
    return readers, dropouts


def _why_not(gelu: fx.Node, readers: list[fx.Node], dropouts: list[fx.Node]) -> str | None:
    if _approximate(gelu) != "tanh":
        return f"approximate={_approximate(gelu)!r} (the quantization kernel computes the tanh form)"
    for r in readers:
        if r.target is not QUANTIZED_LINEAR:
            return f"read by {r.name}, which is not a quantized linear"
        if r.args[0] not in (gelu, *dropouts) or any(a in (gelu, *dropouts) for a in r.args[1:]):
            return f"{r.name} reads it as something other than its activation"
        if r.args[8]:
            return f"{r.name} rotates its activation (hadamard) before quantizing"
        if "x_codes" in r.kwargs or "x_activation" in r.kwargs:
            return f"{r.name} already reads shared codes or an activation"
    return None


def fold_gelu(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    for gelu in [n for n in graph.nodes if n.op == "call_function" and n.target in _GELUS]:
        readers, dropouts = _readers(gelu)
        if not any(r.target is QUANTIZED_LINEAR for r in readers):
            continue  # not in front of a quantized linear: nothing to say
        reason = _why_not(gelu, readers, dropouts)
        if reason:
            ctx.notes.append(f"fold_gelu: {gelu.name} left alone: {reason}")
            continue
        h = gelu.args[0] if gelu.args else gelu.kwargs["input"]
        for r in readers:
            r.args = (h, *r.args[1:])
            r.kwargs = {**r.kwargs, "x_activation": "gelu_tanh"}
        for node in reversed(dropouts):
            graph.erase_node(node)
        graph.erase_node(gelu)
