"""fold_qk_norm_rope: Wan's q / k RMS norms and RoPE move into the quantized attention.

Runs with ``attention="int8"`` (``enabled_by``), after ``quantize_attention``.

Contract
--------
Expects ``sixbit::quantized_attention`` nodes (``quantize_attention``) whose q and k are each
the chain diffusers' ``WanAttnProcessor`` records, on a projection's output x [B, S, H·D]::

    n = rms_norm(x, (H·D,), weight, eps)          # the norm across every head
    h = n.unflatten(2, (H, -1))
    x1, x2 = h.unflatten(-1, (-1, 2)).unbind(-1)
    out = empty_like(h)
    out[..., 0::2] = x1 * cos - x2 * sin          # RoPE on interleaved pairs
    out[..., 1::2] = x1 * sin + x2 * cos
    q = out.type_as(h).permute(0, 2, 1, 3)        # (the type_as is optional)

with no mask on the attention. Such a call becomes ``sixbit::quantized_attention_qk_norm_rope(
x_q, x_k, v, q_weight, k_weight, q_eps, k_eps, q_cos, q_sin, k_cos, k_sin, scale)``, which norms,
rotates and quantizes each operand in one kernel (``kernels.attention_prologue``).

Why: unfolded, x goes through HBM three more times before the attention reads it (Inductor's
norm + RoPE kernel writes a rotated bf16 copy, K's mean and the Q / K quantization read it):
1.8 ms of a W-14B block on an H100 (docs/benchmarks.md, block run 9).

Guarantees, per folded call:
* −1 ``sixbit.quantized_attention``, +1 ``sixbit.quantized_attention_qk_norm_rope`` with its meta;
  −2 ``rms_norm`` and the two rotations' nodes (``unflatten``, ``unbind``, ``getitem``,
  ``mul``, ``sub``, ``add``, ``empty_like``, ``setitem``, ``type_as``, ``permute``); the ``cos`` /
  ``sin`` nodes stay (the new op reads them);
* a reader of the rotated q or k that only takes its dtype (``t.type_as(q)``) is pointed at x,
  whose dtype it is; any other reader outside the chain leaves the call unfolded;
* the output equals ``quantized_attention`` of the chain's q and k (bit for bit on the CPU
  reference path, which runs the same chain; within rounding on the kernels);
* a quantized attention left unfolded gets a note in the dump index with the reason, and the
  attention table says which calls were folded.
"""

from __future__ import annotations

import dataclasses
import inspect
import operator

import torch
import torch.fx as fx

from sixbit_compiler.context import CompileContext
from sixbit_compiler.fx_utils import example_value, innermost_module
from sixbit_compiler.ops import QUANTIZED_ATTENTION, QUANTIZED_ATTENTION_QK_NORM_ROPE

_RMS_NORMS = (torch.rms_norm, torch.nn.functional.rms_norm)
_RMS_NORM_SIGNATURE = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("input", inspect.Parameter.empty), ("normalized_shape", inspect.Parameter.empty),
                          ("weight", None), ("eps", None))
])
_MULS, _SUBS, _ADDS = (operator.mul, torch.mul), (operator.sub, torch.sub), (operator.add, torch.add)
_FLOATS = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass
class _Prologue:
    """One operand's matched chain: what the fused op reads, and the nodes it replaces."""

    x: fx.Node
    weight: fx.Node | None
    eps: float | None
    cos: fx.Node
    sin: fx.Node
    nodes: list[fx.Node]  # the chain, x's readers first
    dtype_readers: list[fx.Node]  # ``t.type_as(rotated)`` outside the chain


class _NoMatch(Exception):
    pass


def _require(cond, why: str) -> None:
    if not cond:
        raise _NoMatch(why)


def _fn(n, targets) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in targets


def _method(n, name: str) -> bool:
    return isinstance(n, fx.Node) and n.op == "call_method" and n.target == name


def _int_tuple(args) -> tuple:
    return tuple(args[0]) if len(args) == 1 and isinstance(args[0], (tuple, list)) else tuple(args)


def _half(index) -> int | None:
    """0 / 1 for the index ``[..., 0::2]`` / ``[..., 1::2]``, else None."""
    if isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis and isinstance(index[1], slice):
        sl = index[1]
        if sl.start in (0, 1, None) and sl.stop is None and sl.step == 2:
            return sl.start or 0
    return None


def _product(mul: fx.Node, halves: tuple[fx.Node, fx.Node]) -> tuple[fx.Node, fx.Node]:
    """(x half, frequency) of ``x_half * freq`` in either order."""
    _require(_fn(mul, _MULS) and len(mul.args) == 2, f"{getattr(mul, 'name', mul)} is not a product")
    a, b = mul.args
    if a in halves:
        return a, b
    _require(b in halves, f"{mul.name} does not multiply a half of the heads")
    return b, a


def _match_rotation(permuted) -> _Prologue:
    _require(_method(permuted, "permute") and _int_tuple(permuted.args[1:]) == (0, 2, 1, 3),
             "not a permute(0, 2, 1, 3) of [B, S, H, D]")
    rotated = permuted.args[0]
    out = rotated.args[0] if _method(rotated, "type_as") else rotated
    _require(_fn(out, (torch.empty_like,)) and len(out.args) == 1 and not out.kwargs,
             "not a rotation written into empty_like (no RoPE in Wan's form)")
    heads = out.args[0]
    writes = {(_half(u.args[1]) if len(u.args) == 3 else None): u for u in out.users if _fn(u, (operator.setitem,))}
    _require(set(writes) == {0, 1}, "not two writes of the even and odd halves")
    even, odd = writes[0].args[2], writes[1].args[2]
    _require(_fn(even, _SUBS) and _fn(odd, _ADDS), "not x1·cos − x2·sin and x1·sin + x2·cos")
    first = even.args[0]
    _require(_fn(first, _MULS), "not x1·cos − x2·sin")
    # the halves: x1, x2 = heads.unflatten(-1, (-1, 2)).unbind(-1)
    x1 = next((a for a in first.args if _fn(a, (operator.getitem,)) and a.args[1] == 0), None)
    _require(x1 is not None and _method(x1.args[0], "unbind"), "no x1 = unbind(...)[0]")
    unbind = x1.args[0]
    x2 = next((u for u in unbind.users if _fn(u, (operator.getitem,)) and u.args[1] == 1), None)
    _require(x2 is not None and _int_tuple(unbind.args[1:]) in ((-1,), (4,)), "no x2 = unbind(..., -1)[1]")
    pairs = unbind.args[0]
    _require(_method(pairs, "unflatten") and _int_tuple(pairs.args[1:]) in ((-1, (-1, 2)), (3, (-1, 2)))
             and pairs.args[0] is heads, "the halves are not the interleaved pairs of the heads")
    halves = (x1, x2)
    (a, cos), (b, sin) = _product(even.args[0], halves), _product(even.args[1], halves)
    _require((a, b) == (x1, x2), "not x1·cos − x2·sin")
    terms = {_product(m, halves) for m in odd.args}
    _require(terms == {(x1, sin), (x2, cos)}, "not x1·sin + x2·cos with the same frequencies")
    # the heads: unflatten(rms_norm(x, (H·D,), weight, eps), 2, (H, -1))
    _require(_method(heads, "unflatten") and len(heads.args) == 3 and heads.args[1] in (2, -2),
             "the heads are not an unflatten of the width")
    normed = heads.args[0]
    _require(_fn(normed, _RMS_NORMS), "the heads are not an RMS norm's output")
    call = _RMS_NORM_SIGNATURE.bind(*normed.args, **normed.kwargs)
    call.apply_defaults()
    x, weight, eps = call.arguments["input"], call.arguments["weight"], call.arguments["eps"]
    _require(isinstance(x, fx.Node) and (weight is None or isinstance(weight, fx.Node)),
             "the norm's input or weight is not a graph value")
    _require(eps is None or isinstance(eps, (int, float)), "the norm's eps is computed in the graph")
    xv, hv, fv = example_value(x), example_value(heads), [example_value(f) for f in (cos, sin)]
    _require(all(isinstance(t, torch.Tensor) for t in (xv, hv, *fv)), "no example values")
    _require(xv.dim() == 3 and hv.dim() == 4 and xv.dtype in _FLOATS and example_value(normed).dtype == xv.dtype,
             f"x {xv.dtype} of {xv.dim()} dims (the kernel takes [B, S, H·D] in bf16, fp16 or fp32)")
    _require(tuple(call.arguments["normalized_shape"]) == (xv.shape[-1],), "the norm is not over the whole width")
    _require(all(f.dtype == torch.float32 for f in fv), "RoPE frequencies that are not fp32")
    chain = [normed, heads, pairs, unbind, x1, x2, out, *even.args, even, *odd.args, odd, writes[0], writes[1],
             *([rotated] if rotated is not out else []), permuted]
    inside = set(chain)
    dtype_readers = []
    for node in chain:
        for user in node.users:
            if user in inside or user.target is QUANTIZED_ATTENTION:
                continue
            _require(_method(user, "type_as") and user.args[1] is node and user.args[0] is not node,
                     f"{node.name} is also read by {user.name}")
            dtype_readers.append(user)
    return _Prologue(x, weight, None if eps is None else float(eps), cos, sin, chain, dtype_readers)


def fold_qk_norm_rope(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    infos = {(a.path, a.block): a for a in ctx.attentions if a.status == "quantized"}
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target is QUANTIZED_ATTENTION]:
        q, k, v, scale, mask = node.args
        try:
            _require(mask is None, "a key-padding mask")
            prologues = _match_rotation(q), _match_rotation(k)
        except _NoMatch as why:
            ctx.notes.append(f"fold_qk_norm_rope: {node.name} ({innermost_module(node)}) left alone: {why}")
            continue
        pq, pk = prologues
        heads = example_value(v).shape[1] if isinstance(example_value(v), torch.Tensor) else None
        if any(example_value(p.nodes[1]).shape[2] != heads for p in prologues):
            ctx.notes.append(f"fold_qk_norm_rope: {node.name} ({innermost_module(node)}) left alone: "
                             "q / k split into another number of heads than v")
            continue
        with graph.inserting_before(node):
            new = graph.call_function(QUANTIZED_ATTENTION_QK_NORM_ROPE, (
                pq.x, pk.x, v, pq.weight, pk.weight, pq.eps, pk.eps, pq.cos, pq.sin, pk.cos, pk.sin, scale))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        for p in prologues:
            for reader in p.dtype_readers:  # t.type_as(rotated): the same dtype as x
                reader.args = (reader.args[0], p.x)
            for chained in reversed(p.nodes):
                if not chained.users:
                    graph.erase_node(chained)
        info = infos.get((innermost_module(new), new.meta.get("sixbit_block")))
        if info is not None:
            info.reason += "; q/k RMS norms and RoPE folded in"


fold_qk_norm_rope.enabled_by = "quantizes_attention"
