"""Foundation check on the GPU: backend="sixbit" on a full-size Wan2.1-1.3B architecture.

Random weights, 480x832, 81 frames (latent 16x21x60x104 = 32,760 tokens), text 512x4096,
batch 1. Runs bf16 eager first (the baseline, same command, same card), then compiles the
same model with sixbit and runs it at INT8 and NVFP4 activations (switched at run time,
no recompile). Reports weight memory before/after, peak allocated, forward times, compile
time, and fidelity of one forward against bf16. Writes JSON to $OUT (or ./out).

This issue's kernels are not in yet: the quantized linears run the pure-PyTorch
reference path, so the sixbit forward time here is *not* a speed claim.

    python benchmarks/wan13b_foundation.py [--lowering auto|eager|inductor]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6,
)


def timed(fn, repeats=2):
    torch.cuda.synchronize()
    times = []
    out = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return out, times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lowering", default="auto")
    ap.add_argument("--frames", type=int, default=21)
    ap.add_argument("--height", type=int, default=60)
    ap.add_argument("--width", type=int, default=104)
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    result: dict = {
        "card": torch.cuda.get_device_name(), "torch": torch.__version__,
        "python": platform.python_version(), "lowering": args.lowering,
        "latent": [16, args.frames, args.height, args.width],
    }

    def save():
        with open(os.path.join(out_dir, "wan13b_foundation.json"), "w") as f:
            json.dump(result, f, indent=2)

    import diffusers
    import triton
    from diffusers import WanTransformer3DModel

    import sixbit_compiler
    from sixbit_compiler.quality import fidelity

    result.update(diffusers=diffusers.__version__, triton=triton.__version__)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    with torch.device(dev):
        model = WanTransformer3DModel(**WAN_1_3B).to(torch.bfloat16).eval()
    g = torch.Generator(device=dev).manual_seed(1)
    x = torch.randn(1, 16, args.frames, args.height, args.width, device=dev, dtype=torch.bfloat16, generator=g)
    text = torch.randn(1, 512, 4096, device=dev, dtype=torch.bfloat16, generator=g)
    t = torch.tensor([999.0], device=dev)
    call = lambda m: m(hidden_states=x, timestep=t, encoder_hidden_states=text, return_dict=False)[0]
    result["weights_bf16_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["sdpa_backend"] = "default (cuDNN on torch 2.11)"

    with torch.no_grad():
        torch.cuda.reset_peak_memory_stats()
        ref, times = timed(lambda: call(model), repeats=3)
        result["bf16_eager"] = {"forward_s": times[1:], "peak_allocated_bytes": torch.cuda.max_memory_allocated()}
        print("bf16 eager", result["bf16_eager"], flush=True)
        save()

        compiled = torch.compile(model, backend="sixbit", options={"activation": "int8", "lowering": args.lowering,
                                                                    "dump_dir": os.environ.get("SIXBIT_DUMP_DIR", "/tmp/sixbit_dump")})
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        call(compiled)
        torch.cuda.synchronize()
        result["compile_s"] = time.perf_counter() - t0
        result["memory_report"] = sixbit_compiler.memory_report(compiled)
        result["allocated_after_compile_bytes"] = torch.cuda.memory_allocated()
        print("compiled in", result["compile_s"], result["memory_report"], flush=True)
        save()
        for act in ("int8", "nvfp4"):
            sixbit_compiler.set_activation(compiled, act)
            torch.cuda.reset_peak_memory_stats()
            out, times = timed(lambda: call(compiled), repeats=2)
            result[f"sixbit_{act}"] = {
                "forward_s": times, "peak_allocated_bytes": torch.cuda.max_memory_allocated(),
                "fidelity_vs_bf16": fidelity(out.float(), ref.float()),
            }
            print(act, result[f"sixbit_{act}"], flush=True)
            save()
        result["stats"] = sixbit_compiler.stats(compiled)["summary"]
        save()
    print(json.dumps({k: v for k, v in result.items() if k != "stats"}, indent=1))


if __name__ == "__main__":
    main()
