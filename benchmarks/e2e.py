"""End-to-end benchmark: a real sampling loop per workload, every mode in one process.

Workloads (BENCHMARKS.md): W-1.3B, W-14B (Wan2.1 configs, 480x832, 81 frames, two CFG calls
per step, UniPC flow-matching scheduler as in the Wan pipeline), C-2B (CogVideoX-2B config,
720x480, 49 frames, CFG batched, CogVideoX DDIM scheduler). Random weights (seeded). Tiny
variants run on CPU as a smoke test.

Modes: bf16_eager (SDPA default backend), inductor (whole-model torch.compile), torchao_fp8
(float8 dynamic activation + weight, rowwise, + compile; needs torchao), sixbit_int8,
sixbit_nvfp4, sixbit_dynamic (DMPQ, shipped calibration), sixbit_dynamic_int8 (DMPQ's
bookkeeping with a zero budget, so every layer stays INT8: compare with sixbit_int8),
sixbit_int8_cache (block regions, nothing skipped: the mechanism's cost) and forced skip
schedules sixbit_int8_skip33 / _skip50 / _skipNN (a third / half / NN % of the blocks skipped
after the first step: the mechanism, not the policy), and the presets sixbit_quality /
_balanced / _fast. A sixbit mode ending in "@host" / "@device" sets where its block cache
lives (option cache_location; default: host on a GPU). A sixbit mode may also carry option
overrides, "+key=value" each, before any "@": e.g.
"sixbit_int8_skip37+int8_weights=*.attn1.to_[qk]@host" or "sixbit_int8+attention=int8" (values
are JSON where they parse, strings otherwise).

Per mode: loop time, median time per model call, first call (compile) time, weight bytes,
cache bytes, peak allocated during the loop, fidelity of the final latents to bf16 eager
(PSNR, SSIM, relative L2, cosine), and sixbit's stats. A mode that fails is recorded with
its error; the others still run. JSON goes to $OUT (or ./out) after every mode.

    python benchmarks/e2e.py --workload W-1.3B [--steps 50] [--modes bf16_eager,sixbit_int8]
    python benchmarks/e2e.py --workload tiny-wan --steps 3          # CPU smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import time
import traceback

import torch

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6)
WAN_14B = dict(WAN_1_3B, num_attention_heads=40, ffn_dim=13824, num_layers=40)
COG_2B = dict(num_attention_heads=30, attention_head_dim=64, in_channels=16, out_channels=16, time_embed_dim=512,
              text_embed_dim=4096, num_layers=30, sample_width=90, sample_height=60, sample_frames=49, patch_size=2,
              temporal_compression_ratio=4, max_text_seq_length=226)
TINY_WAN = dict(WAN_1_3B, num_attention_heads=2, attention_head_dim=32, text_dim=64, freq_dim=32, ffn_dim=128,
                num_layers=4, rope_max_seq_len=64)
TINY_COG = dict(COG_2B, num_attention_heads=2, attention_head_dim=32, time_embed_dim=32, text_embed_dim=64,
                num_layers=4, sample_width=16, sample_height=16, sample_frames=9, max_text_seq_length=16)

WORKLOADS = {
    # name: (family, config, latent [C, F, H, W] for Wan / [F, C, H, W] for CogVideoX, text tokens, guidance)
    "W-1.3B": ("wan", WAN_1_3B, (16, 21, 60, 104), 512, 5.0),
    "W-14B": ("wan", WAN_14B, (16, 21, 60, 104), 512, 5.0),
    "C-2B": ("cogvideox", COG_2B, (13, 16, 60, 90), 226, 6.0),
    "tiny-wan": ("wan", TINY_WAN, (16, 3, 8, 8), 16, 5.0),
    "tiny-cogvideox": ("cogvideox", TINY_COG, (3, 16, 16, 16), 16, 6.0),
}
MODES = ["bf16_eager", "inductor", "torchao_fp8", "sixbit_int8", "sixbit_fp8", "sixbit_int8_codegen", "sixbit_nvfp4", "sixbit_dynamic", "sixbit_dynamic_int8",
         "sixbit_int8_cache", "sixbit_int8_skip33", "sixbit_int8_skip50", "sixbit_quality", "sixbit_balanced", "sixbit_fast"]


def build(family, config, device, seed=0):
    from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    torch.manual_seed(seed)
    cls = WanTransformer3DModel if family == "wan" else CogVideoXTransformer3DModel
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # initialise in bf16 directly: a 14B fp32 init would not fit
    try:
        with torch.device(device):
            model = cls(**config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def make_inputs(family, latent, text_tokens, text_dim, device):
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(1, *latent, generator=g).to(device, torch.bfloat16)
    cond = torch.randn(1, text_tokens, text_dim, generator=g).to(device, torch.bfloat16)
    uncond = torch.zeros_like(cond)
    return x, cond, uncond


def scheduler_for(family, steps, device):
    if family == "wan":
        from diffusers import UniPCMultistepScheduler

        sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                        num_train_timesteps=1000)
    else:
        from diffusers import CogVideoXDDIMScheduler

        sched = CogVideoXDDIMScheduler(prediction_type="v_prediction", timestep_spacing="trailing",
                                       beta_schedule="scaled_linear", rescale_betas_zero_snr=True,
                                       clip_sample=False, set_alpha_to_one=True)
    sched.set_timesteps(steps, device=device)
    return sched


def sample(model, family, x, cond, uncond, steps, guidance, device, call_times, record=None):
    """The pipeline's loop: Wan calls the model once per CFG branch, CogVideoX batches them.
    ``record``: (step index, context manager) wrapped around that step's calls."""
    sched = scheduler_for(family, steps, device)
    both = torch.cat([uncond, cond]) if family == "cogvideox" else None  # once, as the pipeline does
    for i, t in enumerate(sched.timesteps):
        with record[1] if record is not None and record[0] == i else contextlib.nullcontext():
            x = _step(model, family, x, cond, uncond, both, t, sched, guidance, device, call_times)
    return x


def _step(model, family, x, cond, uncond, both, t, sched, guidance, device, call_times):
    """One denoising step; appends the time per model call."""
    t0 = time.perf_counter()
    if family == "wan":
        tt = t.expand(x.shape[0])
        c = model(hidden_states=x, timestep=tt, encoder_hidden_states=cond, return_dict=False)[0]
        u = model(hidden_states=x, timestep=tt, encoder_hidden_states=uncond, return_dict=False)[0]
        calls = 2
    else:
        xin = torch.cat([x, x])
        out = model(hidden_states=xin, timestep=t.expand(2), encoder_hidden_states=both, return_dict=False)[0]
        u, c = out.chunk(2)
        calls = 1
    sync(device)
    call_times.extend([(time.perf_counter() - t0) / calls] * calls)
    return sched.step(u + guidance * (c - u), t, x, return_dict=False)[0]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def option_overrides(items: list[str]) -> dict:
    """"key=value" strings -> options (the "+key=value" parts of a mode, here and in
    ref_presets.py); a value is JSON where it parses ("0.2", "2", "true"; "True" / "False" too),
    else a string (glob patterns)."""
    options = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"mode override {item!r}: expected key=value")
        try:
            options[key] = json.loads(value.lower() if value in ("True", "False") else value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def split_modes(text: str) -> list[str]:
    """--modes split at its commas, except those inside a JSON list of an override
    (``int8_weights=["blocks.?.attn1.to_k","blocks.1?.attn1.to_k"]``)."""
    return [m for m in re.split(r",(?![^\[]*\])", text) if m]


def prepare(mode, model, device, num_blocks):
    """The model as the mode runs it, plus a post-compile hook. A sixbit mode may end in
    "@host" or "@device": where its block cache lives (option cache_location), and carry
    "+key=value" option overrides before it."""
    import sixbit_compiler

    mode, _, location = mode.partition("@")
    mode, *overrides = mode.split("+")

    if mode == "bf16_eager":
        return model, None
    if mode == "inductor":
        return torch.compile(model), None
    if mode == "torchao_fp8":
        from torchao.quantization import PerRow, quantize_

        try:  # torchao >= 0.10 names it a config class; older releases a function
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig as fp8_config
        except ImportError:
            from torchao.quantization import float8_dynamic_activation_float8_weight as fp8_config
        quantize_(model, fp8_config(granularity=PerRow()))
        return torch.compile(model), None
    skip = {"sixbit_int8_cache": 0.0, "sixbit_int8_skip33": 1 / 3}.get(mode)
    if skip is None and mode.startswith("sixbit_int8_skip"):  # sixbit_int8_skipNN: NN % of the blocks
        skip = int(mode.removeprefix("sixbit_int8_skip")) / 100
    if mode in ("sixbit_quality", "sixbit_balanced", "sixbit_fast"):
        options = {"preset": mode.split("_", 1)[1]}
    elif mode == "sixbit_dynamic":
        options = {"activation": "dynamic"}
    elif mode == "sixbit_dynamic_int8":  # DMPQ's bookkeeping with a zero budget: every layer stays INT8
        options = {"activation": "dynamic", "dmpq_budget": 0.0}
    elif mode in ("sixbit_fp8", "sixbit_nvfp4"):  # one precision everywhere
        options = {"activation": mode.split("_", 1)[1]}
    elif mode == "sixbit_int8_codegen":  # the generated region kernels (issue: codegen)
        options = {"activation": "int8", "codegen": True}
    else:
        options = {"activation": "int8", "block_cache": skip is not None, "cache_policy": "none"}
    if location:
        options["cache_location"] = location
    options.update(option_overrides(overrides))
    compiled = torch.compile(model, backend="sixbit", options=options)

    def after_first_call(m):
        sixbit_compiler.reset(m)
        if skip is not None:
            sixbit_compiler.set_skip_schedule(m, sixbit_compiler.evenly_spaced_skips(num_blocks, skip))

    return compiled, after_first_call


def run_mode(mode, workload, steps, device, memory_breakdown=False):
    import sixbit_compiler
    from sixbit_compiler.quality import fidelity

    family, config, latent, text_tokens, guidance = WORKLOADS[workload]
    model = build(family, config, device)
    text_dim = config["text_dim"] if family == "wan" else config["text_embed_dim"]
    x, cond, uncond = make_inputs(family, latent, text_tokens, text_dim, device)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    num_blocks = config["num_layers"]
    runnable, after_first_call = prepare(mode, model, device, num_blocks)
    with torch.no_grad():
        # First call on its own: compile time (and autotuning) stay out of the loop.
        t0 = time.perf_counter()
        sample(runnable, family, x, cond, uncond, 1, guidance, device, [])
        first = time.perf_counter() - t0
        if after_first_call:
            after_first_call(runnable)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        call_times: list[float] = []
        t0 = time.perf_counter()
        out = sample(runnable, family, x, cond, uncond, steps, guidance, device, call_times)
        sync(device)
        loop = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        result = {
            "loop_s": loop, "call_median_s": sorted(call_times)[len(call_times) // 2], "calls": len(call_times),
            "call_times_s": [round(t, 4) for t in call_times[::2 if family == "wan" else 1]],  # one per step
            "first_call_s": first, "weights_bf16_bytes": weights,
            "peak_allocated_bytes": peak,
        }
        if mode.startswith("sixbit"):  # before anything else runs: the loop is the last generation
            mem = sixbit_compiler.memory_report(runnable)
            s = sixbit_compiler.stats(runnable)["last_generation"]
            result.update(weights_bytes=mem["after_bytes"], cache_bytes=mem["cache_bytes"],
                          cache_location=mem["cache_location"], cache_pinned_host_bytes=mem["cache_pinned_host_bytes"],
                          skip_rate=s["skip_rate"],
                          precision_counts=s["precision_counts"], avg_activation_bits=s["avg_activation_bits"],
                          syncs_per_call=s["syncs_per_call"])
        if memory_breakdown and device.type == "cuda":  # a fresh 2-step generation, step 1 recorded
            from memory_peak import PeakRecorder

            recorder = PeakRecorder()
            sample(runnable, family, x, cond, uncond, 2, guidance, device, [], record=(1, recorder))
            result["memory_at_peak_step1"] = recorder.breakdown()
    return result, out.float().cpu(), fidelity


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", default="W-1.3B", choices=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--memory-breakdown", action="store_true",
                    help="per mode, record a 2-step generation's step 1 and list what is alive at its peak")
    ap.add_argument("--reference", help="file for the bf16_eager latents: written when that mode runs, read "
                    "otherwise (fidelity across commands, e.g. W-14B's modes one command each)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"e2e_{args.workload}.json")
    report = {"workload": args.workload, "steps": args.steps, "device": str(device), "torch": torch.__version__,
              "card": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "sdpa": "default backend (cuDNN on torch 2.11 + H100)" if device.type == "cuda" else "default", "modes": {}}
    reference = None
    modes = split_modes(args.modes)
    if args.reference and os.path.exists(args.reference) and "bf16_eager" not in modes:
        reference = torch.load(args.reference)
        report["reference"] = args.reference
    for mode in modes:
        torch._dynamo.reset()
        try:
            result, latents, fidelity = run_mode(mode, args.workload, args.steps, device, args.memory_breakdown)
            if mode == "bf16_eager":
                reference = latents
                if args.reference:
                    torch.save(latents, args.reference)
            if reference is not None:
                result["fidelity_vs_bf16"] = fidelity(latents, reference)
        except Exception as exc:  # record and go on: one failing mode must not hide the others
            result = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
        report["modes"][mode] = result
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
        brief = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items() if k != "traceback"}
        print(mode, brief, flush=True)
    return report


if __name__ == "__main__":
    main()
