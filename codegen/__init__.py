"""Generated Triton kernels for fused regions (installed as ``sixbit_compiler.codegen``).

Empty for now. The codegen issue puts here the lowering of the regions that a
``fuse_regions`` pass will mark around each quantized linear (norm, modulation, rotation and
quantization before the GEMM; bias, GELU, gate and residual after it), as prologue and
epilogue code around the GEMM templates of ``sixbit_compiler.kernels``.
"""
