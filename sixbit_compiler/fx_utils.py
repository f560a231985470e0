"""Small helpers over Dynamo FX graphs shared by the passes."""

from __future__ import annotations

import collections
import re
from typing import Iterable

import torch
import torch.fx as fx

# The linear call in its three spellings: Dynamo (torch-level), functional, aten.
LINEAR_TARGETS = (torch._C._nn.linear, torch.nn.functional.linear, torch.ops.aten.linear.default)

_MODULES_ITEM = re.compile(r"\.?(?:__dict__\[['\"]_modules['\"]\]|_modules)\[['\"]([^'\"]+)['\"]\]")
_ITEM = re.compile(r"\[['\"]([^'\"]+)['\"]\]|\[(\d+)\]")


def normalize_module_path(source: str) -> str:
    """Turn a Dynamo source string into a plain module path.

    ``L['self'].__dict__['_modules']['blocks'].0.attn1.to_q`` -> ``blocks.0.attn1.to_q``
    (``blocks[0]`` spellings too); the root module is the empty string.
    """
    path = _MODULES_ITEM.sub(lambda m: "." + m.group(1), source)
    path = _ITEM.sub(lambda m: "." + (m.group(1) or m.group(2)), path)
    parts = [p for p in path.split(".") if p]
    if parts[:2] == ["L", "self"]:
        parts = parts[2:]
    elif parts and parts[0] in ("L", "self"):
        parts = parts[1:]
    return ".".join(parts)


def module_stack(node: fx.Node) -> list[tuple[str, type]]:
    """The node's ``nn_module_stack`` as [(module path, class)], outermost first."""
    stack = node.meta.get("nn_module_stack") or {}
    out = []
    for value in stack.values():
        source, cls = value[0], value[1]
        out.append((normalize_module_path(source), cls))
    return out


def innermost_module(node: fx.Node) -> str:
    stack = module_stack(node)
    return stack[-1][0] if stack else ""


def is_linear(node: fx.Node) -> bool:
    return node.op == "call_function" and node.target in LINEAR_TARGETS


def linear_args(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None]:
    """(input, weight, bias) of a linear call in any of its spellings."""
    args = list(node.args) + [None] * 3
    x = node.kwargs.get("input", args[0])
    w = node.kwargs.get("weight", args[1])
    b = node.kwargs.get("bias", args[2])
    return x, w, b


def example_value(node: fx.Node):
    """The fake tensor Dynamo recorded for ``node`` (or ``val`` after AOT tracing)."""
    return node.meta.get("example_value", node.meta.get("val"))


def op_name(node: fx.Node) -> str:
    """A stable, readable name for what a node does, used for op counts."""
    if node.op == "call_function":
        target = node.target
        if isinstance(target, torch._ops.OpOverload):
            return str(target)
        mod = getattr(target, "__module__", None) or ""
        name = getattr(target, "__name__", str(target))
        if mod.startswith("torch._C._nn") or mod == "torch.nn.functional":
            return f"F.{name}"
        if mod in ("_operator", "operator"):
            return f"operator.{name}"
        if mod.startswith("torch"):
            return f"torch.{name}"
        return f"{mod}.{name}" if mod else name
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_module":
        return f"module:{node.target}"
    return node.op


def op_counts(graph: fx.Graph, ops: Iterable[str] = ("call_function", "call_method", "call_module")) -> dict[str, int]:
    counts = collections.Counter(op_name(n) for n in graph.nodes if n.op in ops)
    return dict(sorted(counts.items()))


def last_placeholder(graph: fx.Graph) -> fx.Node | None:
    last = None
    for n in graph.nodes:
        if n.op == "placeholder":
            last = n
    return last


def add_placeholder(graph: fx.Graph, name: str, value=None) -> fx.Node:
    """Append a placeholder after the existing ones (FX needs them first)."""
    anchor = last_placeholder(graph)
    ctx = graph.inserting_after(anchor) if anchor is not None else graph.inserting_before(next(iter(graph.nodes), None))
    with ctx:
        node = graph.placeholder(name)
    if value is not None:
        node.meta["example_value"] = value
    return node


def external_inputs(nodes: list[fx.Node]) -> list[fx.Node]:
    """The values ``nodes`` read from outside themselves, in first-use order."""
    inside = set(nodes)
    inputs: list[fx.Node] = []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    return inputs
