"""Helpers for writing pass-level tests (the project's own tests use them too).

    from sixbit_compiler.testing import apply_pass, capture, context_for
    from sixbit_compiler.passes import find_blocks, quantize_linears

    gm, example_inputs = capture(model, **inputs)       # the graph Dynamo would hand sixbit
    gm, ctx = context_for(gm, example_inputs, activation="nvfp4")
    find_blocks(gm, ctx)
    before, after = apply_pass(quantize_linears, gm, ctx)
    assert after["sixbit.quantized_linear.default"] == before["F.linear"] - 6

See docs/passes.md.
"""

from __future__ import annotations

import torch

from .fx_utils import op_counts

__all__ = ["apply_pass", "capture", "context_for", "op_counts"]


def capture(model, *args, **kwargs):
    """Dynamo-capture one call of ``model`` under no_grad; returns (GraphModule, example_inputs).

    Raises if Dynamo produced more than one graph (a graph break).
    """
    captured = []

    def backend(gm, example_inputs, **_):
        captured.append((gm, list(example_inputs)))
        return gm.forward

    with torch.no_grad():
        torch.compile(model, backend=backend)(*args, **kwargs)
    if len(captured) != 1:
        raise AssertionError(f"expected one graph, Dynamo produced {len(captured)} (graph breaks)")
    return captured[0]


def context_for(gm, example_inputs, **options):
    """A private copy of ``gm`` and a fresh CompileContext (with its own runtime) for ``options``,
    resolved for the inputs' device as the backend resolves them (``activation="auto"``)."""
    from .backend import copy_graph_module, graph_device
    from .context import CompileContext
    from .options import SixbitOptions
    from .runtime import SixbitRuntime

    opts = SixbitOptions.from_dict(options).for_device(graph_device(example_inputs))
    gm = copy_graph_module(gm)
    return gm, CompileContext.for_graph(gm, example_inputs, opts, runtime=SixbitRuntime(opts))


def apply_pass(pass_fn, gm, ctx) -> tuple[dict[str, int], dict[str, int]]:
    """Run one pass as the pass manager does (then lint the graph and regenerate its code) and
    return the op counts before and after it."""
    before = op_counts(gm.graph)
    pass_fn(gm, ctx)
    gm.graph.lint()
    gm.recompile()
    return before, op_counts(gm.graph)
