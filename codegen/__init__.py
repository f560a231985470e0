"""Generated Triton kernels for fused regions (installed as ``sixbit_compiler.codegen``).

* ``pointwise``: Triton source for a chain of elementwise FX nodes (the prologue and epilogue
  chains that ``fuse_regions`` records), computed in fp32 and rounded where the graph's values
  are bf16 / fp16, with sympy index arithmetic over symbolic sizes and strides, compiled and
  cached on disk by source hash. A chain with a layer / RMS norm (a prologue) runs one program
  per row. Tested op by op against PyTorch under ``TRITON_INTERPRET=1``.
* ``gemm``: the kernel issue's INT8 / FP8 GEMM (``kernels.gemm.scaled_tile``) as a template whose
  epilogue is a generated chain (bias-free adds and muls, GELU, gate, residual, casts).
* ``rows``: a norm prologue in chunks of its rows, a few rows a program, that also writes the
  output's per-token INT8 codes (``quantize_prologues``), bit-exact with the activation kernels.

The ``lower_regions`` pass (``options={"codegen": True}``) replaces each region chain by its
kernel, the opt-in ``quantize_prologues`` switches norm prologues to their quantizing variant
(measured no faster on the H100), and the dump writes every source.
"""
