"""Block regions at run time: each transformer block as a callable the runtime can skip.

``block_regions`` (passes/) moves every cacheable block's nodes into its own GraphModule
and calls it through a :class:`BlockRunner`. The runner asks the model's runtime, once per
block per call, whether to compute the block or reuse its cached residual:

* compute: run the block's graph; if the runtime keeps residuals, store Δ = Y − X per
  residual stream (the block's outputs, each paired with the input it updates);
* skip: return X + Δ_cached for every stream, without running the block.

The decision itself was taken once per model call in the runtime's decision point, so a
skip costs no device-to-host sync. Blocks with the same graph structure share one lowered
body (weights are graph inputs), so Inductor compiles a block once, not once per block.
"""

from __future__ import annotations

import torch
import torch.fx as fx


def structure_key(gm: fx.GraphModule) -> tuple:
    """A key equal for two block graphs that compute the same function of their inputs."""
    index = {}
    key = []

    def ref(a):
        if isinstance(a, fx.Node):
            return ("node", index[a])
        if isinstance(a, (list, tuple)):
            return (type(a).__name__, tuple(ref(x) for x in a))
        if isinstance(a, dict):
            return ("dict", tuple(sorted((k, ref(v)) for k, v in a.items())))
        if isinstance(a, torch.Tensor):  # a constant tensor makes the block unique
            return ("tensor", id(a))
        return ("const", repr(a))

    for i, node in enumerate(gm.graph.nodes):
        index[node] = i
        if node.op == "placeholder":
            target = ""  # inputs are matched by position, not by name
        elif isinstance(node.target, str):
            target = node.target
        else:
            target = f"{getattr(node.target, '__module__', '')}.{getattr(node.target, '__name__', repr(node.target))}"
        key.append((node.op, target, ref(node.args), ref(node.kwargs)))
    return tuple(key)


class SharedBody:
    """One lowered block graph, shared by every block of the same structure."""

    def __init__(self, gm: fx.GraphModule, lowering: str):
        self.gm = gm
        self.lowering = lowering
        self._compiled: dict[tuple, object] = {}

    def __call__(self, *args):
        # Inductor specializes on its example inputs' strides, but a block's input may be a
        # strided view when the block before it computed (CogVideoX's split of the joint text +
        # video sequence) and a fresh contiguous tensor when that block was skipped. One layout,
        # contiguous, serves both (a no-op for inputs that already are).
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        if self.lowering != "inductor":
            return self.gm(*args)
        # Blocks of one structure may still differ in their inputs' dtypes and shapes: a weight
        # stored as INT8 in some blocks and NVFP4 in others (``int8_weights`` naming a subset of
        # the blocks). Inductor's code is valid for its example inputs' sizes only, so each
        # input signature gets its own compile (one per weight format, in practice).
        signature = tuple((a.dtype, a.shape) if isinstance(a, torch.Tensor) else None for a in args)
        compiled = self._compiled.get(signature)
        if compiled is None:
            from torch._inductor.compile_fx import compile_fx

            compiled = self._compiled[signature] = compile_fx(self.gm, list(args))
        return compiled(*args)


class BlockRunner(torch.nn.Module):
    """Runs or skips one block region (see the module docstring)."""

    def __init__(self, index: int, name: str, body: fx.GraphModule, residual_inputs: list[int] | None, runtime):
        super().__init__()
        self.index = index
        self.block_name = name
        self.body = body  # the block's own graph (kept for dumps and tests)
        self.shared: SharedBody | None = None  # set by the backend at lowering
        self.residual_inputs = residual_inputs  # input position updated by each output; None: not cacheable
        self.runtime = runtime
        self.outlier_count = 0  # set by precision_guards: the body's last output holds this many ratios

    def forward(self, *args):
        rt = self.runtime
        outs = None
        if self.residual_inputs is not None:
            xs = [args[k] for k in self.residual_inputs]
            reused = rt.skip_outputs(self.index, xs)
            if reused is not None:
                return tuple(reused)
        outs = tuple((self.shared or self.body)(*args))
        outliers = None
        if self.outlier_count:
            outs, outliers = outs[:-1], outs[-1]
        if self.residual_inputs is not None and rt.keeps_residuals:
            rt.block_computed(self.index, xs, list(outs), outliers)
        return outs
