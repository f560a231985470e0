"""The ``sixbit`` Dynamo backend.

``torch.compile(model, backend="sixbit", options={...})`` resolves here through
the ``torch_dynamo_backends`` entry point. For each graph Dynamo captures:

1. parse ``options`` into :class:`SixbitOptions` (bad keys/values raise, naming the key);
2. find (or create) the model's :class:`SixbitRuntime`;
3. run the passes (``passes/``) through the pass manager, dumping every stage;
4. release the bf16 storage of the weights that were quantized;
5. lower the transformed graph (eager Python or Inductor) and hand Dynamo a
   callable that goes through the runtime on every call.

If a pass fails on a first compile, the graph falls back to running unquantized,
with one error log line, and nothing is released. (On a recompile whose weights
were already released there is no unquantized path left, so the error is raised.)
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref

import torch
import torch.fx as fx

from .blocks import SharedBody, structure_key
from .context import CompileContext
from .dump import DumpWriter
from .options import SixbitOptions
from .pass_manager import PassManager
from .runtime import InputResolver, runtime_for_inputs
from .weight_store import STORE

log = logging.getLogger("sixbit")
_compile_counter = itertools.count()


def _compile_id(gm: fx.GraphModule) -> str:
    cid = gm.meta.get("dynamo_compile_id")
    frame = f"_frame{cid.frame_id}-{cid.frame_compile_id}" if cid is not None else ""
    return f"{next(_compile_counter):03d}{frame}"


def _model_label(ctx: CompileContext) -> str:
    """Names the model by its blocks (Dynamo does not pass the root module's class)."""
    if not ctx.blocks:
        return "model without transformer blocks"
    classes = {}
    for b in ctx.blocks:
        classes[b.cls] = classes.get(b.cls, 0) + 1
    return ", ".join(f"{n} x {c}" for c, n in classes.items())


def build_pipeline() -> PassManager:
    """Every registered pass, in order; the manager skips those the options switch off."""
    from .passes import PASS_REGISTRY

    return PassManager(list(PASS_REGISTRY.items()))


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule with its own copy of the graph (node meta copied shallowly).

    Dynamo keeps using the graph it hands over, so passes must never mutate it.
    """
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def sixbit_backend(gm: fx.GraphModule, example_inputs, options=None, **kwargs):
    """Dynamo backend entry point (see the module docstring).

    Dynamo reuses a compiled graph for every instance of a module class (parameters are graph
    inputs, not guarded by identity): two models of one class, say Wan2.2's two experts, would
    share it. So the returned callable dispatches on the model, recognised by its first
    Parameter: a model it has not seen gets its own compile (its own quantized weights, runtime
    and lowered graph) on its first call, from the same Dynamo graph.
    """
    compiled = _compile_for_model(gm, example_inputs, options, kwargs)
    key = next((i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)), None)
    if key is None:
        return compiled
    per_model = {id(example_inputs[key]): (weakref.ref(example_inputs[key]), compiled)}

    def sixbit_dispatch(*args):
        p = args[key]
        entry = per_model.get(id(p))
        if entry is None or entry[0]() is not p:
            log.info("sixbit: a graph compiled for one model is called with another instance of its class; "
                     "compiling it for that model")
            entry = (weakref.ref(p), _compile_for_model(gm, list(args), options, kwargs))
            per_model[id(p)] = entry
        return entry[1](*args)

    sixbit_dispatch._sixbit_runtime = getattr(compiled, "_sixbit_runtime", None)  # type: ignore[attr-defined]
    return sixbit_dispatch


def graph_device(example_inputs) -> torch.device | None:
    """The device the graph runs on: its first CUDA input's, else its first tensor's."""
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    cuda = [t for t in tensors if t.is_cuda]
    return (cuda or tensors)[0].device if tensors else None


def _compile_for_model(gm: fx.GraphModule, example_inputs, options, kwargs):
    dynamo_gm, gm = gm, copy_graph_module(gm)
    if kwargs.get("mode") not in (None, "default"):
        log.warning("sixbit: torch.compile(mode=%r) is ignored by the sixbit backend", kwargs["mode"])
    asked = SixbitOptions.from_dict(options)
    opts = asked.for_device(graph_device(example_inputs))
    placeholders = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    runtime = runtime_for_inputs(example_inputs, opts)
    runtime.compiles += 1
    compile_id = _compile_id(gm)
    ctx = CompileContext.for_graph(gm, example_inputs, opts, runtime=runtime, compile_id=compile_id)
    if asked.activation != opts.activation:
        ctx.notes.append(f"options: activation='auto' runs {opts.activation!r} on this device")

    already_released = [p for p in example_inputs if isinstance(p, torch.Tensor) and STORE.is_released(p)]
    dump = DumpWriter(opts.dump_dir, compile_id) if opts.dump_dir else None
    t0 = time.perf_counter()
    try:
        records = build_pipeline().run(gm, ctx, dump)
    except Exception as exc:
        if already_released:
            raise RuntimeError(
                "sixbit: recompiling a model whose weights were already released failed; there is no "
                "unquantized path to fall back to."
            ) from exc
        log.error("sixbit: compile %s failed (%s: %s); running this graph unquantized", compile_id, type(exc).__name__, exc)
        if runtime.compiles == 1:  # no earlier graph of this model uses the store: drop what this one added
            STORE.discard(p for p in example_inputs if isinstance(p, torch.Tensor))
        return dynamo_gm.forward
    runtime.block_names = [b.name for b in ctx.blocks] or runtime.block_names
    name = _model_label(ctx)
    runtime.name = name

    released = STORE.release(ctx.weights_to_release) if opts.free_weights else 0
    specs = ctx.ordered_specs(gm)
    lowering = resolve_lowering(opts, example_inputs)
    if ctx.block_regions:
        # The graph around the blocks holds the run-or-skip calls: it runs as Python, and the
        # block bodies are lowered instead, once per distinct block structure.
        shared = _share_block_bodies(gm, ctx, lowering, dump)
        ctx.notes.append(f"block_regions: {len(ctx.block_regions)} block regions, {shared} distinct bodies lowered with {lowering}; outer graph eager")
        lowering = "eager"
    compiled = _lower(gm, ctx, specs, lowering)
    seconds = time.perf_counter() - t0

    n_quant = sum(1 for li in ctx.linears if li.status == "quantized")
    n_attn = sum(1 for a in ctx.attentions if a.status == "quantized")
    attention = f", {n_attn}/{len(ctx.attentions)} attention calls INT8/FP8" if opts.quantizes_attention else ""
    log.info(
        "sixbit: compiled %s: %d blocks, %d/%d linears quantized (%s activations)%s, %.1f MB released, %.2fs",
        compile_id, len(ctx.blocks), n_quant, len(ctx.linears), opts.activation, attention, released / 2**20, seconds,
    )
    if dump:
        dump.write_index(
            ctx,
            records,
            {
                "model": name,
                "blocks": len(ctx.blocks),
                "linears quantized": f"{n_quant} of {len(ctx.linears)}",
                "attention calls quantized": (f"{n_attn} of {len(ctx.attentions)}" if opts.quantizes_attention
                                              else "none (attention='exact')"),
                "bf16 bytes released": released,
                "lowering": lowering,
                "compile seconds": f"{seconds:.2f}",
                "graph inputs": f"{len(placeholders)} from Dynamo -> {len(specs)} after passes",
            },
        )
    return runtime.wrap(compiled, specs, placeholders, ctx.stats_blocks)


def _share_block_bodies(gm: fx.GraphModule, ctx: CompileContext, lowering: str, dump) -> int:
    """Give every BlockRunner a lowered body shared with the blocks of the same structure."""
    bodies: dict[tuple, SharedBody] = {}
    for name in ctx.block_regions:
        runner = gm.get_submodule(name)
        key = structure_key(runner.body)
        if key not in bodies:
            bodies[key] = SharedBody(runner.body, lowering)
            if dump:
                dump.write_graph(f"block_body_{runner.index}", runner.body, ctx)
        runner.shared = bodies[key]
    return len(bodies)


def resolve_lowering(opts: SixbitOptions, example_inputs) -> str:
    if opts.lowering != "auto":
        return opts.lowering
    on_gpu = any(isinstance(t, torch.Tensor) and t.device.type == "cuda" for t in example_inputs)
    return "inductor" if on_gpu else "eager"


def _lower(gm: fx.GraphModule, ctx: CompileContext, specs, lowering: str):
    if lowering == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, InputResolver(specs, ctx.runtime)(ctx.example_inputs))
