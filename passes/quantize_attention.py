"""quantize_attention: SDPA calls inside transformer blocks become ``sixbit::quantized_attention``.

Runs only with ``attention="int8"`` (``enabled_by``); the default leaves attention exact.

Contract
--------
Expects: ``find_blocks`` has run (nodes carry ``meta["sixbit_block"]``); attention is a
``torch.nn.functional.scaled_dot_product_attention`` call (what Dynamo records for
diffusers' attention processors), with example values on its inputs.

Chooses: a call is quantized when it sits inside a transformer block, has no mask or a
boolean key-padding one ([B, 1, 1, Skv], HunyuanVideo's text padding), no dropout, is not
causal and not grouped-query, its example q, k, v are [B, H, S, D] of one
float dtype with a head dim the kernels take (16-256, a power of two), and it is not a
cross-attention to a short key sequence (fewer than ``SHORT_KEYS`` keys and fewer keys than
queries, e.g. Wan's 512 text tokens), where quantizing costs more than it saves. Every call, kept
or not, gets a row in ``ctx.attentions`` with the reason (the dump's attention table).

Guarantees, for each quantized call:
* one ``scaled_dot_product_attention`` node is replaced by one
  ``sixbit.quantized_attention(q, k, v, scale, attn_mask)`` node with the same meta;
* nothing else changes: no placeholders, no weights, no other nodes.
Numerics: INT8 Q·Kᵀ with K smoothed, FP8 P·V, fp32 softmax (``formats.attention``).
"""

from __future__ import annotations

import inspect

import torch
import torch.fx as fx

from sixbit_compiler.context import AttentionInfo, CompileContext
from sixbit_compiler.fx_utils import example_value, innermost_module
from sixbit_compiler.formats.attention import head_dim_supported, key_padding_mask
from sixbit_compiler.ops import QUANTIZED_ATTENTION

SDPA = torch.nn.functional.scaled_dot_product_attention
# the builtin has no Python signature; this is SDPA's documented one
_SDPA_SIGNATURE = inspect.Signature([
    inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default)
    for name, default in (("query", inspect.Parameter.empty), ("key", inspect.Parameter.empty),
                          ("value", inspect.Parameter.empty), ("attn_mask", None), ("dropout_p", 0.0),
                          ("is_causal", False), ("scale", None), ("enable_gqa", False))
])
_FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
#: Below this many keys (and fewer keys than queries: cross-attention to text) attention stays
#: exact. On the H100, Wan's cross-attention (32,760 queries, 512 keys) took 0.65 ms in SDPA and
#: 1.03 ms quantized, 0.37 ms of it quantizing Q (docs/benchmarks.md, "Attention").
SHORT_KEYS = 2048


def _shape(t) -> str:
    # str(), not int(): int() on a symbolic size (dynamic=True) would specialize the graph to it
    return "[" + ", ".join(str(s) for s in t.shape) + "]" if isinstance(t, torch.Tensor) else "?"


def _size_hint(n) -> int | None:
    """The example's value of a size, without the guard int() would add to a symbolic one
    (dynamic=True): the choice below is about speed, so a hint is enough."""
    if isinstance(n, int):
        return n
    hint = getattr(getattr(n, "node", None), "hint", None)
    return int(hint) if hint is not None else None


def _short_cross_attention(queries, keys) -> bool:
    """Fewer than SHORT_KEYS keys, and fewer keys than queries (judged on the example's sizes)."""
    q, k = _size_hint(queries), _size_hint(keys)
    return q is not None and k is not None and k < SHORT_KEYS and k < q


def _why_not(call: inspect.BoundArguments, block: str | None) -> str | None:
    """None if the call should be quantized, else the reason it stays exact."""
    a = call.arguments
    if block is None:
        return "outside transformer blocks"
    if a["attn_mask"] is not None and not isinstance(a["attn_mask"], fx.Node):
        return "a constant attention mask"
    if a["dropout_p"] != 0.0:
        return "dropout"
    if a["is_causal"] is not False:
        return "causal"
    if a["enable_gqa"] is not False:
        return "grouped-query attention"
    if not all(isinstance(a[n], fx.Node) for n in ("query", "key", "value")):
        return "inputs that are not graph values"
    if not (a["scale"] is None or isinstance(a["scale"], (int, float))):
        return "a softmax scale computed in the graph"
    q, k, v = (example_value(a[n]) for n in ("query", "key", "value"))
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)):
        return "inputs without example values"
    if q.dim() != 4 or q.shape[:2] != k.shape[:2] or k.shape != v.shape or q.shape[-1] != k.shape[-1]:
        return f"shapes q {_shape(q)}, k {_shape(k)}, v {_shape(v)}"
    if q.dtype not in _FLOAT_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtypes {q.dtype}, {k.dtype}, {v.dtype}"
    if a["attn_mask"] is not None and key_padding_mask(example_value(a["attn_mask"]), q.shape[0], k.shape[-2]) is None:
        return "attention mask (only a boolean key-padding mask [B, 1, 1, Skv] is taken)"
    head_dim = q.shape[-1]
    if not isinstance(head_dim, int) or not head_dim_supported(head_dim):
        return f"head dim {head_dim}"
    if _short_cross_attention(q.shape[-2], k.shape[-2]):
        return f"cross-attention over {_size_hint(k.shape[-2])} keys (quantizing Q, K, V costs more than the kernel saves)"
    return None


def quantize_attention(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not SDPA:
            continue
        block = node.meta.get("sixbit_block")
        try:
            call = _SDPA_SIGNATURE.bind(*node.args, **node.kwargs)
        except TypeError:  # a newer SDPA signature: leave the call alone rather than guess
            ctx.attentions.append(AttentionInfo(innermost_module(node), block, "?", reason="unrecognised SDPA arguments"))
            continue
        call.apply_defaults()
        q, k = (example_value(call.arguments[n]) if isinstance(call.arguments[n], fx.Node) else None
                for n in ("query", "key"))
        info = AttentionInfo(path=innermost_module(node), block=block, shape=f"q {_shape(q)}, kv {_shape(k)}")
        ctx.attentions.append(info)
        reason = _why_not(call, block)
        if reason:
            info.reason = reason
            continue
        a = call.arguments
        scale = None if a["scale"] is None else float(a["scale"])
        with graph.inserting_before(node):
            new = graph.call_function(QUANTIZED_ATTENTION, (a["query"], a["key"], a["value"], scale, a["attn_mask"]))
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        info.status = "quantized"
        info.reason = "INT8 Q·Kᵀ (K smoothed), FP8 P·V" + (", key-padding mask" if a["attn_mask"] is not None else "")


quantize_attention.enabled_by = "quantizes_attention"
