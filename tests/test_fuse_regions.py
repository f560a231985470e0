"""fuse_regions: the partition of each block into prologue / GEMM / epilogue regions."""

import collections

import pytest
import torch
from torch import nn

import sixbit_compiler
from conftest import apply_pass, capture, context_for
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.fx_utils import op_counts
from sixbit_compiler.passes import find_blocks, fuse_regions, quantize_linears
from sixbit_compiler.passes.fuse_regions import QUANTIZED_LINEAR, is_row_norm


def partitioned(model, *args, **kwargs):
    gm, ex = capture(model, *args, **kwargs)
    gm, ctx = context_for(gm, ex, activation="int8")
    find_blocks(gm, ctx)
    quantize_linears(gm, ctx)
    before, _ = apply_pass(fuse_regions, gm, ctx)
    return gm, ctx, before


def nodes_by_name(gm):
    return {n.name: n for n in gm.graph.nodes}


@pytest.mark.parametrize("make, inputs, per_block, gemms_per_block", [
    (lambda: tiny_wan(num_layers=3), wan_inputs, 7, 10),  # qkv | out | cross q | cross kv | cross out | ffn in | ffn out
    (lambda: tiny_cogvideox(num_layers=3), cogvideox_inputs, 4, 6),  # qkv | out | ffn in | ffn out
], ids=["wan", "cogvideox"])
def test_regions_per_block_and_the_graph_is_unchanged(make, inputs, per_block, gemms_per_block):
    gm, ctx, before = partitioned(make(), **inputs())
    assert op_counts(gm.graph) == before  # annotation only: no node added or removed
    per = collections.Counter(r.block for r in ctx.regions)
    assert len(per) == 3 and set(per.values()) == {per_block}
    assert all(sum(len(r.gemms) for r in ctx.regions if r.block == b) == gemms_per_block for b in per)
    # every quantized linear is in exactly one region, as its GEMM
    gemm_nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is QUANTIZED_LINEAR]
    assert sorted(g for r in ctx.regions for g in r.gemms) == sorted(n.name for n in gemm_nodes)
    names = nodes_by_name(gm)
    for r in ctx.regions:
        for g, epi in r.epilogues.items():
            assert not any(is_row_norm(names[n]) for n in epi)  # a GEMM tile holds no whole row
        for n in r.prologue + [x for e in r.epilogues.values() for x in e] + r.gemms:
            assert names[n].meta["sixbit_region"] == r.index and names[n].meta["sixbit_block"] == r.block


def test_wan_block_regions_hold_the_expected_ops():
    gm, ctx, _ = partitioned(tiny_wan(num_layers=2), **wan_inputs())
    names = nodes_by_name(gm)
    first = [r for r in ctx.regions if r.block == "blocks.0"]
    qkv, ffn_in, ffn_out = first[0], first[5], first[6]
    assert len(qkv.gemms) == 3
    # AdaLN prologue: layer norm, then x * (1 + scale) + shift, with "1 + scale" pulled in
    prologue_targets = {str(names[n].target) for n in qkv.prologue}
    assert any("layer_norm" in t for t in prologue_targets) and "<built-in function mul>" in prologue_targets
    assert sum("<built-in function add>" == str(names[n].target) for n in qkv.prologue) == 2
    # GELU after ffn.net.0 belongs to its epilogue; ffn.net.2 therefore starts with no prologue
    (epi_in,) = ffn_in.epilogues.values()
    assert any("gelu" in str(names[n].target) for n in epi_in)
    assert ffn_out.prologue == []
    # ffn.net.2's epilogue: gate multiply, residual add, cast; its last node feeds the next block
    (epi_out,) = ffn_out.epilogues.values()
    targets = [str(names[n].target) for n in epi_out]
    assert "<built-in function mul>" in targets and "<built-in function add>" in targets
    assert any(u.meta.get("sixbit_block") != "blocks.0" for u in names[epi_out[-1]].users)


class SplitBlock(nn.Module):
    """fc1 -> GELU -> cumsum (no codegen for scans) -> * 2 -> fc2."""

    def __init__(self, d=32):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.fc1(x))
        h = torch.cumsum(h, dim=-1) * 2.0
        return x + self.fc2(h)


class Stack(nn.Module):
    def __init__(self, block, n=2):
        super().__init__()
        self.blocks = nn.ModuleList(block() for _ in range(n))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_an_unsupported_op_in_the_middle_splits_cleanly():
    gm, ctx, _ = partitioned(Stack(SplitBlock), torch.randn(2, 16, 32))
    names = nodes_by_name(gm)
    fc1, fc2 = [r for r in ctx.regions if r.block == "blocks.0"]
    (epi1,) = fc1.epilogues.values()
    assert [str(names[n].target) for n in epi1] == [str(torch._C._nn.gelu)] or \
        [names[n].target for n in epi1] == [torch.nn.functional.gelu]
    cumsum = next(n for n in gm.graph.nodes if n.target is torch.cumsum and n.meta.get("sixbit_block") == "blocks.0")
    assert "sixbit_region" not in cumsum.meta  # left outside, for Inductor
    assert [str(names[n].target) for n in fc2.prologue] == ["<built-in function mul>"]
    (epi2,) = fc2.epilogues.values()
    assert [str(names[n].target) for n in epi2] == ["<built-in function add>"]  # the residual


class LoopBlock(nn.Module):
    """Two GEMMs on one input; a's epilogue adds a scan of b's output: fusing that epilogue into
    the region would need b's output to leave the region and come back."""

    def __init__(self, d=32):
        super().__init__()
        self.a, self.b = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        k = self.b(x)
        return x + (self.a(x) + torch.cumsum(k, dim=-1))


def test_a_region_that_would_close_a_cycle_drops_its_epilogues():
    gm, ctx, _ = partitioned(Stack(LoopBlock), torch.randn(2, 16, 32))
    region = next(r for r in ctx.regions if r.block == "blocks.0")
    assert len(region.gemms) == 2 and "not convex" in region.note
    assert all(epi == [] for epi in region.epilogues.values())


def test_the_pass_can_be_switched_off_and_the_regions_are_in_the_dump(tmp_path):
    model = tiny_wan(num_layers=2)
    with torch.no_grad():
        off = torch.compile(tiny_wan(num_layers=2), backend="sixbit",
                            options={"activation": "int8", "passes": {"fuse_regions": False}})
        on = torch.compile(model, backend="sixbit", options={"activation": "int8", "dump_dir": str(tmp_path)})
        a, b = off(**wan_inputs())[0], on(**wan_inputs())[0]
    torch.testing.assert_close(a, b)  # annotation only: the same outputs
    (index,) = tmp_path.glob("*/index.md")
    text = index.read_text()
    assert "## Fusion regions (14)" in text and "| `fuse_regions` | ran |" in text
    assert sixbit_compiler.stats(on) is not None
