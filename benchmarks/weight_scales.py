"""Cost and gain of searching NVFP4 weight block scales (option ``weight_scales``), per layer.

For Wan2.1-14B's weight shapes (random Gaussian weights, bf16, on the GPU): the time to quantize
one weight with the amax rule and with the search (``quantize_nvfp4(w, scale_search=True)``),
the weight SQNR each gives, and the peak memory allocated while quantizing. Writes JSON to $OUT
(or ./out).

    python3 benchmarks/weight_scales.py
"""

from __future__ import annotations

import json
import time

import torch
import triton

from _results import write_json

SHAPES = ((5120, 5120), (13824, 5120), (5120, 13824))


def main():
    from sixbit_compiler.formats import dequantize_nvfp4, quantize_nvfp4

    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": "python3 benchmarks/weight_scales.py", "layers": {}}
    for shape in SHAPES:
        g = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * 0.02
        for search in (False, True):
            quantize_nvfp4(w, scale_search=search)  # warm-up
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t0 = time.perf_counter()
            for _ in range(3):
                out = quantize_nvfp4(w, scale_search=search)
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - t0) / 3
            peak = torch.cuda.max_memory_allocated() - base
            decoded = dequantize_nvfp4(*out, dtype=torch.float32)
            sqnr = 10 * torch.log10((w.float() ** 2).sum() / ((decoded - w.float()) ** 2).sum())
            res["layers"][f"{shape[0]}x{shape[1]} {'search' if search else 'amax'}"] = {
                "ms": seconds * 1e3, "sqnr_db": float(sqnr), "transient_peak_gb": peak / 1e9}
            del out, decoded
    print(json.dumps(res, indent=1))
    write_json("weight_scales.json", res)


if __name__ == "__main__":
    main()
