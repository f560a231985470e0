"""What passes share during one compile: options, inputs, findings, and the calling convention."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.fx as fx

from .options import SixbitOptions


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """Where the runtime finds the value of one placeholder of the transformed graph.

    kind ``"arg"``: Dynamo's argument ``index``. ``"qweight"``: field ``field`` of the
    quantized weight of the Parameter passed as Dynamo's argument ``index`` (looked
    up per call, so one graph can serve many module instances). ``"precision_slots"``:
    the runtime's per-call precision tensor.
    """

    kind: str
    index: int = -1
    field: str = ""


@dataclasses.dataclass
class FusionRegion:
    """One fusion region (``fuse_regions``): GEMMs reading one activation, the prologue that
    produces it and each GEMM's elementwise epilogue, as node names."""

    index: int
    block: str
    gemms: list[str]
    prologue: list[str]
    epilogues: dict[str, list[str]]
    note: str = ""
    kernels: list[str] = dataclasses.field(default_factory=list)  # generated kernels (lower_regions)


@dataclasses.dataclass
class BlockInfo:
    """One transformer block region found by ``find_blocks``."""

    name: str  # module path, e.g. "blocks.3"
    index: int  # position among the blocks, in execution order
    cls: str
    group: str  # the ModuleList path, e.g. "blocks"
    nodes: list[str] = dataclasses.field(default_factory=list)
    inputs: list[str] = dataclasses.field(default_factory=list)  # nodes from outside used inside
    outputs: list[str] = dataclasses.field(default_factory=list)  # nodes used after the block


@dataclasses.dataclass
class LinearInfo:
    """One linear call of the captured graph, and what became of it."""

    path: str
    block: str | None
    in_features: int | None
    out_features: int | None
    status: str = "kept"  # "quantized" | "kept"
    reason: str = ""
    slot: int | None = None


@dataclasses.dataclass
class AttentionInfo:
    """One SDPA call of the captured graph, and what became of it (``quantize_attention``)."""

    path: str
    block: str | None
    shape: str  # "q [B, H, Sq, D], kv [B, H, Skv, D]"
    status: str = "kept"  # "quantized" | "kept"
    reason: str = ""


@dataclasses.dataclass
class CompileContext:
    options: SixbitOptions
    example_inputs: list[Any]
    runtime: Any = None  # sixbit_compiler.runtime.SixbitRuntime
    compile_id: str = "compile"
    blocks: list[BlockInfo] = dataclasses.field(default_factory=list)
    linears: list[LinearInfo] = dataclasses.field(default_factory=list)
    attentions: list[AttentionInfo] = dataclasses.field(default_factory=list)
    input_specs: dict[str, InputSpec] = dataclasses.field(default_factory=dict)
    weights_to_release: list[torch.Tensor] = dataclasses.field(default_factory=list)
    block_regions: list[str] = dataclasses.field(default_factory=list)  # submodule names, by block_regions
    regions: list[FusionRegion] = dataclasses.field(default_factory=list)  # by fuse_regions
    kernels: list[Any] = dataclasses.field(default_factory=list)  # codegen PointwiseKernels, by lower_regions
    notes: list[str] = dataclasses.field(default_factory=list)
    #: Block index of each entry of the graph's extra statistics output (precision_guards,
    #: without block regions); None: the graph has no such output.
    stats_blocks: list[int] | None = None

    @classmethod
    def for_graph(cls, gm: fx.GraphModule, example_inputs, options: SixbitOptions, **kw) -> "CompileContext":
        ctx = cls(options=options, example_inputs=list(example_inputs), **kw)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        ctx.input_specs = {n.name: InputSpec("arg", i) for i, n in enumerate(placeholders)}
        return ctx

    def example_input(self, placeholder: fx.Node) -> Any:
        spec = self.input_specs.get(placeholder.name)
        if spec is None or spec.kind != "arg":
            return None
        return self.example_inputs[spec.index]

    def block_of(self, node: fx.Node) -> str | None:
        return node.meta.get("sixbit_block")

    def ordered_specs(self, gm: fx.GraphModule) -> list[InputSpec]:
        """Input specs in the placeholder order of the (transformed) graph."""
        return [self.input_specs[n.name] for n in gm.graph.nodes if n.op == "placeholder"]
