"""lower_regions (options={"codegen": True}): generated kernels replace the regions' chains."""

import pytest
import torch

from conftest import apply_pass, capture, context_for, rel_err
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.passes import find_blocks, fuse_regions, lower_regions, quantize_linears


def lowered_graph(make, inputs):
    gm, ex = capture(make(), **inputs())
    gm, ctx = context_for(gm, ex, activation="int8", codegen=True)
    find_blocks(gm, ctx)
    quantize_linears(gm, ctx)
    fuse_regions(gm, ctx)
    return (gm, ctx, *apply_pass(lower_regions, gm, ctx))


def test_prologues_become_kernels_and_epilogues_join_their_gemm():
    gm, ctx, before, after = lowered_graph(lambda: tiny_wan(num_layers=2), wan_inputs)
    prologues = sum(bool(r.prologue) for r in ctx.regions)
    epilogues = sum(bool(e) for r in ctx.regions for e in r.epilogues.values())
    assert (prologues, epilogues) == (10, 8)  # a Wan block: 5 prologues; 4 GEMMs with an epilogue
    assert after["sixbit.region_kernel.default"] == prologues
    assert after["sixbit.linear_epilogue.default"] == epilogues
    assert after["sixbit.quantized_linear.default"] == before["sixbit.quantized_linear.default"] - epilogues
    # identical chains share one kernel: every block's same region, and within a block the AdaLN
    # prologues of self-attention and FFN (one code) and the two norm-only prologues: 3 + 4 + 4
    assert len(ctx.kernels) == 11 and len({k for r in ctx.regions for k in r.kernels}) == 11
    assert ctx.regions[0].kernels == ctx.regions[len(ctx.regions) // 2].kernels  # blocks.0 and blocks.1
    # each fused GEMM keeps the quantized linear's arguments, in order (slots, slot: 5, 6)
    fused = [n for n in gm.graph.nodes if n.target is torch.ops.sixbit.linear_epilogue.default]
    assert all(n.args[5].name == "sixbit_precision_slots" and isinstance(n.args[6], int) for n in fused)
    assert sorted(n.args[6] for n in fused) == sorted(set(n.args[6] for n in fused))
    # the AdaLN norms and GELUs inside the blocks are now in kernels; attention's norms are not regions
    assert after.get("F.layer_norm", 0) == before["F.layer_norm"] - 6
    in_blocks = [n for n in gm.graph.nodes if n.meta.get("sixbit_block")]
    assert not any("gelu" in str(n.target) for n in in_blocks)  # (the text embedder's GELU is outside)
    kernels = [n for n in gm.graph.nodes if n.target in (torch.ops.sixbit.region_kernel.default,
                                                         torch.ops.sixbit.linear_epilogue.default)]
    assert all(n.meta["sixbit_block"] in ("blocks.0", "blocks.1") for n in kernels)


@pytest.mark.parametrize("make, inputs", [(tiny_wan, wan_inputs), (tiny_cogvideox, cogvideox_inputs)],
                         ids=["wan", "cogvideox"])
@pytest.mark.parametrize("block_cache", [False, True], ids=["flat", "block_regions"])
@pytest.mark.parametrize("activation", ["int8", "fp8", "nvfp4", "dynamic"])
def test_outputs_equal_the_unfused_quantized_path(make, inputs, block_cache, activation):
    """INT8 calls take the fused GEMM kernels; NVFP4 calls (and DMPQ's mix) the GEMM, then the chain."""
    outs = []
    for codegen in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(make(num_layers=2), backend="sixbit",
                                 options={"activation": activation, "codegen": codegen, "block_cache": block_cache})
        with torch.no_grad():
            outs.append([compiled(**inputs())[0] for _ in range(2)])  # DMPQ decides from call 1's Γ
    for fused, unfused in zip(outs[1], outs[0]):
        assert rel_err(fused, unfused) < 1e-5  # fp32 models: the same math, fp32 rounding apart


@pytest.mark.parametrize("activation", ["int8", "fp8", "nvfp4"])
def test_int8_stored_weights_through_the_fused_kernels_equal_the_unfused_path(activation):
    """Weights stored as per-channel INT8 (``int8_weights``) reach the generated GEMM kernels
    as their operand (no decode) and give what the unfused path gives."""
    outs = []
    for codegen in (False, True):
        torch._dynamo.reset()
        compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit",
                                 options={"activation": activation, "codegen": codegen, "int8_weights": "*.attn1.*"})
        with torch.no_grad():
            outs.append(compiled(**wan_inputs())[0])
    # the unfused path on CPU is the spec (scales applied in fp64, rounded once), the fused
    # kernel rounds after each fp32 scale: an INT8 code of a later layer's activation that sits
    # on a rounding boundary can flip (measured 1.7e-5 for INT8, below 1e-5 for the others)
    assert rel_err(outs[1], outs[0]) < 5e-5


def test_generated_sources_are_in_the_dump_and_the_pass_is_off_by_default(tmp_path):
    with torch.no_grad():
        torch.compile(tiny_wan(num_layers=2), backend="sixbit",
                      options={"activation": "int8", "codegen": True, "dump_dir": str(tmp_path / "on")})(**wan_inputs())
        torch._dynamo.reset()
        torch.compile(tiny_wan(num_layers=2), backend="sixbit",
                      options={"activation": "int8", "dump_dir": str(tmp_path / "off")})(**wan_inputs())
    (on,) = (tmp_path / "on").iterdir()
    sources = sorted(p.name for p in (on / "kernels").iterdir())
    assert len(sources) == 11 and all("@triton.jit" in (on / "kernels" / s).read_text() for s in sources)
    fused = [s for s in sources if s.startswith("gemm_epilogue_")]
    assert len(fused) == 4 and "scaled_tile(" in (on / "kernels" / fused[0]).read_text()  # the GEMM template
    index = (on / "index.md").read_text()
    assert "11 distinct generated kernels" in index and f"`{fused[0][:-3]}`" in index  # listed by region
    assert "0 chunked norm prologues writing INT8 codes" in index  # quantize_prologues is opt-in
    (off,) = (tmp_path / "off").iterdir()
    assert "`lower_regions` | off (needs codegen)" in (off / "index.md").read_text() and not (off / "kernels").exists()


def test_nothing_to_run_the_kernels_leaves_the_regions_unfused(monkeypatch, caplog):
    import importlib

    mod = importlib.import_module("sixbit_compiler.passes.lower_regions")  # the module, not the pass

    monkeypatch.setattr(mod, "interpreting", lambda: False)  # a CPU graph and no interpreter
    with caplog.at_level("WARNING", logger="sixbit"):
        gm, ctx, before, after = lowered_graph(lambda: tiny_wan(num_layers=2), wan_inputs)
    assert after == before and not ctx.kernels
    assert any("regions left unfused" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("activation, tol", [("bf16", 1e-6), ("int8", 1e-3)])
def test_hunyuan_dual_and_single_stream_blocks_equal_the_unfused_path(activation, tol, tmp_path):
    """HunyuanVideo's two block classes lower too. Unquantized activations: the same math to fp32
    rounding. INT8: the fused GEMM scales in fp32 where the CPU reference scales in fp64, and a
    one-ulp difference can move an INT8 code of a later layer, so 12 blocks deep the outputs
    agree to ~1e-4 rather than 1e-7."""
    from models import hunyuan_inputs, tiny_hunyuan

    outs = []
    for codegen in (False, True):
        torch._dynamo.reset()
        options = {"activation": activation, "codegen": codegen, "dump_dir": str(tmp_path / str(codegen))}
        compiled = torch.compile(tiny_hunyuan(), backend="sixbit", options=options)
        with torch.no_grad():
            outs.append(compiled(**hunyuan_inputs())[0])
    assert rel_err(outs[1], outs[0]) < tol
    (dump,) = (tmp_path / "True").iterdir()
    assert "6 GEMM templates with a fused epilogue" in (dump / "index.md").read_text()
