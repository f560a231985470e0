"""Norm prologues that write INT8 codes: the chunked kernel against the plain prologue plus a
quantization pass (``quantize_prologues``, ``codegen/rows.py``).

Wan's AdaLN prologue (``layer_norm(x) * (1 + scale) + shift``, bf16 out) over 32,760 tokens at
W-14B's and W-1.3B's widths, each on the GPU: the whole-row prologue kernel alone, the INT8
quantization pass after it (``quantize_int8_rows``), and the chunked kernel with the codes, with
and without its bf16 output, over a few (rows a program, chunk, warps) tilings. Checks that the
chunked kernel's codes equal the quantization pass's and its output the plain kernel's. Writes
``prologue_chunked.json`` to $OUT (or ./out); times in µs (``triton.testing.do_bench`` medians).

    python3 benchmarks/prologue_codes.py
"""

from __future__ import annotations


import torch
import torch.fx as fx
import triton
from torch.fx.passes.shape_prop import ShapeProp

from sixbit_compiler.codegen import pointwise, rows
from sixbit_compiler.kernels.quantize import quantize_int8_rows

from _results import write_json

F = torch.nn.functional
TOKENS = 32760
WIDTHS = (5120, 1536)  # Wan2.1-14B, Wan2.1-1.3B
TILINGS = ((2, 1024, 4), (1, 1024, 4), (4, 1024, 8), (2, 2048, 8), (4, 512, 4), (8, 512, 8))


def adaln_chain(width: int) -> list[fx.Node]:
    def adaln(x, scale, shift):
        return (F.layer_norm(x.float(), (width,), None, None, 1e-6) * (1 + scale) + shift).type_as(x)

    gm = fx.symbolic_trace(adaln)
    ShapeProp(gm).propagate(torch.randn(1, 8, width, dtype=torch.bfloat16), torch.randn(1, 1, width),
                            torch.randn(1, 1, width))
    return [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def main():
    def bench(fn):
        return triton.testing.do_bench(fn, warmup=100, rep=500) * 1e3

    res = {"card": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "unit": "us"}
    for width in WIDTHS:
        nodes = adaln_chain(width)
        plain, chunked = pointwise.emit_pointwise(nodes), rows.emit_quantizing_rows(nodes)
        by_name = {"x": torch.randn(1, TOKENS, width, dtype=torch.bfloat16, device="cuda"),
                   "scale": torch.randn(1, 1, width, device="cuda") * 0.1,
                   "shift": torch.randn(1, 1, width, device="cuda") * 0.1}
        args = [by_name[n] for n in plain.inputs]
        r = {"plain": bench(lambda: pointwise.run_pointwise(plain, *args))}
        y = pointwise.run_pointwise(plain, *args)
        r["rows_kernel"] = bench(lambda: quantize_int8_rows(y.view(TOKENS, width)))
        default = rows.chunking
        try:
            for n_rows, chunk, warps in TILINGS:
                if chunk > width:
                    continue
                rows.chunking = lambda w, t=(n_rows, chunk, warps): t
                tag = f"r{n_rows}_c{chunk}_w{warps}"
                r[f"chunked_{tag}"] = bench(lambda: rows.run_quantizing_rows(chunked, *args))
                r[f"chunked_codes_only_{tag}"] = bench(lambda: rows.run_quantizing_rows(chunked, *args, write_out=False))
        finally:
            rows.chunking = default
        out, codes, scales = rows.run_quantizing_rows(chunked, *args)
        q, s, _, _ = quantize_int8_rows(out.view(TOKENS, width))
        r["codes_equal"] = bool(torch.equal(codes.view(TOKENS, width), q) and torch.equal(scales.view(TOKENS, 1), s))
        r["out_rel_err_vs_plain"] = float((out.float() - y.float()).norm() / y.float().norm())
        res[str(width)] = r
        print(width, {k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    write_json("prologue_chunked.json", res)


if __name__ == "__main__":
    main()
