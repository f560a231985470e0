"""Generated Triton kernels for fused regions (installed as ``sixbit_compiler.codegen``).

* ``pointwise``: Triton source for a chain of elementwise FX nodes (the prologue and epilogue
  chains that ``fuse_regions`` records), computed in fp32 and rounded where the graph's values
  are bf16 / fp16, with sympy index arithmetic over symbolic sizes and strides, compiled and
  cached on disk by source hash. A chain with a layer / RMS norm (a prologue) runs one program
  per row. Tested op by op against PyTorch under ``TRITON_INTERPRET=1``.

The ``lower_regions`` pass (``options={"codegen": True}``) replaces each region chain by its
kernel and the dump writes the sources. Not in yet (issue 5): activation quantization in the
prologue kernels, and the GEMM templates of ``sixbit_compiler.kernels`` taking these
expression lines as prologue / epilogue.
"""
