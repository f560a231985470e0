"""Human-readable dumps of one compile: a Python file per stage and an index page.

Layout (one folder per compile)::

    <dump_dir>/<compile_id>/
        00_captured.py          # the graph Dynamo handed to the backend
        01_find_blocks.py       # after each pass that ran, in order
        02_quantize_linears.py
        index.md                # passes, op counts per stage, every linear, blocks

See docs/dumps.md for how to read them.
"""

from __future__ import annotations

import dataclasses
import os
import re

import torch.fx as fx

from .context import CompileContext


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def _graph_source(gm: fx.GraphModule, ctx: CompileContext, stage: str) -> str:
    header = [f"# sixbit dump: {ctx.compile_id}, stage {stage!r}", "#"]
    if ctx.blocks:
        header.append("# transformer blocks (node -> block is in node.meta['sixbit_block']):")
        for b in ctx.blocks:
            first, last = (b.nodes[0], b.nodes[-1]) if b.nodes else ("-", "-")
            header.append(f"#   {b.name:<28} {b.cls:<28} {len(b.nodes):5d} nodes  {first} .. {last}")
    if ctx.regions:
        header.append("# fusion regions (node meta 'sixbit_region' / 'sixbit_region_part'; index.md has the ops):")
        for r in ctx.regions:
            epi = sum(len(e) for e in r.epilogues.values())
            header.append(f"#   region {r.index:<4} {r.block:<28} {len(r.gemms)} GEMM(s) {', '.join(r.gemms)}; "
                          f"prologue {len(r.prologue)} ops, epilogues {epi} ops")
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    supplied = [(n, ctx.input_specs[n]) for n in names if n in ctx.input_specs and ctx.input_specs[n].kind != "arg"]
    if supplied:
        header.append("# inputs the runtime supplies per call (not Dynamo's):")
        for n, s in supplied:
            if s.kind == "qweight" and s.field == "packed":
                stem = n[: -len("_packed")]
                header.append(f"#   {stem}_{{packed,block_scales,tensor_scale}}: NVFP4 weight of Dynamo input {s.index}")
            elif s.kind == "precision_slots":
                header.append(f"#   {n}: int8 precision code per quantized linear, set by the runtime each call")
    body = gm.print_readable(print_output=False, include_stride=False, include_device=True, colored=False)
    return "\n".join(header) + "\n\n" + body


class DumpWriter:
    def __init__(self, root: str, compile_id: str):
        self.dir = os.path.join(root, _safe(compile_id))
        os.makedirs(self.dir, exist_ok=True)
        self.stage = 0
        self.files: list[str] = []

    def write_graph(self, stage: str, gm: fx.GraphModule, ctx: CompileContext) -> str:
        fname = f"{self.stage:02d}_{_safe(stage)}.py"
        self.stage += 1
        with open(os.path.join(self.dir, fname), "w") as f:
            f.write(_graph_source(gm, ctx, stage))
        self.files.append(fname)
        return fname

    def write_text(self, fname: str, text: str) -> str:
        os.makedirs(os.path.dirname(os.path.join(self.dir, fname)), exist_ok=True)
        with open(os.path.join(self.dir, fname), "w") as f:
            f.write(text)
        self.files.append(fname)
        return fname

    def write_index(self, ctx: CompileContext, records, summary: dict) -> str:
        lines = [f"# sixbit compile `{ctx.compile_id}`", ""]
        for k, v in summary.items():
            lines.append(f"- **{k}**: {v}")
        lines += ["", "## Options", "", "```"]
        lines += [f"{f.name} = {getattr(ctx.options, f.name)!r}" for f in dataclasses.fields(ctx.options)]
        lines += ["```", "", "## Passes, in order", "", "| # | pass | status | seconds | ops added / removed | graph |", "|---|---|---|---|---|---|"]
        for i, r in enumerate(records, 1):
            delta = ", ".join(f"{k} {v:+d}" for k, v in r.delta().items()) or "none"
            lines.append(f"| {i} | `{r.name}` | {r.status} | {r.seconds:.3f} | {delta} | {r.dump_file or '-'} |")
        lines += ["", "## Op counts per stage", ""]
        stages = ["captured"] + [r.name for r in records]
        counts = [records[0].counts_before if records else {}] + [r.counts_after for r in records]
        ops = sorted(set().union(*counts)) if counts else []
        lines.append("| op | " + " | ".join(stages) + " |")
        lines.append("|---|" + "---|" * len(stages))
        for op in ops:
            lines.append(f"| `{op}` | " + " | ".join(str(c.get(op, 0)) for c in counts) + " |")
        lines += ["", f"## Linear layers ({len(ctx.linears)})", "", "| layer | block | in → out | became | why |", "|---|---|---|---|---|"]
        for li in ctx.linears:
            became = f"sixbit.quantized_linear (slot {li.slot})" if li.status == "quantized" else "unchanged (high precision)"
            lines.append(f"| `{li.path}` | {li.block or '-'} | {li.in_features} → {li.out_features} | {became} | {li.reason} |")
        if ctx.attentions:
            lines += ["", f"## Attention calls ({len(ctx.attentions)})", "", "| module | block | shapes | became | why |",
                      "|---|---|---|---|---|"]
            for a in ctx.attentions:
                became = "sixbit.quantized_attention" if a.status == "quantized" else "unchanged (exact SDPA)"
                lines.append(f"| `{a.path}` | {a.block or '-'} | {a.shape} | {became} | {a.reason} |")
        lines += ["", f"## Transformer blocks ({len(ctx.blocks)})", ""]
        if ctx.blocks:
            lines += ["| block | class | nodes | inputs from outside | outputs used after |", "|---|---|---|---|---|"]
            for b in ctx.blocks:
                lines.append(f"| `{b.name}` | {b.cls} | {len(b.nodes)} | {', '.join(b.inputs)} | {', '.join(b.outputs)} |")
        for kernel in ctx.kernels:  # generated by lower_regions: the source next to the graph
            self.write_text(f"kernels/{kernel.name}.py", kernel.source)
        lines += ["", f"## Fusion regions ({len(ctx.regions)})", ""]
        if ctx.regions:
            fused = sum(1 for k in ctx.kernels if hasattr(k, "alone"))
            quantizing = sum(1 for k in ctx.kernels if k.name.startswith("prologue_int8_"))
            lowered = (f"lowered to {len(ctx.kernels)} distinct generated kernels (`kernels/`; every block's "
                       f"same region shares one): {fused} GEMM templates with a fused epilogue (each with its "
                       f"chain alone, for NVFP4 / bf16 calls), {len(ctx.kernels) - fused - quantizing} elementwise "
                       f"chains and {quantizing} chunked norm prologues writing INT8 codes (`quantize_prologues`)"
                       if ctx.kernels else "not lowered (`codegen` off): they run unfused")
            lines += [f"Recorded by `fuse_regions` (node meta `sixbit_region` / `sixbit_region_part`); {lowered}.", "",
                      "| region | block | GEMMs | prologue | epilogues | kernels | note |", "|---|---|---|---|---|---|---|"]
            for r in ctx.regions:
                epi = "; ".join(f"{g}: {', '.join(ns) or '-'}" for g, ns in r.epilogues.items())
                kernels = ", ".join(f"`{k}`" for k in r.kernels) or "-"
                lines.append(f"| {r.index} | `{r.block}` | {', '.join(r.gemms)} | {', '.join(r.prologue) or '-'} | "
                             f"{epi} | {kernels} | {r.note} |")
        if ctx.notes:
            lines += ["", "## Notes", ""] + [f"- {n}" for n in ctx.notes]
        return self.write_text("index.md", "\n".join(lines) + "\n")
