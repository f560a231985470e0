"""sixbit demo: the project's trained reference video DiT, bf16 against backend="sixbit".

The model is a diffusers ``WanTransformer3DModel`` (8 blocks, 2,304 video tokens) that ships with
sixbit, trained on videos of coloured shapes moving as the prompt says (docs/reference_model.md).
The demo samples one prompt twice from the same noise, with diffusers' UniPC flow-matching
scheduler and CFG (two calls per step, as Wan's pipeline): once in bf16, once through
``torch.compile(model, backend="sixbit")``. It writes

- ``<out>/side_by_side.gif``: bf16 on the left, sixbit on the right;
- ``<out>/metrics.json``: fidelity of sixbit to bf16 (PSNR, SSIM, relative L2), prompt adherence
  of both videos (colours and shapes present, motion direction), time, memory, precision mix;
- ``<out>/dump/``: the compiler's dumps (graphs per pass, kernels, the blocks x steps heatmap).

    python examples/demo.py                                   # CPU or GPU, whichever is there
    python examples/demo.py --preset fast --prompt "a yellow triangle moving left fast and a cyan circle moving up slow on gray"
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

import sixbit_compiler
from sixbit_compiler.quality import fidelity
from sixbit_compiler.refmodel import adherence, shipped_model_dir
from sixbit_compiler.refmodel.data import describe
from sixbit_compiler.refmodel.model import load, make_scheduler, sample_batch, save_gif
from sixbit_compiler.refmodel.text import parse_prompt

DEFAULT_PROMPT = "a red square moving right fast and a blue circle moving down slow on gray"


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def generate(model, encoder, spec, steps, guidance, seed, device, dtype):
    """(frames [T, H, W, 3], seconds) of one generation."""
    _sync(device)
    t0 = time.perf_counter()
    frames = sample_batch(model, encoder, [spec], steps, guidance, [seed], device, dtype)[0]
    _sync(device)
    return frames, time.perf_counter() - t0


def side_by_side(left: torch.Tensor, right: torch.Tensor, scale: int = 4) -> torch.Tensor:
    """Two videos [T, H, W, 3] next to each other with a white gutter, each pixel ``scale`` x ``scale``."""
    t, h, _, c = left.shape
    gutter = torch.ones(t, h, 2, c)
    both = torch.cat([left, gutter, right], dim=2)
    return both.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", default=DEFAULT_PROMPT, help="colours, shapes, directions, speeds, background")
    ap.add_argument("--model", default=None, help="a refmodel.train output directory (default: the shipped model)")
    ap.add_argument("--preset", default=None, choices=["quality", "balanced", "fast"],
                    help="sixbit's presets (default: sixbit's default options, DMPQ without the block cache)")
    ap.add_argument("--activation", default=None, choices=["dynamic", "int8", "nvfp4", "fp8", "bf16"],
                    help="override the activation precision (dynamic: NVFP4 or INT8 per layer and step)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="sixbit_demo", help="the GIF, metrics.json and the compiler's dumps go here")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), torch.bfloat16
    spec = parse_prompt(args.prompt)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # the demo casts the whole model to bf16 on purpose
    model, encoder = load(args.model or shipped_model_dir(), device, dtype)
    os.makedirs(args.out, exist_ok=True)
    print(f"sixbit demo: reference Wan-architecture DiT ({len(model.blocks)} blocks, 2,304 video tokens), "
          f"{args.steps} steps x 2 CFG calls on {device} ({dtype})\n  prompt: {describe(spec)}")

    ref, ref_s = generate(model, encoder, spec, args.steps, args.guidance, args.seed, device, dtype)

    options = {"dump_dir": os.path.join(args.out, "dump")}
    if args.preset:
        options["preset"] = args.preset
    if args.activation:
        options["activation"] = args.activation
    compiled = torch.compile(model, backend="sixbit", options=options)
    # The first call compiles; time it on its own, then start the generation afresh.
    t0 = time.perf_counter()
    with torch.no_grad():
        x = torch.zeros(1, 3, spec.frames, spec.height, spec.width, device=device, dtype=dtype)
        first_t = make_scheduler(args.steps, device).timesteps[0].expand(1)
        compiled(hidden_states=x, timestep=first_t, encoder_hidden_states=encoder(spec)[None].to(device, dtype),
                 return_dict=False)
    _sync(device)
    compile_s = time.perf_counter() - t0
    sixbit_compiler.reset(compiled)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    out, out_s = generate(compiled, encoder, spec, args.steps, args.guidance, args.seed, device, dtype)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    sixbit_compiler.reset(compiled)  # closes the generation: its summary line and heatmap are written

    mem = sixbit_compiler.memory_report(compiled)
    summary = sixbit_compiler.stats(compiled)["last_generation"]
    fid = fidelity(out.float(), ref.float())
    adh_ref, adh_out = adherence(ref, spec), adherence(out, spec)
    save_gif(side_by_side(ref, out), os.path.join(args.out, "side_by_side.gif"))
    report = {
        "prompt": describe(spec), "device": str(device), "steps": args.steps, "options": options,
        "fidelity_vs_bf16": fid,
        "adherence": {"bf16": adh_ref["ok"], "sixbit": adh_out["ok"],
                      "objects_bf16": adh_ref["objects"], "objects_sixbit": adh_out["objects"]},
        "seconds": {"bf16_generation": ref_s, "sixbit_generation": out_s, "sixbit_compile": compile_s},
        "weights_bytes": {"bf16": mem["before_bytes"], "sixbit": mem["after_bytes"]},
        "cache_bytes": mem["cache_bytes"], "cache_location": mem["cache_location"], "peak_allocated_bytes_sixbit": peak,
        "skip_rate": summary["skip_rate"], "precision_counts": summary["precision_counts"],
        "avg_activation_bits": summary["avg_activation_bits"], "syncs_per_call": summary["syncs_per_call"],
    }
    with open(os.path.join(args.out, "metrics.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)

    verdict = lambda r: "follows the prompt" if r["ok"] else "misses: " + ", ".join(  # noqa: E731
        f"{o['color']} ({'absent' if not o['present'] else 'shape ' + str(o['shape']) if not o['shape_ok'] else 'direction'})"
        for o in r["objects"] if not o["ok"])
    counts = ", ".join(f"{k} {v}" for k, v in summary["precision_counts"].items() if v)
    print(f"\n  bf16 video               {verdict(adh_ref)}")
    print(f"  sixbit video             {verdict(adh_out)}")
    print(f"  fidelity vs bf16         PSNR {fid['psnr_db']:.2f} dB, SSIM {fid['ssim']:.4f}, rel. L2 {fid['relative_l2']:.4f}")
    print(f"  generation               bf16 {ref_s:.1f} s, sixbit {out_s:.1f} s "
          f"({'reference kernels on CPU: the speed claim is for the GPU' if device.type == 'cpu' else 'GPU'}); "
          f"compile {compile_s:.1f} s")
    print(f"  weights                  {mem['before_bytes'] / 2**20:.1f} MiB -> {mem['after_bytes'] / 2**20:.1f} MiB "
          f"({mem['ratio']:.2f}x smaller)")
    print(f"  precision mix            {counts} layer-calls, {summary['avg_activation_bits']:.2f} activation bits; "
          f"skip rate {summary['skip_rate']:.0%}")
    print(f"  wrote                    {args.out}/side_by_side.gif (bf16 | sixbit), {args.out}/metrics.json, {args.out}/dump/")
    return report


if __name__ == "__main__":
    main()
