"""quantize_linears: linear calls inside transformer blocks become ``sixbit::quantized_linear``.

Contract
--------
Expects: ``find_blocks`` has run (nodes carry ``meta["sixbit_block"]``); linear
weights arrive as graph placeholders whose example inputs are the real
``nn.Parameter`` objects (Dynamo's default since inline_inbuilt_nn_modules).

Chooses: a linear is quantized when
* it matches an ``include`` glob (if any are given), or, with no ``include``,
  it sits inside a transformer block;
* it matches no ``exclude`` glob;
* its input has a token dimension (3-D or more): per-sample projections such as
  AdaLN modulation (CogVideoX's ``norm1.linear``) stay in high precision;
* its weight is a 2-D floating-point Parameter input.
Embeddings, timestep and text projections, the final projection, norms and
modulation tables therefore stay in high precision by default. Every linear,
kept or not, gets a row in ``ctx.linears`` with the reason.

Guarantees, for each quantized linear:
* one ``torch._C._nn.linear`` node is replaced by one ``sixbit.quantized_linear``
  node with the same meta (module stack, example value);
* its weight is quantized once into the global weight store (NVFP4 with block scales
  chosen by ``weight_scales``, or per-channel INT8 when its path matches an
  ``int8_weights`` glob; one copy), and three
  placeholders (codes, scales, tensor scale) are added,
  shared by every linear that reads the same weight; the runtime fills them per
  call from the Parameter that Dynamo passes, so one graph never bakes in one
  module's weights;
* the weight placeholder is erased once nothing reads it, and the Parameter is
  queued for release (``ctx.weights_to_release``);
* one ``sixbit_precision_slots`` placeholder is added (if anything was
  quantized); each op reads its precision from its own stable slot, assigned by
  layer path, so recompiles reuse the same slots.
"""

from __future__ import annotations

import fnmatch

import torch
import torch.fx as fx

from sixbit_compiler.context import CompileContext, InputSpec, LinearInfo
from sixbit_compiler.fx_utils import add_placeholder, example_value, innermost_module, is_linear, linear_args
from sixbit_compiler.ops import QUANTIZED_LINEAR
from sixbit_compiler.weight_store import STORE

_SUPPORTED_WEIGHT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_FIELDS = ("packed", "block_scales_bits", "tensor_scale")
_FORMAT_NAMES = {"nvfp4": "NVFP4", "int8": "per-channel INT8"}


def _match(path: str, patterns) -> str | None:
    return next((p for p in patterns if fnmatch.fnmatchcase(path, p)), None)


def _why_not(node: fx.Node, path: str, ctx: CompileContext) -> str | None:
    """None if the linear should be quantized, else the reason it is kept."""
    opts = ctx.options
    hit = _match(path, opts.exclude)
    if hit:
        return f"excluded by pattern {hit!r}"
    if opts.include:
        if not _match(path, opts.include):
            return "not matched by any include pattern"
    elif node.meta.get("sixbit_block") is None:
        return "outside transformer blocks (embedding / projection / head)"
    x, w, _ = linear_args(node)
    xv = example_value(x) if isinstance(x, fx.Node) else None
    if xv is None or xv.dim() < 3:
        return "per-sample input with no token dimension (conditioning / modulation)"
    weight = ctx.example_input(w) if isinstance(w, fx.Node) and w.op == "placeholder" else None
    if not isinstance(weight, torch.Tensor):
        return "weight is not a parameter input of the graph"
    if weight.dim() != 2 or weight.dtype not in _SUPPORTED_WEIGHT_DTYPES:
        return f"unsupported weight {tuple(weight.shape)} {weight.dtype}"
    if xv.dtype not in _SUPPORTED_WEIGHT_DTYPES:
        return f"unsupported activation dtype {xv.dtype}"
    return None


def quantize_linears(gm: fx.GraphModule, ctx: CompileContext) -> None:
    graph = gm.graph
    hadamard = ctx.options.hadamard
    slots_node: fx.Node | None = None
    # weight placeholder -> its three NVFP4 placeholders
    weight_nodes: dict[fx.Node, tuple[fx.Node, fx.Node, fx.Node]] = {}

    for node in list(graph.nodes):
        if not is_linear(node):
            continue
        x, w, b = linear_args(node)
        path = innermost_module(node)
        wv = example_value(w) if isinstance(w, fx.Node) else None
        info = LinearInfo(
            path=path,
            block=node.meta.get("sixbit_block"),
            in_features=int(wv.shape[1]) if wv is not None and wv.dim() == 2 else None,
            out_features=int(wv.shape[0]) if wv is not None and wv.dim() == 2 else None,
        )
        ctx.linears.append(info)
        reason = _why_not(node, path, ctx)
        if reason:
            info.reason = reason
            continue

        weight = ctx.example_input(w)
        spec = ctx.input_specs[w.name]
        if w not in weight_nodes:
            fmt = "int8" if _match(path, ctx.options.int8_weights) else "nvfp4"
            qw = STORE.quantize(weight, hadamard, fmt, ctx.options.weight_scales)
            stem = (path or w.name).replace(".", "_")
            added = []
            for field in _FIELDS:
                ph = add_placeholder(graph, f"{stem}_w_{field.replace('_bits', '')}")
                ctx.input_specs[ph.name] = InputSpec("qweight", spec.index, field)
                added.append(ph)
            weight_nodes[w] = tuple(added)
            info.reason = f"{_FORMAT_NAMES[qw.format]} weight ({qw.nbytes} B, was {qw.source_nbytes} B)"
        else:
            info.reason = "quantized weight (shared with an earlier linear)"
        if slots_node is None:
            slots_node = add_placeholder(graph, "sixbit_precision_slots")
            ctx.input_specs[slots_node.name] = InputSpec("precision_slots")

        slot = ctx.runtime.slot_for(path, info.block)
        packed, scales, tscale = weight_nodes[w]
        with graph.inserting_before(node):
            new = graph.call_function(
                QUANTIZED_LINEAR,
                (x, packed, scales, tscale, b, slots_node, slot, info.in_features, hadamard),
            )
        new.meta.update(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        info.status, info.slot = "quantized", slot

    for w in weight_nodes:
        param = ctx.example_input(w)
        if not w.users:
            del ctx.input_specs[w.name]
            graph.erase_node(w)
            ctx.weights_to_release.append(param)
        else:
            ctx.notes.append(f"quantize_linears: {w.name} is also read by non-linear ops; its bf16 copy is kept")
