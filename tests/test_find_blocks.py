"""find_blocks: generic transformer-block discovery; adds and removes no nodes."""

import pytest
import torch
import torch.fx as fx

from conftest import capture, context_for
from models import cogvideox_inputs, hunyuan_inputs, scratch_dit, tiny_cogvideox, tiny_hunyuan, tiny_wan, wan_inputs
from sixbit_compiler.fx_utils import op_counts
from sixbit_compiler.passes import find_blocks


def run_find_blocks(gm, example_inputs):
    gm, ctx = context_for(gm, example_inputs)
    before = op_counts(gm.graph)
    n_nodes = len(gm.graph.nodes)
    find_blocks(gm, ctx)
    assert op_counts(gm.graph) == before and len(gm.graph.nodes) == n_nodes  # no ops added or removed
    return gm, ctx


@pytest.mark.parametrize(
    "make, inputs, group, cls, n",
    [
        (lambda: tiny_wan(num_layers=3), wan_inputs, "blocks", "WanTransformerBlock", 3),
        (lambda: tiny_cogvideox(num_layers=2), cogvideox_inputs, "transformer_blocks", "CogVideoXBlock", 2),
    ],
)
def test_diffusers_blocks(make, inputs, group, cls, n):
    gm, ex = capture(make(), **inputs())
    gm, ctx = run_find_blocks(gm, ex)
    assert [b.name for b in ctx.blocks] == [f"{group}.{i}" for i in range(n)]
    assert all(b.cls == cls and b.group == group for b in ctx.blocks)
    # every node of a block is tagged with it; linears outside blocks are not
    for node in gm.graph.nodes:
        block = node.meta.get("sixbit_block")
        if block is not None:
            assert node.name in ctx.blocks[node.meta["sixbit_block_index"]].nodes
    # block i feeds block i+1: an output of one block is an input of the next
    for a, b in zip(ctx.blocks, ctx.blocks[1:]):
        assert set(a.outputs) & set(b.inputs)


def test_scratch_dit_blocks():
    model = scratch_dit(depth=4)
    gm, ex = capture(model, torch.randn(2, 10, 8), torch.tensor([500.0, 500.0]))
    gm, ctx = run_find_blocks(gm, ex)
    assert [b.name for b in ctx.blocks] == ["layers.0", "layers.1", "layers.2", "layers.3"]
    tagged = {n.name for n in gm.graph.nodes if "sixbit_block" in n.meta}
    assert tagged == {name for b in ctx.blocks for name in b.nodes}
    # embed/head linears are outside blocks
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is torch._C._nn.linear and n.meta.get("sixbit_block") is None:
            path = list(n.meta["nn_module_stack"].values())[-1][0]
            assert "embed" in path or "head" in path


def _handmade_graph():
    """x -> [blocks.0: linear] -> [blocks.1: linear] -> head linear, with a nested ModuleList in each block."""
    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.randn(1, 4, 16)
    ws = [g.placeholder(f"w{i}") for i in range(3)]
    h = x

    def stack(*paths):
        return {f"k{i}": (f"L['self'].{p}", cls) for i, (p, cls) in enumerate(paths)}

    class Block(torch.nn.Module):
        pass

    class Inner(torch.nn.Module):
        pass

    for i in range(2):
        lin = g.call_function(torch._C._nn.linear, (h, ws[i]))
        lin.meta["nn_module_stack"] = stack(
            (f"blocks[{i}]", Block), (f"blocks[{i}].mlp.layers[0]", Inner), (f"blocks[{i}].mlp.layers[0].fc", torch.nn.Linear)
        )
        act = g.call_function(torch.nn.functional.gelu, (lin,))
        act.meta["nn_module_stack"] = stack((f"blocks[{i}]", Block))
        h = act
    out = g.call_function(torch._C._nn.linear, (h, ws[2]))
    out.meta["nn_module_stack"] = stack(("head", torch.nn.Linear))
    g.output(out)
    return fx.GraphModule(torch.nn.Module(), g)


def test_handmade_graph_ignores_nested_lists():
    gm = _handmade_graph()
    gm, ctx = run_find_blocks(gm, [None] * 4)
    assert [b.name for b in ctx.blocks] == ["blocks.0", "blocks.1"]  # not blocks.i.mlp.layers.0
    assert [len(b.nodes) for b in ctx.blocks] == [2, 2]
    head = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    assert "sixbit_block" not in head.meta


def test_no_blocks_in_a_plain_mlp():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU(), torch.nn.Linear(8, 8))
    gm, ex = capture(model, torch.randn(2, 3, 8))
    gm, ctx = run_find_blocks(gm, ex)
    assert ctx.blocks == []  # children are bare Linears, not blocks


def test_capture_helper_refuses_graph_breaks():
    from sixbit_compiler.testing import capture as public_capture

    class Breaks(torch.nn.Module):
        def forward(self, x):
            x = x + 1
            torch._dynamo.graph_break()
            return x * 2

    with pytest.raises(AssertionError, match="graph breaks"):
        public_capture(Breaks(), torch.randn(2))


def test_hunyuan_dual_and_single_stream_blocks_but_not_the_text_refiner():
    gm, ex = capture(tiny_hunyuan(num_layers=4, num_single_layers=8, num_refiner_layers=2), **hunyuan_inputs())
    gm, ctx = run_find_blocks(gm, ex)
    names = [b.name for b in ctx.blocks]
    assert names == [f"transformer_blocks.{i}" for i in range(4)] + [f"single_transformer_blocks.{i}" for i in range(8)]
    assert {b.cls for b in ctx.blocks} == {"HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock"}
    assert any("refiner_blocks" in note and "too short a run" in note for note in ctx.notes)
