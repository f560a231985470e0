"""Attention benchmark: sixbit's quantized attention (INT8 Q·Kᵀ, FP8 P·V) against PyTorch SDPA.

At the attention shapes of Wan2.1-14B / 1.3B (480p, 81 frames: 32,760 tokens, head dim 128),
Wan's cross-attention (512 text tokens) and CogVideoX-2B (49 frames, 720x480: 17,776 tokens,
head dim 64, CFG batch 2), in one process on one card:

* SDPA in bf16: the default backend choice, cuDNN and flash, each named;
* sixbit: the whole op (Q, K, V quantization + the kernel), the kernel alone on quantized
  inputs, each autotuning config alone, and the quantization alone;
* accuracy against bf16 SDPA (relative L2, cosine) on inputs whose keys carry a per-channel
  offset, as DiT keys do.

Prints TFLOP/s (4·B·H·Sq·Skv·D per call) and ratios to the default SDPA; writes JSON to $OUT.

    python benchmarks/attention.py [--shapes w14b,w13b,wan_cross,cog2b] [--sweep]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

#: name -> (B, H, Sq, Skv, D)
SHAPES = {
    "w14b": (1, 40, 32760, 32760, 128),
    "w13b": (1, 12, 32760, 32760, 128),
    "wan_cross": (1, 40, 32760, 512, 128),
    "cog2b": (2, 30, 17776, 17776, 64),
}


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def ptx_matrix_kinds():
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    kinds = set()
    for ptx in glob.glob(os.path.join(cache, "*", "_attention_kernel*.ptx")):
        kinds |= set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+?)\s", open(ptx).read()))
    return sorted(kinds)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true", help="also time every kernel config alone")
    args = ap.parse_args()
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)

    from sixbit_compiler.formats.attention import LOG2E, key_mean
    from sixbit_compiler.kernels import attention as qa

    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "shapes": {}}

    def save():
        with open(os.path.join(out_dir, "attention.json"), "w") as f:
            json.dump(res, f, indent=1)

    for name in args.shapes.split(","):
        b, h, sq, skv, d = SHAPES[name]
        g = torch.Generator(device="cuda").manual_seed(sq + h)
        # q, k, v as SDPA sees them in diffusers: [B, H, S, D] views of [B, S, H, D] tensors
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        k = (torch.randn(b, skv, h, d, device="cuda", generator=g)
             + 2 * torch.randn(1, 1, h, d, device="cuda", generator=g)).bfloat16().transpose(1, 2)
        v = torch.randn(b, skv, h, d, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
        flops = 4.0 * b * h * sq * skv * d
        r = {"shape": [b, h, sq, skv, d]}
        exact = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        r["sdpa_default"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
            try:
                with sdpa_kernel(backend):
                    r[f"sdpa_{backend.name.lower()}"] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v))
            except RuntimeError as exc:
                r[f"sdpa_{backend.name.lower()}_error"] = str(exc)[:200]

        out = qa.quantized_attention(q, k, v)
        r["sixbit_op"] = bench(lambda: qa.quantized_attention(q, k, v))
        r["check_rel_err_vs_sdpa"] = rel(out, exact)
        r["check_cosine_vs_sdpa"] = float(torch.nn.functional.cosine_similarity(
            out.flatten().float(), exact.flatten().float(), dim=0))
        del out

        def quantize():
            return qa.quantize_qk(q, None), qa.quantize_qk(k, key_mean(k)), qa.quantize_v(v)

        (qc, qs), (kc, ks), (vc, vs) = quantize()
        r["sixbit_quantize"] = bench(quantize)
        r["quantize_GBps"] = 3 * (q.numel() * 3) / r["sixbit_quantize"] / 1e9  # bf16 read + 1-byte write
        factor = d ** -0.5 * LOG2E
        o = torch.empty((b, sq, h, d), dtype=torch.bfloat16, device="cuda").transpose(1, 2)
        kargs = (qc, qs, kc, ks, vc.view(torch.float8_e4m3fn), vs, o, vs, factor, h, sq, skv, qc.shape[2], kc.shape[2],
                 o.stride(0), o.stride(1), o.stride(2), 0, qa._bucket(sq), qa._bucket(skv))  # no key mask

        def grid(meta):
            return (triton.cdiv(sq, meta["BLOCK_M"]), b * h)

        r["sixbit_kernel"] = bench(lambda: qa.launch_with_scratch(
            lambda: qa._attention_kernel[grid](*kargs, HEAD_DIM=d, UPCAST=False, TMA_OK=True, KEY_MASK=False)))
        r["best_config"] = str(qa._attention_kernel.best_config)
        if args.sweep:
            r["sweep"] = {}
            for cfg in qa._attention_kernel.configs:
                try:
                    r["sweep"][str(cfg)] = bench(lambda: qa.launch_with_scratch(
                        lambda: qa._attention_kernel.fn[grid](*kargs, HEAD_DIM=d, UPCAST=False, TMA_OK=True, KEY_MASK=False,
                                                              **cfg.all_kwargs())))
                except Exception as exc:  # noqa: BLE001 - a config that does not fit is a result too
                    r["sweep"][str(cfg)] = f"failed: {type(exc).__name__}"
        r["tflops"] = {key: flops / val / 1e12 for key, val in r.items()
                       if isinstance(val, float) and key.startswith(("sdpa", "sixbit_op", "sixbit_kernel"))}
        r["ratio_to_sdpa_default"] = {key: r["sdpa_default"] / r[key] for key in r["tflops"]}
        res["shapes"][name] = r
        save()
        print(f"\n{name} {r['shape']}: " + ", ".join(f"{key} {val * 1e3:.2f} ms" for key, val in r.items()
                                                   if isinstance(val, float) and not key.startswith(("check", "quantize_"))), flush=True)
        print("  TFLOP/s: " + ", ".join(f"{key} {val:.0f}" for key, val in r["tflops"].items()), flush=True)
        print("  vs SDPA default: " + ", ".join(f"{key} {val:.2f}x" for key, val in r["ratio_to_sdpa_default"].items()),
              f"| rel err {r['check_rel_err_vs_sdpa']:.4f}, cosine {r['check_cosine_vs_sdpa']:.5f}, best {r['best_config']}",
              flush=True)
        if args.sweep:
            print("  sweep: " + ", ".join(f"{key}: {val if isinstance(val, str) else f'{val * 1e3:.2f} ms'}"
                                          for key, val in r["sweep"].items()), flush=True)
        del q, k, v, exact, qc, kc, vc, o
        torch.cuda.empty_cache()
    res["wgmma_kinds"] = ptx_matrix_kinds()
    save()
    print("wgmma kinds in the attention kernel's PTX:", res["wgmma_kinds"])


if __name__ == "__main__":
    main()
