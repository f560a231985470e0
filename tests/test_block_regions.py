"""block_regions + the runtime's block cache mechanism (forced schedules; the policy is issue 4's)."""

import pytest
import torch

import sixbit_compiler
from conftest import apply_pass, capture, context_for
from models import cogvideox_inputs, scratch_dit, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.blocks import structure_key
from sixbit_compiler.fx_utils import op_counts
from sixbit_compiler.passes import block_regions, find_blocks, quantize_linears

QLINEAR = "sixbit.quantized_linear.default"


def regions_for(make, inputs, **options):
    gm, ex = capture(make(), **inputs())
    gm, ctx = context_for(gm, ex, block_cache=True, **options)
    find_blocks(gm, ctx)
    quantize_linears(gm, ctx)
    return (gm, ctx, *apply_pass(block_regions, gm, ctx))


@pytest.mark.parametrize(
    "make, inputs, n_blocks, q_per_block, n_outputs",
    [(lambda: tiny_wan(num_layers=3), wan_inputs, 3, 10, 1), (lambda: tiny_cogvideox(num_layers=3), cogvideox_inputs, 3, 6, 2)],
    ids=["wan", "cogvideox"],
)
def test_each_block_becomes_one_region_with_a_shared_body(make, inputs, n_blocks, q_per_block, n_outputs):
    gm, ctx, before, after = regions_for(make, inputs)
    assert len(ctx.block_regions) == n_blocks
    assert not any("sixbit_block" in n.meta for n in gm.graph.nodes)  # no block node left in the outer graph
    assert after.get(QLINEAR, 0) == 0 and before[QLINEAR] == n_blocks * q_per_block  # moved into the bodies
    assert sum(v for k, v in after.items() if k.startswith("module:sixbit_block_")) == n_blocks
    runners = [gm.get_submodule(n) for n in ctx.block_regions]
    for r in runners:
        assert op_counts(r.body.graph)[QLINEAR] == q_per_block
        assert r.residual_inputs is not None  # every stream paired
    assert [len(r.residual_inputs) for r in runners[:-1]] == [n_outputs] * (n_blocks - 1)
    # One body for all blocks; CogVideoX's last block drops the text stream nothing reads after it.
    assert len({structure_key(r.body) for r in runners}) == (1 if n_outputs == 1 else 2)


def test_off_by_default(tmp_path):
    with torch.no_grad():
        torch.compile(tiny_wan(), backend="sixbit", options={"dump_dir": str(tmp_path)})(**wan_inputs())
    (d,) = list(tmp_path.iterdir())
    index = (d / "index.md").read_text()
    assert "| 10 | `block_regions` | off (needs block_cache) |" in index
    assert "| 3 | `quantize_attention` | off (needs quantizes_attention) |" in index  # attention="exact"
    assert not any(p.name.endswith("_block_regions.py") for p in d.iterdir())


@pytest.mark.parametrize("make, inputs", [(tiny_wan, wan_inputs), (tiny_cogvideox, cogvideox_inputs)], ids=["wan", "cogvideox"])
def test_without_skips_outputs_equal_the_uncached_compiled_run(make, inputs):
    # Storage only matters when a residual is reused: nothing is skipped here.
    outs = []
    for opts in ({}, {"block_cache": True}):
        torch._dynamo.reset()
        with torch.no_grad():
            outs.append(torch.compile(make(), backend="sixbit", options=opts)(**inputs())[0])
    assert torch.equal(outs[0], outs[1])


def dit_calls(model, calls):
    """Run (x, t) calls through the model; returns the outputs."""
    with torch.no_grad():
        return [model(x, torch.tensor([t, t])) for x, t in calls]


def test_skipping_every_block_adds_the_cached_residuals_per_cfg_branch():
    g = torch.Generator().manual_seed(0)
    xa, xb = torch.randn(2, 6, 8, generator=g), torch.randn(2, 6, 8, generator=g)
    model = torch.compile(scratch_dit(depth=3), backend="sixbit", options={"block_cache": True, "cache_dtype": "activation"})
    dit_calls(model, [(xa, 900.0)])  # compile
    sixbit_compiler.reset(model)
    sixbit_compiler.set_skip_schedule(model, sixbit_compiler.evenly_spaced_skips(3, 1.0))
    # step 0: both branches compute (xa, then xb at the same t); step 1: everything skipped.
    out = dit_calls(model, [(xa, 900.0), (xb, 900.0), (xa, 800.0), (xb, 800.0)])
    # With every block skipped, h_final = h_0 + sum of the step-0 residuals of *this* branch, and
    # this DiT's embed and head do not depend on t: the step-1 output equals the branch's step-0 one.
    torch.testing.assert_close(out[2], out[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out[3], out[1], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[2], out[1], atol=1e-3)  # branches did not share residuals
    calls = sixbit_compiler.stats(model)["calls"]
    assert [c["skipped_blocks"] for c in calls[-4:]] == [[], [], [0, 1, 2], [0, 1, 2]]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_without_skipping_the_step1_output_changes():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g)
    model = torch.compile(scratch_dit(depth=3), backend="sixbit", options={"block_cache": True})
    out = dit_calls(model, [(x, 900.0), (x, 800.0)])
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # t modulates every block


def compiled_with_cache(model, inputs):
    """Compile (the runtime exists from the first call on), then start a fresh generation."""
    compiled = torch.compile(model, backend="sixbit", options={"block_cache": True})
    with torch.no_grad():
        compiled(**inputs)
    sixbit_compiler.reset(compiled)
    return compiled


def test_partial_skip_stats_and_cache_bytes():
    model = tiny_wan(num_layers=4)  # default cache_dtype: int8, one fp32 scale per token
    inp = wan_inputs()
    compiled = compiled_with_cache(model, inp)
    sixbit_compiler.set_skip_schedule(compiled, sixbit_compiler.evenly_spaced_skips(4, 0.5))
    with torch.no_grad():
        for t in (900, 800, 700):
            compiled(**{**inp, "timestep": torch.tensor([t])})
    s = sixbit_compiler.stats(model)
    last = s["last_generation"]
    assert [c["skipped_blocks"] for c in s["calls"][-3:]] == [[], [1, 3], [1, 3]]
    assert last["skipped_blocks"] == 4 and last["skip_rate"] == pytest.approx(4 / 12)
    assert sum(last["precision_counts"].values()) == 3 * 40 - 4 * 10  # skipped blocks are not 0-bit work
    tokens = 1 * 3 * 4 * 4
    per_block = tokens * 32 * 1 + tokens * 4  # int8 values + fp32 per-token scales
    assert s["summary"]["cache_bytes"] == 4 * per_block == sixbit_compiler.memory_report(model)["cache_bytes"]


def test_new_generation_clears_the_cache():
    model = tiny_wan()
    inp = wan_inputs()
    compiled = compiled_with_cache(model, inp)
    sixbit_compiler.set_skip_schedule(compiled, sixbit_compiler.evenly_spaced_skips(2, 1.0, compute_first_steps=0))
    with torch.no_grad():
        for t in (900, 800, 900, 800):  # two generations
            compiled(**{**inp, "timestep": torch.tensor([t])})
    skipped = [c["skipped_blocks"] for c in sixbit_compiler.stats(model)["calls"][-4:]]
    assert skipped == [[], [0, 1], [], [0, 1]]  # nothing cached at a generation's first call


def test_skip_schedule_needs_block_cache():
    model = tiny_wan()
    with torch.no_grad():
        torch.compile(model, backend="sixbit")(**wan_inputs())
    with pytest.raises(ValueError, match="block_cache"):
        sixbit_compiler.set_skip_schedule(model, lambda step, branch: {0})


def test_dump_shows_the_regions_and_each_distinct_body(tmp_path):
    with torch.no_grad():
        torch.compile(tiny_wan(num_layers=3), backend="sixbit", options={"dump_dir": str(tmp_path), "block_cache": True})(
            **wan_inputs()
        )
    (d,) = list(tmp_path.iterdir())
    files = sorted(p.name for p in d.iterdir())
    assert files == ["00_captured.py", "01_find_blocks.py", "02_quantize_linears.py", "03_fuse_regions.py",
                     "04_fold_gelu.py", "05_share_quantization.py", "06_block_regions.py", "07_precision_guards.py",
                     "08_block_body_0.py", "index.md"]
    main = (d / "06_block_regions.py").read_text()
    assert main.count("self.sixbit_block_") == 3 and "quantized_linear" not in main.split("\n\n", 1)[1]
    body = (d / "08_block_body_0.py").read_text()
    assert body.count("torch.ops.sixbit.quantized_linear.default(") == 10
    assert body.count("torch.amax(") == 7  # precision_guards: one outlier ratio per distinct linear input (q, k, v share one)
    index = (d / "index.md").read_text()
    assert "3 block regions, 1 distinct bodies" in index


def test_a_cached_residual_of_another_shape_is_never_added():
    model = tiny_wan()
    inp = wan_inputs()
    compiled = compiled_with_cache(model, inp)
    sixbit_compiler.set_skip_schedule(compiled, sixbit_compiler.evenly_spaced_skips(2, 1.0))
    small = wan_inputs(height=4, width=8)
    with torch.no_grad():
        compiled(**{**inp, "timestep": torch.tensor([900])})
        out = compiled(**{**small, "timestep": torch.tensor([800])})[0]  # same generation, new resolution
    assert out.shape[-2:] == (4, 8)
    assert sixbit_compiler.stats(model)["calls"][-1]["skipped_blocks"] == []  # computed instead


def test_block_statistics_gamma_and_residual_change_in_one_transfer():
    import math

    import torch.fx as fx

    from sixbit_compiler.blocks import BlockRunner
    from sixbit_compiler.options import SixbitOptions
    from sixbit_compiler.runtime import SixbitRuntime

    class Double(torch.nn.Module):
        def forward(self, x):
            return (2 * x,)

    rt = SixbitRuntime(SixbitOptions(block_cache=True))
    runner = BlockRunner(0, "b0", fx.symbolic_trace(Double()), [0], rt)
    for t, x in ((900.0, torch.ones(4)), (800.0, 3 * torch.ones(4))):
        rt.begin_call(torch.tensor([t]), None, None)
        runner(x)
    rt.flush_block_stats()
    (g0, c0), (g1, c1) = rt.records[0].block_stats[0], rt.records[1].block_stats[0]
    assert g0 == 1.0 and math.isnan(c0)  # Γ = |Δ|/|X| = 1; no earlier residual
    assert g1 == 1.0 and c1 == 2.0  # Δ went from 1 to 3: |3 - 1| / |1|
    assert [r.syncs for r in rt.records] == [0, 0]  # CPU: nothing to transfer


def test_stats_report_block_statistics_per_call():
    model = tiny_wan(num_layers=2)
    inp = wan_inputs()
    compiled = compiled_with_cache(model, inp)
    with torch.no_grad():
        for t in (900, 800):
            compiled(**{**inp, "timestep": torch.tensor([t])})
    calls = sixbit_compiler.stats(model)["calls"]
    assert set(calls[-1]["block_stats"]) == {0, 1} and set(calls[-2]["block_stats"]) == {0, 1}
    assert all(g > 0 for g, _ in calls[-1]["block_stats"].values())
    assert all(c == c and c > 0 for _, c in calls[-1]["block_stats"].values())  # step 1 has a previous residual


@pytest.mark.parametrize("cache_dtype, bytes_per_value, bound", [("activation", 4, 1e-6), ("int8", 1, 0.02), ("fp8", 1, 0.05)])
def test_compact_cache_storage(cache_dtype, bytes_per_value, bound):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 8, generator=g)
    model = torch.compile(scratch_dit(depth=3), backend="sixbit", options={"block_cache": True, "cache_dtype": cache_dtype})
    dit_calls(model, [(x, 900.0)])
    sixbit_compiler.reset(model)
    sixbit_compiler.set_skip_schedule(model, sixbit_compiler.evenly_spaced_skips(3, 1.0))
    out = dit_calls(model, [(x, 900.0), (x, 800.0)])
    # Skipping everything reproduces step 0 up to the residuals' storage error.
    assert float((out[1] - out[0]).norm() / out[0].norm()) < bound
    tokens, dim = 2 * 6, 48
    scales = 0 if cache_dtype == "activation" else tokens * 4
    assert sixbit_compiler.stats(model)["summary"]["cache_bytes"] == 3 * (tokens * dim * bytes_per_value + scales)


def test_tdc_policy_in_the_loop_respects_max_skips_and_last_steps():
    model = tiny_wan(num_layers=2)
    inp = wan_inputs()
    compiled = torch.compile(
        model, backend="sixbit",
        options={"block_cache": True, "cache_threshold": float("inf"), "cache_tau": float("inf")},
    )
    steps = (900, 750, 600, 450, 300, 150, 30)  # ends near t = 0: a finished generation
    with torch.no_grad():
        for generation in range(2):
            for t in steps:
                compiled(**{**inp, "timestep": torch.tensor([t])})
    calls = sixbit_compiler.stats(model)["calls"]
    skipped = [c["skipped_blocks"] for c in calls]
    both = [0, 1]
    # Step 0 computes; step 1 computes too (no residual change measured yet); then at most
    # 2 skips in a row. The second generation (same schedule) knows it has 7 steps: its last
    # step computes.
    assert skipped[:7] == [[], [], both, both, [], both, both]
    assert skipped[7:] == [[], [], both, both, [], both, []]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


def test_cache_policy_none_skips_nothing_by_itself():
    model = tiny_wan(num_layers=2)
    compiled = torch.compile(model, backend="sixbit", options={
        "block_cache": True, "cache_policy": "none", "cache_threshold": float("inf"), "cache_tau": float("inf")})
    inp = wan_inputs()
    with torch.no_grad():
        for t in (900, 800, 700, 600):
            compiled(**{**inp, "timestep": torch.tensor([t])})
    calls = sixbit_compiler.stats(model)["calls"]
    assert [c["step"] for c in calls] == [0, 1, 2, 3]
    assert all(c["skipped_blocks"] == [] for c in calls)


def test_first_compute_after_a_skip_runs_int8_when_activations_are_nvfp4():
    model = tiny_wan(num_layers=2)
    compiled = torch.compile(model, backend="sixbit", options={
        "block_cache": True, "activation": "nvfp4", "cache_threshold": float("inf"), "cache_tau": float("inf")})
    inp = wan_inputs()  # one conditioning tensor for the generation, as pipelines do
    with torch.no_grad():
        for t in (900, 800, 700, 600, 500):
            compiled(**{**inp, "timestep": torch.tensor([t])})
    calls = sixbit_compiler.stats(model)["calls"]
    assert [c["skipped_blocks"] for c in calls] == [[], [], [0, 1], [0, 1], []]
    precisions = [set(c["layers"].values()) for c in calls]
    assert precisions[1] == {"nvfp4"} and precisions[4] == {"int8"}  # step 4 refreshes both blocks
    last = sixbit_compiler.stats(model)["last_generation"]["precision_counts"]
    assert last == {"bf16": 0, "int8": 20, "nvfp4": 40, "fp8": 0}  # 3 computed calls x 20 layers; skipped ones not counted


def test_an_interrupted_generation_leaves_the_next_one_fresh():
    """The whole method on (preset "fast"): generation A stops halfway, then B runs the same
    schedule to the end; B's decisions and outputs equal those of a model that only ran B."""
    steps = (900, 750, 600, 450, 300, 150, 30)
    inp = wan_inputs()
    cond = inp["encoder_hidden_states"]

    def run(compiled, timesteps):
        outs = []
        with torch.no_grad():
            for t in timesteps:
                outs.append(compiled(**{**inp, "timestep": torch.tensor([t]), "encoder_hidden_states": cond})[0])
        return outs

    options = {"preset": "fast", "cache_threshold": float("inf"), "cache_tau": float("inf")}
    interrupted = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options=options)
    run(interrupted, steps[:3])
    after = run(interrupted, steps)
    fresh = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options=dict(options))
    alone = run(fresh, steps)
    a, b = sixbit_compiler.stats(interrupted)["calls"][3:], sixbit_compiler.stats(fresh)["calls"]
    assert [c["skipped_blocks"] for c in a] == [c["skipped_blocks"] for c in b]
    assert [c["layers"] for c in a] == [c["layers"] for c in b]
    assert any(c["skipped_blocks"] for c in b) and b[-1]["skipped_blocks"]  # fresh: no step count known
    for x, y in zip(after, alone):
        assert torch.equal(x, y)


def test_inductor_bodies_take_strided_and_contiguous_block_inputs_alike():
    """CogVideoX's first block reads views of the joint text + video sequence (strided) while a
    skipped block hands the next one a fresh contiguous tensor; the shared Inductor body, which
    specializes on its first inputs' strides, must take both (found on the H200, C-2B 50 % skips)."""
    torch._dynamo.reset()
    model = tiny_cogvideox(num_layers=4)
    inp = cogvideox_inputs()
    compiled = torch.compile(model, backend="sixbit",
                             options={"activation": "int8", "block_cache": True, "cache_policy": "none",
                                      "lowering": "inductor"})
    with torch.no_grad():
        compiled(**inp)  # compiles
        sixbit_compiler.reset(compiled)
        sixbit_compiler.set_skip_schedule(compiled, sixbit_compiler.evenly_spaced_skips(4, 0.5))
        outs = [compiled(**{**inp, "timestep": torch.tensor([t])})[0] for t in (900, 800, 700)]
    assert [c["skipped_blocks"] for c in sixbit_compiler.stats(model)["calls"][-3:]] == [[], [1, 3], [1, 3]]
    assert all(o.isfinite().all() for o in outs)


def test_inductor_bodies_take_blocks_whose_weights_differ_in_format():
    """``int8_weights`` naming some blocks only: one block structure, two weight formats (INT8
    codes [N, K] against NVFP4 [N, K/2]). The shared Inductor body, valid only for its example
    inputs' sizes, must compile once per input signature (found on the H100: W-14B with
    ``int8_weights`` on the first 20 of 40 blocks)."""
    torch._dynamo.reset()
    inp = wan_inputs()
    outs = {}
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        compiled = torch.compile(tiny_wan(num_layers=3), backend="sixbit",
                                 options={"activation": "int8", "block_cache": True, "cache_policy": "none",
                                          "lowering": lowering, "int8_weights": "blocks.0.attn1.to_k"})
        with torch.no_grad():
            outs[lowering] = compiled(**inp)[0]
    assert outs["inductor"].isfinite().all()
    torch.testing.assert_close(outs["inductor"], outs["eager"], rtol=2e-2, atol=2e-2)
