"""Kernel benchmark (issue: Triton kernels for the quantized linear on Hopper).

For M = 32,760 tokens (Wan2.1 480p, 81 frames) and the Wan2.1-1.3B / 14B K x N shapes, times
in one process, on one card:

* baselines: bf16 ``a @ w.t()`` (cuBLAS), ``torch._int_mm`` (INT8), ``torch._scaled_mm`` FP8
  e4m3 rowwise, and a device-to-device copy (the bandwidth ceiling);
* sixbit: the INT8 scaled GEMM (epilogue: per-token x per-channel scales, bias, bf16 out), the
  bf16 scaled GEMM of the NVFP4 route, the activation quantization kernels (GB/s), the
  per-call weight decode, and the whole quantized linear per precision;
* correctness of each sixbit kernel against the reference at these real shapes.

Prints TFLOP/s and the ratio to bf16 per shape and kernel; writes JSON to $OUT (or ./out).
Also counts the wgmma instructions in the PTX Triton generated.

    python benchmarks/kernels.py [--shapes 1536x1536,5120x5120] [--m 32760]
    python benchmarks/kernels.py --gemm-sweep [store|feeds]  # the GEMM template's configs, variants
    python benchmarks/kernels.py --quant-sweep  # tilings of the per-token INT8 / FP8 quantization
    python benchmarks/kernels.py --quant-bytes  # HBM bytes of one quantization (Nsight Compute)

``--gemm-sweep`` times each config of the INT8, FP8 and bf16 GEMM template directly (one
program per tile against persistent programs), next to cuBLAS bf16 and FP8 in the same process.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import subprocess
import time

import torch
import triton
from triton.testing import do_bench

SHAPES = ["1536x1536", "1536x8960", "8960x1536", "5120x5120", "5120x13824", "13824x5120"]


def bench(fn):
    return do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3  # seconds


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def inspect_ptx():
    """Matrix instructions in the generated PTX/SASS of the sixbit GEMM kernels."""
    found = {}
    cache = os.environ.get("TRITON_CACHE_DIR", os.path.expanduser("~/.triton/cache"))
    for ptx in glob.glob(os.path.join(cache, "*", "_scaled_gemm_body*.ptx")) + glob.glob(os.path.join(cache, "*", "region*_gemm_*.ptx")):
        text = open(ptx).read()
        kinds = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(\S+?)\s", text)))
        entry = {"wgmma_instructions": len(re.findall(r"wgmma\.mma_async", text)), "wgmma_kinds": kinds,
                 "mma_sync_instructions": len(re.findall(r"\bmma\.sync", text))}
        cubin = ptx[:-4] + ".cubin"
        if os.path.exists(cubin):
            try:
                sass = subprocess.run(["cuobjdump", "-sass", cubin], capture_output=True, text=True, timeout=60).stdout
                entry["sass_counts"] = {op: len(re.findall(rf"\b{op}\b", sass)) for op in ("HGMMA", "IGMMA", "QGMMA", "HMMA", "IMMA")}
            except Exception as exc:  # cuobjdump missing: PTX is still evidence
                entry["sass_error"] = str(exc)
        found[os.path.basename(ptx)[:-4] + "/" + os.path.basename(os.path.dirname(ptx))[:12]] = entry
    return found


def sweep_variants(sweep_set: str, kind: str, bk: int) -> list:
    """Configs timed beside the autotuning space. ``feeds``: the two fast kinds apart
    (persistent without TMA, TMA one tile per program), 16 warps, 128x128 tiles (runs 6-7).
    ``store``: the persistent TMA configs storing C through a TMA descriptor, whole or in two
    halves (half the staging buffer, room for a fourth stage); for FP8 also without the
    accumulator promotion, to measure what it costs."""
    def cfg(bm, bn, w, st, p, tma, **extra):
        return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "PERSISTENT": p, "TMA": tma, **extra},
                             num_warps=w, num_stages=st)
    if sweep_set == "feeds":
        return [cfg(bm, bn, w, st, p, tma)
                for p, tma, w, st, shapes in ((True, False, 8, 3, ((256, 128), (128, 256))), (False, True, 8, 3, ((256, 128), (128, 256))),
                                              (True, True, 16, 3, ((256, 128), (128, 256))), (True, True, 8, 4, ((128, 128),)))
                for bm, bn in shapes]
    if sweep_set == "wide":  # 256x256 tiles, 16 warps: half the L2 -> shared traffic per MMA of 256x128
        wide = [cfg(256, 256, 16, st, True, True, TMA_STORE=True, STORE_SPLIT=split) for split, st in ((2, 2), (4, 3))]
        if kind != "bf16":
            wide.append(triton.Config({"BLOCK_M": 256, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8, "PERSISTENT": True,
                                       "TMA": True, "TMA_STORE": True, "STORE_SPLIT": 2}, num_warps=16, num_stages=4))
        return wide
    tiles = ((128, 256), (256, 128))
    out = [cfg(bm, bn, 8, st, True, True, TMA_STORE=True, STORE_SPLIT=split)
           for split, st in ((1, 3), (2, 3), (2, 4)) for bm, bn in tiles]
    if kind == "fp8":
        out += [cfg(bm, bn, 8, 3, True, True, FAST_ACCUM=True) for bm, bn in tiles]
        out += [cfg(bm, bn, 8, 3, True, True, FAST_ACCUM=True, TMA_STORE=True, STORE_SPLIT=2) for bm, bn in tiles]
    return out


def gemm_sweep(x, w, bias, sweep_set="store"):
    """Each config of the GEMM template timed alone on INT8, FP8 and bf16 operands (the
    operands need not be exact quantizations here: only speed is measured, plus a check of each
    config's output, NaN-filled before it runs, against a float64 reference)."""
    from sixbit_compiler.kernels._common import NO_FMA
    from sixbit_compiler.kernels.gemm import _scaled_gemm_body, configs, gemm_grid, launch_with_scratch, m_bucket

    m, k = x.shape
    n = w.shape[0]
    sa = x.float().abs().amax(1) / 127
    sw = w.float().abs().amax(1) / 127
    operands = {
        "int8": ((x.float() / sa[:, None]).round().to(torch.int8), (w.float() / sw[:, None]).round().to(torch.int8), sa, sw),
        "fp8": ((x.float() / sa[:, None]).to(torch.float8_e4m3fn), (w.float() / sw[:, None]).to(torch.float8_e4m3fn), sa, sw),
        "bf16": (x, w, torch.ones(m, device=x.device), torch.ones(n, device=x.device)),
    }
    sa8 = operands["int8"][2].reshape(m, 1)
    r = {"fp8_scaled_mm": bench(lambda: torch._scaled_mm(operands["fp8"][0], operands["fp8"][1].t(), scale_a=sa8,
                                                           scale_b=sw.reshape(1, n), out_dtype=torch.bfloat16))}
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    for kind, (a, b, sa_, sb_) in operands.items():
        timings, checks = {}, {}
        bk = 64 if kind == "bf16" else 128
        ref = (a.double() @ b.double().t()) * sa_.double()[:, None] * sb_.double()[None, :] + bias.double()
        for cfg in configs(kind != "bf16") + sweep_variants(sweep_set, kind, bk):
            meta = dict(cfg.kwargs)
            name = ("{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**meta) + f" w{cfg.num_warps} s{cfg.num_stages}"
                    + (" persistent" if meta["PERSISTENT"] else "") + (" tma" if meta["TMA"] else "")
                    + (f" tma-store/{meta['STORE_SPLIT']}" if meta.get("TMA_STORE") else "")
                    + (" fast-accum" if meta.get("FAST_ACCUM") else ""))

            def run():
                launch_with_scratch(lambda: _scaled_gemm_body[gemm_grid(m, n, x.device)(meta)](
                    a, b, out, sa_, sb_, bias, m, n, k, m_bucket(m), a.stride(0), b.stride(0), out.stride(0),
                    A_ROWWISE=True, B_COLWISE=True, HAS_BIAS=True, INT_ACC=kind == "int8", UPCAST=False,
                    **meta, TMA_OK=True, TMA_STORE_OK=True, num_warps=cfg.num_warps, num_stages=cfg.num_stages, **NO_FMA))
            try:
                out.fill_(float("nan"))  # a tile left unwritten shows in the check
                run()
                checks[name] = rel(out, ref)
                timings[name] = bench(run)
            except Exception as exc:  # e.g. out of shared memory for this tile on this card
                timings[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        r[f"sweep_{kind}"] = timings
        r[f"check_{kind}_rel_err"] = checks
        for persistent in (False, True):  # fast accumulation is measured, never shipped
            ok = {c: t for c, t in timings.items()
                  if isinstance(t, float) and ("persistent" in c) == persistent and "fast-accum" not in c}
            best = min(ok, key=ok.get) if ok else None
            r[f"best_{kind}_{'persistent' if persistent else 'per_tile'}"] = (best, ok[best]) if best else None
        del ref
    return r


def quant_sweep(x, sweep_set="tilings"):
    """The per-token quantization kernel under each tiling, timed alone (GB/s of its minimum
    traffic: read 2 B, write 1 B an element): whole rows in registers (one chunk, the row
    padded to a power of two) against rows in chunks re-read from L2, each over rows per
    program and warps. Checks every config's INT8 codes against the shipped kernel's."""
    from sixbit_compiler.kernels._common import NO_FMA
    from sixbit_compiler.kernels.quantize import _rows_kernel, _untuned_row_tiling, quantize_int8_rows

    m, k = x.shape
    ref_q, ref_s, _, _ = quantize_int8_rows(x)
    traffic = m * k * 3
    # the shipped kernel autotunes; its tiling without autotuning is recorded beside it
    r = {"untuned_tiling": list(_untuned_row_tiling(k)), "shipped_GBps": traffic / bench(lambda: quantize_int8_rows(x)) / 1e9}
    q = torch.empty(m, k, dtype=torch.int8, device=x.device)
    scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    amax = torch.empty(m, dtype=torch.float32, device=x.device)
    abssum = torch.empty(m, dtype=torch.float32, device=x.device)
    whole = triton.next_power_of_2(k)
    if sweep_set == "hints":  # the shipped tilings with and without the L2 eviction hints
        from sixbit_compiler.kernels.quantize import ROW_TILINGS
        configs = [(bm, bk, w, False, 1, hints) for bm, bk, w in ROW_TILINGS if bk < k for hints in (False, True)]
    else:
        configs = [(bm, whole, w, True, 1, False) for bm in (1, 2, 4) for w in (4, 8, 16) if bm * whole <= 32768]
        configs += [(bm, bk, w, False, st, False) for bm in (1, 2, 4, 8, 16) for bk in (256, 512, 1024, 2048, 4096)
                    for w in (2, 4, 8, 16) for st in (1, 3) if 512 <= bm * bk <= 16384 and bk < k and bm * bk >= 64 * w]
    for fp8 in (False, True):
        timings = {}
        for bm, bk, w, one, st, hints in configs:
            name = f"{'row' if one else 'chunks'} m{bm} k{bk} w{w} s{st}" + (" l2-hints" if hints else "")

            def run():
                _rows_kernel[(triton.cdiv(m, bm),)](
                    x, q, scale, amax, abssum, m, k, x.stride(0), q.stride(0), torch.finfo(x.dtype).max,
                    FP8=fp8, BLOCK_M=bm, BLOCK_K=bk, ONE_CHUNK=one, HW_CVT=True, L2_HINTS=hints,
                    num_warps=w, num_stages=st, **NO_FMA)
            try:
                run()
                if not fp8 and not (torch.equal(q, ref_q) and torch.equal(scale, ref_s)):
                    timings[name] = "failed: codes differ from the shipped tiling's"
                    continue
                timings[name] = traffic / bench(run) / 1e9
            except Exception as exc:  # e.g. too many registers for this tile
                timings[name] = f"failed: {type(exc).__name__}: {str(exc)[:120]}"
        ok = {c: v for c, v in timings.items() if isinstance(v, float)}
        best = max(ok, key=ok.get)
        r["fp8" if fp8 else "int8"] = {"GBps": timings, "best": (best, ok[best])}
    return r


def quant_bytes_child(m: int, k: int):
    """One per-token INT8 quantization of an [m, k] bf16 activation between cudaProfilerStart and
    Stop (after the autotuning and a warm-up call), for ``ncu --profile-from-start off``."""
    from sixbit_compiler.kernels.quantize import quantize_int8_rows

    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    for _ in range(2):
        quantize_int8_rows(x)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    quantize_int8_rows(x)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


def quant_bytes(m: int, k: int, timeout: int = 240) -> dict:
    """HBM bytes read and written by the quantization kernel, against its minimum (read the
    bf16 activation once, write the INT8 codes): is the second pass served by L2?"""
    import sys

    cmd = ["ncu", "--profile-from-start", "off", "--csv", "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum",
           sys.executable, os.path.abspath(__file__), "--quant-bytes-child", f"{m}x{k}"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    from block import parse_ncu_csv  # the block benchmark's reader of ncu's CSV

    found = parse_ncu_csv(done.stdout, calls=1)
    if found is None:
        return {"error": f"ncu printed no metrics (rc {done.returncode}): {done.stderr[-400:]}"}
    read, written = found["read"], found["written"]
    return {"read_bytes": read, "written_bytes": written, "read_over_minimum": read / (m * k * 2),
            "written_over_minimum": written / (m * k)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--m", type=int, default=32760)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--quant-only", action="store_true", help="only the quantization and decode kernels")
    ap.add_argument("--gemm-sweep", nargs="?", const="store", choices=("store", "feeds", "wide"),
                    help="only the GEMMs: every template config and a set of variants (sweep_variants), timed alone")
    ap.add_argument("--quant-sweep", nargs="?", const="tilings", choices=("tilings", "hints"),
                    help="only the per-token quantization: tilings (or the shipped ones with L2 hints), timed alone")
    ap.add_argument("--quant-bytes", action="store_true", help="only the per-token quantization's HBM bytes (ncu)")
    ap.add_argument("--quant-bytes-child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quant_bytes_child:
        return quant_bytes_child(*map(int, args.quant_bytes_child.split("x")))
    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)

    from sixbit_compiler.formats import Precision
    from sixbit_compiler.kernels import dispatch
    from sixbit_compiler.kernels.gemm import _float_gemm, _fp8_gemm, _int8_gemm, scaled_gemm
    from sixbit_compiler.kernels.quantize import quantize_fp8_rows, quantize_int8_rows, quantize_nvfp4_values
    from sixbit_compiler.kernels.weights import decode_nvfp4_to_fp8, decode_nvfp4_to_int8, decode_nvfp4_values
    from sixbit_compiler.reference import quantized_linear_reference
    from sixbit_compiler.weight_store import quantize_weight

    dev = torch.device("cuda")
    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "m": args.m, "date": time.strftime("%Y-%m-%d"), "shapes": {}}

    def save():
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump(res, f, indent=1)

    # Copy bandwidth ceiling: 2 GiB device-to-device, bytes read + written.
    src = torch.empty(2**30, dtype=torch.int16, device=dev)
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src))
    res["copy_GBps"] = 2 * src.numel() * 2 / t / 1e9
    del src, dst
    print(f"copy bandwidth {res['copy_GBps']:.0f} GB/s", flush=True)

    m = args.m
    for shape in args.shapes.split(","):
        k, n = map(int, shape.split("x"))
        g = torch.Generator(device=dev).manual_seed(k + n)
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16, generator=g)
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16, generator=g) / k**0.5
        bias = torch.randn(n, device=dev, dtype=torch.bfloat16, generator=g)
        flops = 2.0 * m * n * k
        r = {}
        if args.quant_bytes:
            r = quant_bytes(m, k)
            res["shapes"][shape] = r
            save()
            print(shape, r, flush=True)
            continue
        if args.quant_sweep:
            r = quant_sweep(x, args.quant_sweep)
            res["shapes"][shape] = r
            save()
            print(f"{shape}: shipped {r['shipped_GBps']:.0f} GB/s (untuned {r['untuned_tiling']}); best int8 {r['int8']['best']}, "
                  f"fp8 {r['fp8']['best']} (copy {res['copy_GBps']:.0f} GB/s)", flush=True)
            continue
        if args.quant_only:
            qw = quantize_weight(w, False)
            r["quant_int8_GBps"] = (m * k * 3) / bench(lambda: quantize_int8_rows(x)) / 1e9
            # the same traffic with no arithmetic and no row statistics: a practical ceiling
            r["cast_bf16_to_int8_GBps"] = (m * k * 3) / bench(lambda: x.to(torch.int8)) / 1e9
            r["quant_fp8_GBps"] = (m * k * 3) / bench(lambda: quantize_fp8_rows(x)) / 1e9
            r["quant_nvfp4_GBps_min_traffic"] = (m * k * 4) / bench(lambda: quantize_nvfp4_values(x)) / 1e9
            r["decode_int8_s"] = bench(lambda: decode_nvfp4_to_int8(qw.packed, qw.block_scales_bits, qw.tensor_scale))
            res["shapes"][shape] = r
            save()
            print(shape, r, flush=True)
            continue
        t_bf16 = bench(lambda: x @ w.t())
        r["bf16_cublas"] = t_bf16
        if args.gemm_sweep:
            r.update(gemm_sweep(x, w, bias, args.gemm_sweep))
            res["shapes"][shape] = r
            save()
            print(f"\n{shape}: bf16 cuBLAS {flops / t_bf16 / 1e12:.0f} TFLOP/s; FP8 _scaled_mm {t_bf16 / r['fp8_scaled_mm']:.2f}x", flush=True)
            for kind in ("int8", "fp8", "bf16"):
                for persistent in (False, True):
                    best = r[f"best_{kind}_{'persistent' if persistent else 'per_tile'}"]
                    if best:
                        print(f"  {kind:4s} {'persistent' if persistent else 'per tile  '}: {t_bf16 / best[1]:.2f}x bf16  ({best[0]})", flush=True)
            del x, w
            torch.cuda.empty_cache()
            continue

        a8, sa, _, _ = quantize_int8_rows(x)
        qw = quantize_weight(w, False)
        w8, sw = decode_nvfp4_to_int8(qw.packed, qw.block_scales_bits, qw.tensor_scale)
        r["int_mm"] = bench(lambda: torch._int_mm(a8, w8.t()))
        af = (x.float() / sa).to(torch.float8_e4m3fn)
        wf = (w.float() / (w.float().abs().amax(1, keepdim=True) / 448)).to(torch.float8_e4m3fn)
        swf = (w.float().abs().amax(1, keepdim=True) / 448).t().contiguous()
        r["fp8_scaled_mm"] = bench(lambda: torch._scaled_mm(af, wf.t(), scale_a=sa, scale_b=swf, out_dtype=torch.bfloat16))
        wf_nk = wf.contiguous()
        c_fp8 = scaled_gemm(af, wf_nk, sa, swf.t().contiguous(), bias, torch.bfloat16)  # autotunes on first call
        r["sixbit_fp8_gemm"] = bench(lambda: scaled_gemm(af, wf_nk, sa, swf.t().contiguous(), bias, torch.bfloat16))
        ref_fp8 = (af.double() @ wf.double().t()) * sa.double() * swf.double() + bias.double()
        r["check_fp8_gemm_rel_err"] = rel(c_fp8, ref_fp8)
        # the same GEMM with the accumulator promoted to fp32 every 128 K (FP8_FAST_ACCUM off)
        c_fp8 = scaled_gemm(af, wf_nk, sa, swf.t().contiguous(), bias, torch.bfloat16, fast_accum=False)
        r["sixbit_fp8_gemm_promoted"] = bench(lambda: scaled_gemm(af, wf_nk, sa, swf.t().contiguous(), bias, torch.bfloat16, fast_accum=False))
        r["check_fp8_gemm_promoted_rel_err"] = rel(c_fp8, ref_fp8)
        r["fp8_config"] = str(_fp8_gemm.best_config)
        del c_fp8, ref_fp8

        c8 = scaled_gemm(a8, w8, sa, sw, bias, torch.bfloat16)  # autotunes on first call
        r["sixbit_int8_gemm"] = bench(lambda: scaled_gemm(a8, w8, sa, sw, bias, torch.bfloat16))
        ref8 = ((torch._int_mm(a8, w8.t()).double() * sa.double() * sw.double().t()) + bias.double())
        r["check_int8_gemm_rel_err"] = rel(c8, ref8)
        r["int8_config"] = str(_int8_gemm.best_config)

        xv, xts, _, _ = quantize_nvfp4_values(x)
        wv = decode_nvfp4_values(qw.packed, qw.block_scales_bits)
        cf = scaled_gemm(xv, wv, xts, qw.tensor_scale, bias, torch.bfloat16)
        r["sixbit_bf16_gemm"] = bench(lambda: scaled_gemm(xv, wv, xts, qw.tensor_scale, bias, torch.bfloat16))
        r["cublas_bf16_on_nvfp4_values"] = bench(lambda: xv @ wv.t())
        reff = (xv.double() @ wv.double().t()) * float(xts * qw.tensor_scale) + bias.double()
        r["check_bf16_gemm_rel_err"] = rel(cf, reff)
        r["bf16_config"] = str(_float_gemm.best_config)

        r["quant_int8_s"] = bench(lambda: quantize_int8_rows(x))
        r["quant_int8_GBps"] = (m * k * 2 + m * k) / r["quant_int8_s"] / 1e9
        # the same traffic (read 2 B, write 1 B) with no arithmetic: PyTorch's cast, a practical ceiling
        r["cast_bf16_to_int8_GBps"] = (m * k * 3) / bench(lambda: x.to(torch.int8)) / 1e9
        r["quant_fp8_s"] = bench(lambda: quantize_fp8_rows(x))
        r["quant_fp8_GBps"] = (m * k * 2 + m * k) / r["quant_fp8_s"] / 1e9
        r["quant_nvfp4_s"] = bench(lambda: quantize_nvfp4_values(x))
        r["quant_nvfp4_GBps_min_traffic"] = (m * k * 2 + m * k * 2) / r["quant_nvfp4_s"] / 1e9
        r["decode_int8_s"] = bench(lambda: decode_nvfp4_to_int8(qw.packed, qw.block_scales_bits, qw.tensor_scale))
        r["decode_values_s"] = bench(lambda: decode_nvfp4_values(qw.packed, qw.block_scales_bits))
        r["decode_fp8_s"] = bench(lambda: decode_nvfp4_to_fp8(qw.packed, qw.block_scales_bits, qw.tensor_scale))

        for p, backend in ((Precision.INT8, None), (Precision.FP8, "cublas"), (Precision.FP8, "triton"),
                           (Precision.NVFP4, "cublas"), (Precision.NVFP4, "triton"),
                           (Precision.BF16, "cublas"), (Precision.BF16, "triton")):
            name = f"linear_{p.name.lower()}" + (f"_{backend}" if backend else "")
            f = lambda: dispatch.quantized_linear(x, qw.packed, qw.block_scales_bits, qw.tensor_scale, bias, p, k, False, backend)
            out = f()
            r[name] = bench(f)
            # The whole activation: NVFP4's tensor scale depends on every row.
            ref = quantized_linear_reference(x, qw.packed, qw.block_scales, qw.tensor_scale, bias, p, k, False)
            r[f"check_{name}_rel_err"] = rel(out, ref)
            del out, ref

        tf = {key: flops / v / 1e12 for key, v in r.items() if isinstance(v, float) and not key.startswith(("check", "quant", "decode")) and not key.endswith("GBps")}
        r["tflops"] = tf
        r["ratio_to_bf16"] = {key: t_bf16 / v for key, v in r.items() if isinstance(v, float) and key in tf}
        res["shapes"][shape] = r
        save()
        print(f"\n{shape}: " + ", ".join(f"{key} {v:.0f}" for key, v in tf.items()), flush=True)
        print("  ratio to bf16: " + ", ".join(f"{key} {v:.2f}" for key, v in r["ratio_to_bf16"].items()), flush=True)
        print(f"  quant int8 {r['quant_int8_GBps']:.0f} GB/s (cast {r['cast_bf16_to_int8_GBps']:.0f}), fp8 {r['quant_fp8_GBps']:.0f} GB/s, nvfp4 {r['quant_nvfp4_GBps_min_traffic']:.0f} GB/s; decode int8 "
              f"{r['decode_int8_s'] * 1e6:.0f} us; checks: " + ", ".join(f"{key[6:]} {v:.1e}" for key, v in r.items() if key.startswith("check")), flush=True)
        del x, w, a8, w8, af, wf, xv, wv, c8, cf
        torch.cuda.empty_cache()

    res["ptx"] = inspect_ptx()
    save()
    print(json.dumps(res["ptx"], indent=1))


if __name__ == "__main__":
    main()
