"""precision_guards (pass) + DMPQ and PDR decisions in the runtime + calibration."""

import json
import math

import pytest
import torch

import sixbit_compiler
from conftest import apply_pass, capture, context_for, rel_err
from models import cogvideox_inputs, tiny_cogvideox, tiny_wan, wan_inputs
from sixbit_compiler.calibration import Calibration, Fit, layer_kind
from sixbit_compiler.fx_utils import op_counts
from sixbit_compiler.passes import block_regions, find_blocks, precision_guards, quantize_linears
from sixbit_compiler.runtime import runtime_of


def guarded(make, inputs, **options):
    gm, ex = capture(make(), **inputs())
    gm, ctx = context_for(gm, ex, **options)
    find_blocks(gm, ctx)
    quantize_linears(gm, ctx)
    if ctx.options.block_cache:
        block_regions(gm, ctx)
        gm.recompile()
    n_out = len(next(n for n in gm.graph.nodes if n.op == "output").args[0])
    return (gm, ctx, *apply_pass(precision_guards, gm, ctx), n_out)


@pytest.mark.parametrize("make, inputs, n_blocks", [(lambda: tiny_wan(num_layers=3), wan_inputs, 3),
                                                     (lambda: tiny_cogvideox(num_layers=3), cogvideox_inputs, 3)],
                         ids=["wan", "cogvideox"])
def test_adds_one_gamma_per_block_and_one_stats_output(make, inputs, n_blocks):
    gm, ctx, before, after, n_out = guarded(make, inputs)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    assert {k: v for k, v in delta.items() if v} == {
        "sixbit.residual_abs_sums.default": n_blocks, "torch.stack": 1,
        # the pin: what reads a block's output after it reads output + 0·sums
        "torch.isfinite": n_blocks, "torch.mul": n_blocks, "torch.where": n_blocks, "operator.getitem": n_blocks, "torch.add": n_blocks}
    assert ctx.stats_blocks == list(range(n_blocks))
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    assert len(out) == n_out + 1 and out[-1].target is torch.stack


def test_gamma_output_is_the_block_input_output_difference():
    model = tiny_wan(num_layers=2)
    # Γ of block 0 measured by hand with hooks on the eager model
    seen = {}
    blocks = model.blocks
    blocks[0].register_forward_hook(lambda m, a, kw, out: seen.update(x=kw.get("hidden_states", a[0] if a else None), y=out),
                                    with_kwargs=True)
    with torch.no_grad():
        model(**wan_inputs())
    x, y = seen["x"].float(), seen["y"].float()
    expected = ((y - x).abs().sum() / x.abs().sum()).item()
    compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit")  # dynamic: measures Γ
    with torch.no_grad():
        compiled(**wan_inputs())
        compiled(**wan_inputs(timestep=400))  # the second call reads the first call's Γ
    gamma0 = sixbit_compiler.stats(compiled)["calls"][0]["block_stats"][0][0]
    # NVFP4 weights vs bf16: close, not equal (1.2 % off with the amax rule's block scales, 2.3 %
    # with the searched ones)
    assert gamma0 == pytest.approx(expected, rel=0.04)


def test_stats_output_never_reaches_the_caller_and_costs_no_extra_sync():
    compiled = torch.compile(tiny_wan(), backend="sixbit")  # default: dynamic
    with torch.no_grad():
        out = compiled(**wan_inputs())
    assert isinstance(out, tuple) and len(out) == 1 and out[0].shape == wan_inputs()["hidden_states"].shape
    assert sixbit_compiler.stats(compiled)["summary"]["syncs_per_call"] == 0  # CPU: no device transfer at all


def test_with_block_regions_each_body_measures_outlier_ratios():
    gm, ctx, before, after, _ = guarded(lambda: tiny_wan(num_layers=3), wan_inputs, block_cache=True)
    assert after == before  # the outer graph is unchanged: the ratios live in the bodies
    for name in ctx.block_regions:
        runner = gm.get_submodule(name)
        counts = op_counts(runner.body.graph)
        assert runner.outlier_count == 10 and counts["torch.amax"] == 7 and counts["torch.stack"] == 1


def test_off_with_a_fixed_precision_and_no_block_cache(tmp_path):
    with torch.no_grad():
        torch.compile(tiny_wan(), backend="sixbit", options={"dump_dir": str(tmp_path), "activation": "int8"})(**wan_inputs())
    (d,) = list(tmp_path.iterdir())
    assert "`precision_guards` | off (needs measures_blocks)" in (d / "index.md").read_text()


# ---- DMPQ decisions ----------------------------------------------------------------------

def write_calibration(path, alpha, beta, budget, mode="kind"):
    Calibration({}, {}, Fit(alpha, beta, 0.9, 10), mode, budget, "test").save(str(path))
    return str(path)


def run_steps(compiled, n, branches=1, start=900):
    # one conditioning tensor per branch for the whole loop, as pipelines do (the step tracker
    # tells a CFG branch from a restart by the conditioning tensor it receives)
    conds = [wan_inputs(seed=1 + b)["encoder_hidden_states"] for b in range(branches)]
    with torch.no_grad():
        for step in range(n):
            for b in range(branches):
                compiled(**{**wan_inputs(timestep=start - 100 * step), "encoder_hidden_states": conds[b]})


def layer_precisions(compiled):
    return [set(c["layers"].values()) for c in sixbit_compiler.stats(compiled)["calls"]]


def test_first_call_runs_int8_then_the_predictor_decides(tmp_path):
    # E_rel = 0·Γ + 0.05 <= budget 0.1: every layer with a Γ runs NVFP4
    cal = write_calibration(tmp_path / "c.json", 0.0, 0.05, 0.1)
    compiled = torch.compile(tiny_wan(), backend="sixbit", options={"calibration": cal})
    run_steps(compiled, 3)
    assert layer_precisions(compiled) == [{"int8"}, {"nvfp4"}, {"nvfp4"}]


def test_the_budget_splits_layers_by_their_blocks_gamma(tmp_path):
    compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit", options={"calibration": write_calibration(tmp_path / "c.json", 1.0, 0.0, 1.0)})
    run_steps(compiled, 2)
    stats = sixbit_compiler.stats(compiled)
    gammas = stats["calls"][0]["block_stats"]
    rt = runtime_of(compiled)
    # the budget sits between the two blocks' Γ: one block NVFP4, the other INT8
    lo, hi = sorted(g for g, _ in gammas.values())
    assert lo < hi
    rt.dmpq_budget = (lo + hi) / 2
    run_steps(compiled, 2)
    last = stats_calls = sixbit_compiler.stats(compiled)["calls"][-1]
    for layer, precision in last["layers"].items():
        block = rt.slot_blocks[rt.slot_names.index(layer)]
        g = stats_calls["block_stats"] and sixbit_compiler.stats(compiled)["calls"][-2]["block_stats"][rt.block_names.index(block)][0]
        assert precision == ("nvfp4" if g <= rt.dmpq_budget else "int8"), (layer, g)
    assert {"nvfp4", "int8"} == set(last["layers"].values())


def test_cfg_branches_use_their_own_gamma_and_a_new_generation_starts_int8(tmp_path):
    cal = write_calibration(tmp_path / "c.json", 0.0, 0.05, 0.1)
    compiled = torch.compile(tiny_wan(), backend="sixbit", options={"calibration": cal})
    run_steps(compiled, 2, branches=2)
    # step 0: both branches have no Γ yet (the cond branch's Γ must not serve the uncond one)
    assert layer_precisions(compiled) == [{"int8"}, {"int8"}, {"nvfp4"}, {"nvfp4"}]
    run_steps(compiled, 1, branches=1)  # timestep goes back up: a new generation, no Γ
    assert layer_precisions(compiled)[-1] == {"int8"}


def test_decisions_are_deterministic_for_a_fixed_seed(tmp_path):
    def schedule():
        torch._dynamo.reset()
        compiled = torch.compile(tiny_wan(num_layers=3), backend="sixbit")  # the shipped calibration
        run_steps(compiled, 4, branches=2)
        return [c["layers"] for c in sixbit_compiler.stats(compiled)["calls"]]

    assert schedule() == schedule()


def test_missing_gamma_after_a_skip_means_int8(tmp_path):
    cal = write_calibration(tmp_path / "c.json", 0.0, 0.05, 0.1)
    compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit",
                             options={"calibration": cal, "block_cache": True, "cache_policy": "none"})
    run_steps(compiled, 1)
    sixbit_compiler.set_skip_schedule(compiled, lambda step, branch: {0} if step == 1 else ())
    run_steps(compiled, 3, start=800)
    rt = runtime_of(compiled)
    calls = sixbit_compiler.stats(compiled)["calls"]
    assert calls[1]["skipped_blocks"] == [0]
    block0 = {layer for layer, blk in zip(rt.slot_names, rt.slot_blocks) if blk == rt.block_names[0]}
    after_skip = calls[2]["layers"]
    assert {after_skip[layer] for layer in block0} == {"int8"}  # no Γ from the skipped call (and PDR)
    assert {p for layer, p in after_skip.items() if layer not in block0} == {"nvfp4"}


def test_pdr_outlier_rule_runs_outlier_layers_bf16_on_a_refresh(tmp_path):
    cal = write_calibration(tmp_path / "c.json", 0.0, 0.05, 0.1)
    compiled = torch.compile(tiny_wan(num_layers=2), backend="sixbit",
                             options={"calibration": cal, "block_cache": True, "cache_policy": "none"})
    run_steps(compiled, 1)
    rt = runtime_of(compiled)
    rt.PDR_OUTLIER_RATIO = 0.0  # every layer is an outlier layer now
    run_steps(compiled, 1, start=800)
    assert layer_precisions(compiled)[-1] == {"bf16"}
    rt.PDR_OUTLIER_RATIO = float("inf")
    run_steps(compiled, 1, start=700)
    assert layer_precisions(compiled)[-1] == {"nvfp4"}
    ratios = rt._outliers[0]
    assert ratios.isfinite().all() and (ratios >= 1).all()  # max|x| / mean|x| >= 1 always


def test_dynamic_output_stays_close_to_eager():
    model = tiny_wan()
    with torch.no_grad():
        ref = model(**wan_inputs())[0]
    compiled = torch.compile(tiny_wan(), backend="sixbit")
    with torch.no_grad():
        for t in (900, 800, 700):
            out = compiled(**wan_inputs(timestep=t))[0]
    with torch.no_grad():
        ref = tiny_wan()(**wan_inputs(timestep=700))[0]
    assert rel_err(out, ref) < 0.08


# ---- calibration ---------------------------------------------------------------------------

def test_least_squares_recovers_a_line_and_its_correlation():
    g = [0.1 * i for i in range(20)]
    f = Fit.least_squares(g, [0.3 * x + 0.02 for x in g])
    assert f.alpha == pytest.approx(0.3) and f.beta == pytest.approx(0.02) and f.r == pytest.approx(1.0)
    flat = Fit.least_squares(g, [0.05] * 20)
    assert abs(flat.alpha) < 1e-12 and math.isnan(flat.r)


def test_layer_kind_and_fallbacks():
    assert layer_kind("blocks.3.attn1.to_q", "blocks.3") == "attn1.to_q"
    cal = Calibration({"attn1.to_q": Fit(1, 0, 0.9, 5)}, {"blocks.3.attn1.to_q": Fit(2, 0, 0.9, 5)}, Fit(3, 0, 0.5, 50), "kind")
    assert cal.fit_for("blocks.3.attn1.to_q", "blocks.3").alpha == 1
    cal.mode = "layer"
    assert cal.fit_for("blocks.3.attn1.to_q", "blocks.3").alpha == 2
    assert cal.fit_for("blocks.3.ffn.net.0.proj", "blocks.3").alpha == 3  # unknown kind: the overall fit


def test_calibration_file_round_trip_and_bad_files(tmp_path):
    cal = Calibration({"a": Fit(1.0, 0.1, 0.8, 4)}, {}, Fit(0.5, 0.2, float("nan"), 9), "kind", 0.1, "test")
    cal.save(str(tmp_path / "c.json"))
    back = Calibration.load(str(tmp_path / "c.json"))
    assert back.kinds == cal.kinds and back.default_budget == 0.1 and math.isnan(back.overall.r)
    (tmp_path / "bad.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="bad.json"):
        Calibration.load(str(tmp_path / "bad.json"))
    default = Calibration.load()
    assert default.kinds and default.default_budget > 0  # the shipped default is a real fit


def test_calibrate_end_to_end_on_a_sampling_loop(tmp_path):
    from sixbit_compiler.calibrate import calibrate

    model = tiny_wan(num_layers=2)
    before = [p.detach().clone() for p in model.parameters()]

    def run(compiled, seed):
        x = torch.randn(1, 4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
        for t in (900, 700, 500, 300):
            for text_seed in (1, 2):  # two CFG branches per step
                inp = wan_inputs(seed=text_seed, timestep=t)
                inp["hidden_states"] = x
                x = x - 0.1 * compiled(**inp)[0]

    cal = calibrate(model, run, [0, 1, 2, 3], out=str(tmp_path / "c.json"), plot=str(tmp_path / "c.png"))
    assert set(cal.kinds) == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                              "attn2.to_v", "attn2.to_out.0", "ffn.net.0.proj", "ffn.net.2"}
    # 4 generations x (4 steps - 1) x 2 branches samples per layer, 2 layers per kind
    assert all(f.n == 4 * 3 * 2 * 2 for f in cal.kinds.values())
    # NVFP4 relative errors are percents, predicted at this model's Γ (~0.22; a slope fitted on
    # 48 samples of a random model may be negative, so not far outside that range)
    assert all(0 < f.predict(0.25) < 1 for f in cal.kinds.values())
    assert cal.mode in ("kind", "layer") and set(cal.held_out) == {"kind", "layer"}
    assert Calibration.load(str(tmp_path / "c.json")).kinds == cal.kinds
    assert (tmp_path / "c.png").stat().st_size > 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the model itself untouched
    compiled = torch.compile(model, backend="sixbit", options={"calibration": str(tmp_path / "c.json")})
    with torch.no_grad():
        compiled(**wan_inputs())
    assert runtime_of(compiled).calibration.kinds == cal.kinds


def test_cli_help():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "sixbit_compiler.cli", "calibrate", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--refmodel" in out.stdout and "--factory" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "sixbit_compiler.cli", "calibrate", "--factory", "nocolon"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "--factory" in bad.stderr


def test_one_summary_line_per_generation_and_a_heatmap_in_the_dump(tmp_path, caplog):
    import logging

    compiled = torch.compile(tiny_wan(num_layers=3), backend="sixbit",
                             options={"dump_dir": str(tmp_path), "block_cache": True, "cache_policy": "none"})
    with caplog.at_level(logging.INFO, logger="sixbit"):
        run_steps(compiled, 1)
        sixbit_compiler.set_skip_schedule(compiled, lambda step, branch: {1} if step >= 1 else ())
        run_steps(compiled, 3, branches=2, start=1000)  # timestep back up: generation 0 ends here
        sixbit_compiler.reset(compiled)  # generation 1 ends here
        sixbit_compiler.reset(compiled)  # nothing new to report
    lines = [r.getMessage() for r in caplog.records if "sixbit: generation" in r.getMessage()]
    assert len(lines) == 2 and "generation 0" in lines[0] and "generation 1" in lines[1]
    assert "skip rate 0.22" in lines[1] and "cache" in lines[1]  # 2 of 9 block-calls skipped
    from PIL import Image

    assert not (tmp_path / "heatmap_generation000.png").exists()  # one call, one step: no picture
    img = Image.open(tmp_path / "heatmap_generation001.png").convert("RGB")
    assert img.size[0] >= 6 * 8
    assert img.getpixel((2 * 8 + 4, 16 + 1 * 8 + 4)) == (0, 0, 0)  # call 2 (step 1), block 1: skipped
    assert img.getpixel((0 * 8 + 4, 16 + 1 * 8 + 4)) != (0, 0, 0)


def test_calibrating_a_model_whose_weights_were_released_fails_clearly():
    from sixbit_compiler.calibrate import calibrate

    model = tiny_wan()
    compiled = torch.compile(model, backend="sixbit")
    with torch.no_grad():
        compiled(**wan_inputs())
    with pytest.raises(ValueError, match="released"):
        calibrate(model, lambda m, item: None, [0])
