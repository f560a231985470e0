"""Wan's q/k RMS norm + RoPE + the attention's Q/K quantization: folded (one sixbit kernel per
operand, ``kernels.attention_prologue``) against unfolded (Inductor's norm + RoPE kernel, K's
token mean, ``attention.quantize_qk``), as a Wan2.1 self-attention runs them at 480p, 81 frames.

Per shape, in one process on one card:

* unfolded: ``torch.compile`` of ``formats.attention.rms_norm_rope`` for q and k (what Inductor
  makes of the block's chain), then ``key_mean`` and ``quantize_qk`` for both;
* folded: ``quantize_qk_norm_rope`` (q), ``rope_key_mean`` + ``quantize_qk_norm_rope`` (k);
* ``--sweep``: each tile of ``attention_prologue.TILES`` alone, per launch mode;
* the floor: reading q and k once and writing their codes (6 bytes per element of q and k)
  at the card's measured copy bandwidth, and the folded design's own traffic (K read twice:
  8 bytes).

The largest difference between the folded codes and the unfolded ones (Inductor's, and the
eager chain's) is recorded.

    python benchmarks/attention_prologue.py [--shapes w14b,w13b] [--sweep]
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(__file__))
from _results import write_json  # noqa: E402

#: name -> (B, S, H, D)
SHAPES = {"w14b": (1, 32760, 40, 128), "w13b": (1, 32760, 12, 128)}


def bench(fn):
    return do_bench(fn, warmup=25, rep=200, return_mode="median") * 1e-3


def inputs(b, s, h, d, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = [torch.randn(b, s, h * d, device="cuda", generator=g).bfloat16() for _ in range(2)]
    w = [(1 + 0.3 * torch.randn(h * d, device="cuda", generator=g)).bfloat16() for _ in range(2)]
    angles = torch.rand(1, s, 1, d, device="cuda", generator=g) * 6.3
    return x, w, angles.cos()[..., 0::2], angles.sin()[..., 1::2]


def main(argv=None):
    from sixbit_compiler.formats.attention import key_mean, rms_norm_rope
    from sixbit_compiler.kernels import attention as attn
    from sixbit_compiler.kernels import attention_prologue as prologue

    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args(argv)
    copy_src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    copy_dst = torch.empty_like(copy_src)
    copy_bw = 2 * copy_src.numel() / bench(lambda: copy_dst.copy_(copy_src))
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "copy_gb_s": copy_bw / 1e9, "shapes": {}}
    rope = torch.compile(rms_norm_rope)
    for name in args.shapes.split(","):
        b, s, h, d = SHAPES[name]
        (xq, xk), (wq, wk), cos, sin = inputs(b, s, h, d)
        eps = 1e-6

        def unfolded():
            q, k = rope(xq, wq, eps, cos, sin, h), rope(xk, wk, eps, cos, sin, h)
            return attn.quantize_qk(q, None), attn.quantize_qk(k, key_mean(k))

        def folded():
            mean = prologue.rope_key_mean(xk, wk, eps, cos, sin, h)
            return (prologue.quantize_qk_norm_rope(xq, wq, eps, cos, sin, h),
                    prologue.quantize_qk_norm_rope(xk, wk, eps, cos, sin, h, mean))

        def eager():  # the chain as diffusers runs it, uncompiled
            q, k = rms_norm_rope(xq, wq, eps, cos, sin, h), rms_norm_rope(xk, wk, eps, cos, sin, h)
            return attn.quantize_qk(q, None), attn.quantize_qk(k, key_mean(k))

        def worst(a, b):
            return max(int((x.int() - y.int()).abs().max()) for (x, _), (y, _) in zip(a, b))

        elements = 2 * b * s * h * d
        entry = {"unfolded_s": bench(unfolded), "folded_s": bench(folded),
                 "max_code_difference_vs_inductor": worst(folded(), unfolded()),
                 "max_code_difference_vs_eager": worst(folded(), eager()),
                 "floor_s": 3 * elements / copy_bw, "design_bytes_s": 4 * elements / copy_bw}
        entry["speedup"] = entry["unfolded_s"] / entry["folded_s"]
        entry["folded_vs_floor"] = entry["floor_s"] / entry["folded_s"]
        if args.sweep:  # each tile alone (without autotuning the first of TILES runs)
            entry["tiles"] = {}
            tiles = prologue.TILES
            os.environ["SIXBIT_GEMM_AUTOTUNE"] = "0"
            try:
                for tile in tiles:
                    prologue.TILES = (tile,) + tuple(t for t in tiles if t != tile)
                    mean = prologue.rope_key_mean(xk, wk, eps, cos, sin, h)
                    entry["tiles"][str(tile)] = {
                        "mean_s": bench(lambda: prologue.rope_key_mean(xk, wk, eps, cos, sin, h)),
                        "codes_s": bench(lambda: prologue.quantize_qk_norm_rope(xk, wk, eps, cos, sin, h, mean)),
                    }
            finally:
                prologue.TILES = tiles
                os.environ.pop("SIXBIT_GEMM_AUTOTUNE")
            entry["rstd_s"] = bench(lambda: prologue._rstd(xk, eps))
            entry["quantize_qk_s"] = bench(lambda: attn.quantize_qk(rope(xk, wk, eps, cos, sin, h), None))
            entry["inductor_rope_s"] = bench(lambda: rope(xk, wk, eps, cos, sin, h))
        res["shapes"][name] = entry
        print(name, entry, flush=True)
    write_json("attention_prologue.json", res)
    return res


if __name__ == "__main__":
    main()
