"""precision_guards: the statistics DMPQ and PDR decide from, measured inside the compiled graph.

Contract
--------
Expects: ``find_blocks`` and ``quantize_linears`` have run; runs after ``block_regions``.
Runs when the model measures block statistics (``activation="dynamic"`` or
``block_cache=True``; ``enabled_by = "measures_blocks"``). It adds no graph break and no
host sync: the statistics stay on the device until the runtime's one transfer per call.

Each quantized linear already reads its precision from ``precision_slots[slot]``; this pass
adds what the runtime needs to set those slots at the next call:

* **without block regions** (no block cache): per block whose output pairs with a residual
  input, one ``sixbit.residual_abs_sums(Y, X)`` = [‖Y − X‖₁, ‖X‖₁] on its first residual
  stream, right after the block (an opaque op, so Inductor keeps it there and the block's
  input dies early; one fused read of X and Y on CUDA), all stacked (one ``torch.stack``)
  into an fp32 [blocks, 2] tensor appended to the graph's outputs. Γ is the ratio, taken on
  the host. ``ctx.stats_blocks`` lists the block index of each row; the runtime strips the
  extra output before Dynamo sees it. What reads Y after the block reads Y + 0·sums instead
  (``torch.isfinite``, ``torch.mul``, ``torch.where``, ``getitem``, ``torch.add``: a scalar
  add that Inductor fuses into the next block's first kernel). This data dependency pins the
  op right after its block: without it Inductor sank every block's op to the end of the
  graph and recomputed their inputs there, keeping them all alive (+4.2 GB peak on
  Wan2.1-1.3B at 480p, measured).
* **with block regions**: the runner already measures Γ and the residual change when a
  block computes. Inside each region body, per distinct quantized-linear input x, the
  outlier ratio max|x| / mean|x| over every 16th token (``torch.flatten``, a strided
  ``getitem``, ``torch.abs``, ``torch.amax``, fp32 ``torch.mean``, ``torch.div``), stacked in
  slot order and appended to the body's outputs (the runner
  strips it): PDR's first rule reads it. Bodies stay identical across blocks of one
  class, so they still share one lowered body.

Guarantees: the original outputs are unchanged (same nodes, same order); only the ops named
above are added.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from sixbit_compiler.context import CompileContext
from sixbit_compiler.ops import QUANTIZED_GEMMS, RESIDUAL_ABS_SUMS
from sixbit_compiler.residuals import block_io, block_members, pair_residuals


def _append_output(graph: fx.Graph, value: fx.Node) -> None:
    out = next(n for n in graph.nodes if n.op == "output")
    result = out.args[0]
    out.args = ((*result, value) if isinstance(result, (tuple, list)) else (result, value),)


def _block_gammas(gm: fx.GraphModule, ctx: CompileContext) -> None:
    members = block_members(gm)
    ios = [block_io(b.name, b.group, members[b.name]) for b in ctx.blocks if members.get(b.name)]
    for note in pair_residuals(ios):
        ctx.notes.append(f"precision_guards: {note}; no Γ (its layers run INT8 under DMPQ)")
    index = {b.name: b.index for b in ctx.blocks}
    graph = gm.graph
    gammas, blocks = [], []
    for io in ios:
        if not io.streams:
            continue
        y, x = io.outputs[0], io.inputs[io.streams[0]]
        readers = [u for u in y.users if u.meta.get("sixbit_block") != io.name]  # reads after the block
        cursor = y

        def add(fn, *args):
            nonlocal cursor
            with graph.inserting_after(cursor):
                cursor = graph.call_function(fn, args)
            return cursor

        sums = add(RESIDUAL_ABS_SUMS, y, x)
        finite = add(torch.isfinite, sums)
        zero = add(torch.where, finite, add(torch.mul, sums, 0.0), 0.0)
        pinned = add(torch.add, y, add(operator.getitem, zero, 0))
        for user in readers:
            user.replace_input_with(y, pinned)
        gammas.append(sums)
        blocks.append(index[io.name])
    if not gammas:
        ctx.notes.append("precision_guards: no block with a residual stream; DMPQ runs every layer INT8")
        return
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        stats = graph.call_function(torch.stack, (gammas,))
    _append_output(graph, stats)
    ctx.stats_blocks = blocks


#: PDR's outlier ratio reads every this-many-th token: activation outliers in DiTs sit in fixed
#: channels across tokens, so a token sample finds them, at 1/16 of a full read (a full read
#: of every linear input cost ~10 ms per Wan2.1-1.3B call at 480p, against ~0.6 ms).
OUTLIER_ROW_STRIDE = 16


def _body_outlier_ratios(body: fx.GraphModule) -> int:
    """Append max|x| / mean|x| of each quantized linear's input (slot order) to the body's outputs."""
    graph = body.graph
    qls = sorted((n for n in graph.nodes if n.op == "call_function" and n.target in QUANTIZED_GEMMS),
                 key=lambda n: n.args[6])
    if not qls:
        return 0
    ratio_of: dict[fx.Node, fx.Node] = {}
    for q in qls:
        x = q.args[0]
        if x in ratio_of:
            continue
        with graph.inserting_before(q):
            rows = graph.call_function(torch.flatten, (x, 0, -2))
            sample = graph.call_function(operator.getitem, (rows, slice(None, None, OUTLIER_ROW_STRIDE)))
            a = graph.call_function(torch.abs, (sample,))
            peak = graph.call_function(torch.amax, (a,))
            mean = graph.call_function(torch.mean, (a,), {"dtype": torch.float32})
            ratio_of[x] = graph.call_function(torch.div, (peak, mean))
    out = next(n for n in graph.nodes if n.op == "output")
    with graph.inserting_before(out):
        stats = graph.call_function(torch.stack, ([ratio_of[q.args[0]] for q in qls],))
    _append_output(graph, stats)
    body.recompile()
    return len(qls)


def precision_guards(gm: fx.GraphModule, ctx: CompileContext) -> None:
    if not ctx.block_regions:
        _block_gammas(gm, ctx)
        return
    for name in ctx.block_regions:
        runner = gm.get_submodule(name)
        runner.outlier_count = _body_outlier_ratios(runner.body)


precision_guards.enabled_by = "measures_blocks"
