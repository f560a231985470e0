"""What the FP8 GEMM's accumulation costs in accuracy, next to the FP8 quantization's own error.

Hopper's FP8 MMA keeps about 14 mantissa bits while it accumulates. The GEMM template either
leaves the sum there through the whole K loop (``fast_accum=True``, ``FP8_FAST_ACCUM``) or
promotes it into an fp32 accumulator every 128 K. For each Wan K x N shape, on activations with
a few outlier channels (as DiT activations have) and the stored NVFP4 weight decoded to
per-channel FP8 (the FP8 tier's operands, through the shipped kernels), relative L2 errors:

* ``accumulation_fast`` / ``accumulation_promoted``: the GEMM (fp32 output, no bias) against the
  exact product of the same FP8 operands in float64: what the accumulation alone adds;
* ``activation_quantization``: that exact product against x (unquantized) times the same FP8
  weight: what quantizing the activation to FP8 costs;
* ``fp8_tier`` / ``int8_tier``: the whole quantized linear (fast accumulation; INT8 for
  comparison) against x times the unquantized weight.

    python3 benchmarks/fp8_accumulation.py [--m 8192]

Writes ``fp8_accumulation.json`` to $OUT (or ./out).
"""

from __future__ import annotations

import argparse

import torch

from _results import write_json

SHAPES = ["1536x1536", "1536x8960", "8960x1536", "5120x5120", "5120x13824", "13824x5120"]


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=8192, help="tokens (the errors do not depend on it)")
    args = ap.parse_args()

    from sixbit_compiler.formats import Precision
    from sixbit_compiler.kernels import dispatch
    from sixbit_compiler.kernels.gemm import scaled_gemm
    from sixbit_compiler.kernels.quantize import quantize_fp8_rows
    from sixbit_compiler.kernels.weights import decode_nvfp4_to_fp8
    from sixbit_compiler.weight_store import quantize_weight

    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "m": args.m, "shapes": {}}
    for shape in SHAPES:
        k, n = map(int, shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(k * 7 + n)
        x = torch.randn(args.m, k, device=dev, generator=g)
        outliers = torch.randperm(k, device=dev, generator=g)[: k // 100]
        x[:, outliers] *= 20  # 1 % of the channels twenty times larger
        x = x.bfloat16()
        w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).bfloat16()
        qw = quantize_weight(w, False)
        af, sa, _, _ = quantize_fp8_rows(x)
        wf, sw = decode_nvfp4_to_fp8(qw.packed, qw.block_scales_bits, qw.tensor_scale)
        w_fp8 = wf.double() * sw.double()  # the FP8 tier's weight, dequantized
        exact = (af.double() @ wf.double().t()) * sa.double() * sw.double().t()
        r = {}
        for fast in (True, False):
            c = scaled_gemm(af, wf, sa, sw, None, torch.float32, fast_accum=fast)
            r[f"accumulation_{'fast' if fast else 'promoted'}"] = rel(c, exact)
            r[f"accumulation_{'fast' if fast else 'promoted'}_max_over_rms"] = float((c.double() - exact).abs().max() / exact.pow(2).mean().sqrt())
            del c
        r["activation_quantization"] = rel(exact, x.double() @ w_fp8.t())
        ref = x.double() @ w.double().t()
        for p in (Precision.FP8, Precision.INT8):
            out = dispatch.quantized_linear(x, qw.packed, qw.block_scales_bits, qw.tensor_scale, None, p, k, False)
            r[f"{p.name.lower()}_tier"] = rel(out, ref)
        res["shapes"][shape] = r
        print(shape, {key: f"{v:.2e}" for key, v in r.items()}, flush=True)
        del x, w, qw, af, wf, exact, ref, w_fp8
        torch.cuda.empty_cache()
    write_json("fp8_accumulation.json", res)


if __name__ == "__main__":
    main()
