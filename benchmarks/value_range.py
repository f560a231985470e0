"""V's per-channel range for the quantized attention (``kernels.attention.value_scales``): one
``torch.aminmax`` against ``amax`` then ``amin``, on W-14B's V (1, 40, 32760, 128) in bf16 on the
GPU, with a check that both give the same values. Writes ``attention_aminmax.json`` to $OUT
(or ./out); times in µs.

    python3 benchmarks/value_range.py
"""

from __future__ import annotations


import torch
import triton

from _results import write_json


def main():
    v = torch.randn(1, 40, 32760, 128, dtype=torch.bfloat16, device="cuda")

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=50, rep=300) * 1e3

    res = {"card": torch.cuda.get_device_name(), "unit": "us", "shape": list(v.shape),
           "amax_then_amin": bench(lambda: (v.amax(dim=-2), v.amin(dim=-2))),
           "aminmax": bench(lambda: torch.aminmax(v, dim=-2))}
    low, high = torch.aminmax(v, dim=-2)
    res["equal"] = bool(torch.equal(low, v.amin(dim=-2)) and torch.equal(high, v.amax(dim=-2)))
    print(res)
    write_json("attention_aminmax.json", res)


if __name__ == "__main__":
    main()
