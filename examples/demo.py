"""sixbit demo: compile a small Wan-architecture video transformer with backend="sixbit".

Runs a real flow-matching sampling loop (diffusers' UniPC scheduler as in the Wan
pipeline, classifier-free guidance as two calls per step) twice from the same seed:
once in bf16, once compiled with sixbit. Prints time, memory, precision mix and
fidelity against bf16, and writes the compiler's dumps.

The embedded default is a small random-init Wan config until the project's trained
reference model lands (then the demo will generate a real video of a prompt).

    python examples/demo.py                 # CPU or GPU, whichever is there
    python examples/demo.py --activation nvfp4 --steps 30 --dump-dir /tmp/dump
"""

from __future__ import annotations

import argparse
import time

import torch

import sixbit_compiler
from sixbit_compiler.quality import fidelity

# A small Wan2.1-architecture config: 6 blocks, dim 256, 16 latent channels.
DEMO_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=64, in_channels=16, out_channels=16,
    text_dim=128, freq_dim=64, ffn_dim=1024, num_layers=6, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=64,
)


def make_model(device, dtype, seed=0):
    from diffusers import WanTransformer3DModel
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the demo casts the whole model to bf16 on purpose
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**DEMO_CONFIG).eval()
    # Random init leaves some projections at zero (like Wan's out-projections before
    # training); give every weight a scale so the demo exercises all of them.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    return model.to(device=device, dtype=dtype)


def make_scheduler(steps, device):
    """The Wan pipeline's scheduler: UniPC on flow-matching sigmas, shift 3."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                    num_train_timesteps=1000)
    sched.set_timesteps(steps, device=device)
    return sched


def sample(model, latents, cond, uncond, steps, guidance, device):
    """Wan-style sampling: two model calls per step for CFG."""
    sched = make_scheduler(steps, device)
    x = latents.clone()
    per_call = []
    for t in sched.timesteps:
        tt = t.expand(x.shape[0])
        t0 = time.perf_counter()
        eps_c = model(hidden_states=x, timestep=tt, encoder_hidden_states=cond, return_dict=False)[0]
        eps_u = model(hidden_states=x, timestep=tt, encoder_hidden_states=uncond, return_dict=False)[0]
        _sync(device)
        per_call.append((time.perf_counter() - t0) / 2)
        x = sched.step(eps_u + guidance * (eps_c - eps_u), t, x, return_dict=False)[0]
    return x, per_call


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--activation", default="dynamic", choices=["dynamic", "int8", "nvfp4", "fp8", "bf16"],
                    help="dynamic: DMPQ, NVFP4 or INT8 per layer and step from the calibrated predictor")
    ap.add_argument("--preset", default=None, choices=["quality", "balanced", "fast"],
                    help="the method's knobs at once (overrides --activation and --block-cache)")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--frames", type=int, default=5, help="latent frames")
    ap.add_argument("--size", type=int, default=16, help="latent height and width")
    ap.add_argument("--dump-dir", default="sixbit_dump")
    ap.add_argument("--hadamard", action="store_true")
    ap.add_argument("--block-cache", action="store_true",
                    help="skip stable blocks by reusing cached residuals (TDC policy); "
                         "random weights rarely have stable residuals, so expect few skips here")
    ap.add_argument("--cache-threshold", type=float, default=None, help="TDC residual-change threshold")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), torch.bfloat16
    model = make_model(device, dtype, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    latents = torch.randn(1, 16, args.frames, args.size, args.size, generator=g).to(device, dtype)
    cond = torch.randn(1, 32, DEMO_CONFIG["text_dim"], generator=g).to(device, dtype)
    uncond = torch.zeros_like(cond)
    tokens = args.frames * (args.size // 2) ** 2
    print(f"sixbit demo: Wan-architecture {DEMO_CONFIG['num_layers']} blocks, dim "
          f"{DEMO_CONFIG['num_attention_heads'] * DEMO_CONFIG['attention_head_dim']}, {tokens} video tokens, "
          f"{args.steps} steps x 2 CFG calls, on {device} ({dtype})")

    with torch.no_grad():
        ref, ref_times = sample(model, latents, cond, uncond, args.steps, args.guidance, device)
        # The first call compiles; it is timed on its own and kept out of the sampling loop.
        options = {"activation": args.activation, "dump_dir": args.dump_dir, "hadamard": args.hadamard,
                   "block_cache": args.block_cache}
        if args.preset:
            options = {"preset": args.preset, "dump_dir": args.dump_dir, "hadamard": args.hadamard}
        if args.cache_threshold is not None:
            options["cache_threshold"] = args.cache_threshold
        compiled = torch.compile(model, backend="sixbit", options=options)
        t0 = time.perf_counter()
        # the same dtype and strides as the loop's t.expand(batch): a mismatch would recompile
        first_t = make_scheduler(args.steps, device).timesteps[0].expand(latents.shape[0])
        compiled(hidden_states=latents, timestep=first_t, encoder_hidden_states=cond, return_dict=False)
        _sync(device)
        compile_s = time.perf_counter() - t0
        sixbit_compiler.reset(compiled)  # the warm-up call is not part of the generation
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        out, times = sample(compiled, latents, cond, uncond, args.steps, args.guidance, device)

    mem = sixbit_compiler.memory_report(compiled)
    summary = sixbit_compiler.stats(compiled)["last_generation"]
    fid = fidelity(out.float(), ref.float())
    median = lambda xs: sorted(xs)[len(xs) // 2]
    print()
    print(f"  compile (first call)     {compile_s:8.2f} s")
    print(f"  forward, bf16 eager      {median(ref_times) * 1e3:8.1f} ms (median)")
    print(f"  forward, sixbit          {median(times) * 1e3:8.1f} ms (median; {'reference path on CPU' if device.type == 'cpu' else 'lowering: Inductor'})")
    print(f"  weights                  {mem['before_bytes'] / 2**20:8.2f} MiB -> {mem['after_bytes'] / 2**20:.2f} MiB "
          f"({mem['ratio']:.2f}x smaller; {mem['quantized_parameters']} weights in NVFP4)")
    if device.type == "cuda":
        print(f"  peak allocated (loop)    {torch.cuda.max_memory_allocated() / 2**20:8.1f} MiB")
    counts = ", ".join(f"{k} {v}" for k, v in summary["precision_counts"].items() if v)
    print(f"  precision mix            {counts} layer-calls; {summary['avg_activation_bits']:.2f} activation bits on average")
    if args.block_cache:
        print(f"  block cache              {summary['skipped_blocks']} block-calls skipped, skip rate "
              f"{summary['skip_rate']:.1%}, {sixbit_compiler.memory_report(compiled)['cache_bytes'] / 2**10:.1f} KiB cached")
    compiles = sixbit_compiler.stats(compiled)["summary"]["compiles"]
    print(f"  calls / steps            {summary['calls']} / {summary['steps']}, syncs per call "
          f"{summary['syncs_per_call']:.2f}, compiles {compiles}")
    print(f"  fidelity vs bf16         PSNR {fid['psnr_db']:.2f} dB, SSIM {fid['ssim']:.4f}, "
          f"rel. L2 {fid['relative_l2']:.4f}, cosine {fid['cosine']:.5f}")
    print(f"  dumps                    {args.dump_dir}/ (index.md per compile)")
    return fid


if __name__ == "__main__":
    main()
