"""quantize_linears: which linears become sixbit ops, and what the pass adds and removes."""

import pytest
import torch

from conftest import apply_pass, capture, context_for
from models import cogvideox_inputs, scratch_dit, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.fx_utils import op_counts
from sixbit_compiler.passes import find_blocks, quantize_linears
from sixbit_compiler.runtime import InputResolver
from sixbit_compiler.weight_store import STORE

LINEAR = "F.linear"
QLINEAR = "sixbit.quantized_linear.default"


def run_passes(gm, ex, **options):
    gm, ctx = context_for(gm, ex, **options)
    find_blocks(gm, ctx)
    placeholders_before = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    return (gm, ctx, *apply_pass(quantize_linears, gm, ctx), placeholders_before)


@pytest.mark.parametrize(
    "make, inputs, total, quantized",
    [
        # Wan: 5 condition-embedder linears + proj_out stay; 10 per block quantized.
        (lambda: tiny_wan(num_layers=2), wan_inputs, 26, 20),
        # CogVideoX: per block 6 token linears quantized, norm1/norm2 modulation linears kept.
        (lambda: tiny_cogvideox(num_layers=2), cogvideox_inputs, 21, 12),
    ],
)
def test_op_counts_on_diffusers_models(make, inputs, total, quantized):
    gm, ex = capture(make(), **inputs())
    gm, ctx, before, after, _ = run_passes(gm, ex)
    assert before[LINEAR] == total
    assert after.get(LINEAR, 0) == total - quantized  # removed exactly the quantized ones
    assert after[QLINEAR] == quantized  # one sixbit op per removed linear
    assert {k: v for k, v in after.items() if k not in (LINEAR, QLINEAR)} == {
        k: v for k, v in before.items() if k not in (LINEAR, QLINEAR)
    }  # nothing else touched
    assert sum(li.status == "quantized" for li in ctx.linears) == quantized
    assert len(ctx.weights_to_release) == quantized


def test_cogvideox_keeps_modulation_linears_in_high_precision():
    gm, ex = capture(tiny_cogvideox(), **cogvideox_inputs())
    _, ctx, *_ = run_passes(gm, ex)
    kept = {li.path: li.reason for li in ctx.linears if li.status == "kept"}
    assert "transformer_blocks.0.norm1.linear" in kept
    assert "no token dimension" in kept["transformer_blocks.0.norm1.linear"]
    assert "outside transformer blocks" in kept["proj_out"]


def test_placeholders_replace_weights_and_slots_added():
    gm, ex = capture(scratch_dit(depth=2), torch.randn(2, 10, 8), torch.tensor([500.0, 500.0]))
    gm, ctx, before, after, ph_before = run_passes(gm, ex)
    ph_after = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    n_q = after[QLINEAR]
    assert n_q == 8  # qkv, proj, fc1, fc2 per block; modulation stays
    # each quantized weight placeholder is gone, replaced by 3 NVFP4 placeholders; plus one slots input
    assert len(ph_after) == len(ph_before) - n_q + 3 * n_q + 1
    assert ph_after.count("sixbit_precision_slots") == 1
    kinds = [ctx.input_specs[n].kind for n in ph_after]
    assert kinds.count("qweight") == 3 * n_q and kinds.count("precision_slots") == 1
    slots = sorted(li.slot for li in ctx.linears if li.status == "quantized")
    assert slots == list(range(n_q))
    # the weights are in the store, quantized once
    for p in ctx.weights_to_release:
        assert STORE.get(p) is not None


def test_transformed_graph_runs_and_is_close():
    model = scratch_dit(depth=2)
    x, t = torch.randn(2, 10, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500.0, 500.0])
    with torch.no_grad():
        ref = model(x, t)
    gm, ex = capture(model, x, t)
    gm, ctx, *_ = run_passes(gm, ex, activation="int8")
    inputs = InputResolver(ctx.ordered_specs(gm), ctx.runtime)(ex)
    with torch.no_grad():
        out = gm(*inputs)[0]
    err = float((out - ref).norm() / ref.norm())
    assert 0 < err < 0.15


def test_include_and_exclude_patterns():
    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    _, ctx, _, after, _ = run_passes(gm, ex, exclude=["*.ffn.*", "blocks.1.*"])
    q = {li.path for li in ctx.linears if li.status == "quantized"}
    assert q == {f"blocks.0.attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    reasons = {li.path: li.reason for li in ctx.linears}
    assert reasons["blocks.0.ffn.net.2"] == "excluded by pattern '*.ffn.*'"

    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    _, ctx, _, after, _ = run_passes(gm, ex, include=["proj_out", "blocks.*.attn1.to_q"])
    q = {li.path for li in ctx.linears if li.status == "quantized"}
    assert q == {"proj_out", "blocks.0.attn1.to_q", "blocks.1.attn1.to_q"}  # include reaches outside blocks
    assert after[QLINEAR] == 3


def test_int8_weights_pattern_stores_those_layers_as_per_channel_int8():
    model = tiny_wan(num_layers=2)
    gm, ex = capture(model, **wan_inputs())
    gm, ctx, _, after, _ = run_passes(gm, ex, int8_weights="*.attn1.to_[qk]")
    assert after[QLINEAR] == 20  # the same ops: only the stored format differs
    reasons = {li.path: li.reason for li in ctx.linears}
    assert reasons["blocks.1.attn1.to_k"].startswith("per-channel INT8 weight (")
    assert reasons["blocks.1.attn1.to_v"].startswith("NVFP4 weight (")
    by_path = dict(model.named_modules())
    for path, fmt, dtype in (("blocks.0.attn1.to_q", "int8", torch.int8), ("blocks.0.attn1.to_v", "nvfp4", torch.uint8)):
        qw = STORE.get(by_path[path].weight)
        assert qw.format == fmt and qw.packed.dtype == dtype
    # the op reads the codes through the same placeholders: the graph runs
    inputs = InputResolver(ctx.ordered_specs(gm), ctx.runtime)(ex)
    with torch.no_grad():
        out = gm(*inputs)[0]
    assert out.isfinite().all()


@pytest.mark.parametrize("second, message", [
    ({"int8_weights": ["*"]}, "weight format 'nvfp4'"),
    ({"weight_scales": "amax"}, "weight_scales 'mse'"),
])
def test_a_released_weight_is_not_requantized_differently(second, message):
    from sixbit_compiler.weight_store import WeightStoreError

    model = scratch_dit(depth=1)
    gm, ex = capture(model, torch.randn(2, 10, 8), torch.tensor([1.0, 1.0]))
    run_passes(gm, ex)
    gm, ex = capture(model, torch.randn(2, 10, 8), torch.tensor([1.0, 1.0]))
    with pytest.raises(WeightStoreError, match=message):
        run_passes(gm, ex, **second)


@pytest.mark.parametrize("rule", ["mse", "amax"])
def test_weight_scales_option_picks_the_nvfp4_block_scale_rule(rule):
    from sixbit_compiler.formats import quantize_nvfp4

    model = scratch_dit(depth=1)
    originals = {name: m.weight.detach().clone() for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    gm, ex = capture(model, torch.randn(2, 10, 8), torch.tensor([1.0, 1.0]))
    _, ctx, *_ = run_passes(gm, ex, weight_scales=rule)
    by_path = dict(model.named_modules())
    quantized = [li.path for li in ctx.linears if li.status == "quantized"]
    assert quantized
    for path in quantized:
        qw = STORE.get(by_path[path].weight)
        packed, scales, _ = quantize_nvfp4(originals[path], scale_search=rule == "mse")
        assert qw.scale_rule == rule
        assert torch.equal(qw.packed, packed) and torch.equal(qw.block_scales.view(torch.uint8), scales.view(torch.uint8))


def test_without_blocks_nothing_is_quantized():
    gm, ex = capture(tiny_wan(num_layers=2), **wan_inputs())
    gm, ctx = context_for(gm, ex)
    quantize_linears(gm, ctx)  # find_blocks did not run
    assert "sixbit.quantized_linear.default" not in op_counts(gm.graph)
    assert all(li.status == "kept" for li in ctx.linears)


def test_recompile_reuses_store_entries(monkeypatch):
    import sixbit_compiler.weight_store as ws

    model = scratch_dit(depth=2)
    gm, ex = capture(model, torch.randn(2, 10, 8), torch.tensor([1.0, 1.0]))
    run_passes(gm, ex)
    calls = []
    monkeypatch.setattr(ws, "quantize_weight", lambda *a: calls.append(a))
    run_passes(gm, ex)  # same Parameters: every weight comes from the store
    assert calls == []


def test_handmade_graph_shared_weight_and_kept_reader():
    """Hand-built graph: two block linears share one weight; a third reads a weight also used by a
    non-linear op (so its bf16 copy must be kept); a head linear stays outside blocks."""
    import torch.fx as fx

    class Block(torch.nn.Module):
        pass

    g = fx.Graph()
    x = g.placeholder("x")
    x.meta["example_value"] = torch.randn(1, 4, 16)
    w_shared, w_also_read, w_head = g.placeholder("w_shared"), g.placeholder("w_also_read"), g.placeholder("w_head")
    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(3)]
    for ph, p in zip((w_shared, w_also_read, w_head), params):
        ph.meta["example_value"] = p

    def in_block(node, i, leaf):
        node.meta["nn_module_stack"] = {
            "b": (f"L['self'].blocks[{i}]", Block),
            "l": (f"L['self'].blocks[{i}].{leaf}", torch.nn.Linear),
        }
        return node

    h = x
    for i in range(2):
        h = in_block(g.call_function(torch._C._nn.linear, (h, w_shared)), i, "fc")
        h.meta["example_value"] = torch.randn(1, 4, 16)
    h2 = in_block(g.call_function(torch._C._nn.linear, (h, w_also_read)), 1, "proj")
    h2.meta["example_value"] = torch.randn(1, 4, 16)
    norm = g.call_function(torch.linalg.vector_norm, (w_also_read,))
    out = g.call_function(torch._C._nn.linear, (h2, w_head))
    out.meta["nn_module_stack"] = {"h": ("L['self'].head", torch.nn.Linear)}
    g.output((out, norm))
    gm = fx.GraphModule(torch.nn.Module(), g)

    gm, ctx, before, after, ph_before = run_passes(gm, [torch.randn(1, 4, 16)] + params)
    assert before["F.linear"] == 4 and after["F.linear"] == 1 and after[QLINEAR] == 3
    ph_after = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    assert "w_shared" not in ph_after  # erased: nothing reads it any more
    assert "w_also_read" in ph_after  # still read by vector_norm
    assert [p is params[0] for p in ctx.weights_to_release] == [True]  # only the fully replaced weight
    assert sum(ctx.input_specs[n].kind == "qweight" for n in ph_after) == 6  # shared weight quantized once
    assert any("also read by non-linear ops" in note for note in ctx.notes)
    kept = {li.path: li.reason for li in ctx.linears if li.status == "kept"}
    assert kept == {"head": "outside transformer blocks (embedding / projection / head)"}
