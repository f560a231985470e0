"""Numerics of sixbit: the executable specification every kernel is tested against.

Layout follows torchao's ``prototype/mx_formats``: one module per format, plain
PyTorch, no kernels. Every function here accepts bf16, fp16 or fp32 inputs of any
stride and computes internally in fp32.

Edge-case contract (shared by all formats; tested in ``tests/test_formats.py``):

* **All-zero blocks / rows** quantize to zero codes with a zero scale and
  dequantize to exact zeros (never NaN).
* **NaN** in an input poisons exactly the scale group that holds it (a 16-value
  NVFP4 block, an INT8 row): its scale is NaN, so dequantization gives NaN for
  that group and a GEMM gives NaN for the affected output rows. NaN never becomes
  finite garbage and never leaks into other groups. (Per-tensor scales ignore NaN.)
* **±Inf saturates** to the largest finite value of the input's dtype before
  quantization, the same convention as saturating FP8 casts. The group that holds
  it then dequantizes to that large finite value and the rest of the tensor is
  coarsely quantized relative to it.
* **Tiny and huge values**: scales are fp32, so any finite bf16/fp16/fp32 input
  is representable. NVFP4 blocks whose amax is below 2**-9 of the tensor amax
  underflow the e4m3 block scale and become zero (inherent to NVFP4).
* **K not a multiple of the group size** (16 for NVFP4, 128 for the Hadamard
  rotation) is zero-padded; dequantization takes ``k=`` to trim the padding.
"""

from .fp8 import FP8_E4M3_MAX, dequantize_fp8_rows, quantize_fp8_rows
from .hadamard import HADAMARD_BLOCK, hadamard_matrix, hadamard_rotate
from .int8 import dequantize_int8, quantize_int8
from .nvfp4 import (
    E2M1_VALUES,
    F4_E2M1_MAX,
    F8_E4M3_MAX,
    NVFP4_BLOCK,
    dequantize_nvfp4,
    nvfp4_block_values,
    nvfp4_to_fp8,
    nvfp4_to_int8,
    quantize_nvfp4,
)
from .precision import Precision

__all__ = [
    "E2M1_VALUES",
    "FP8_E4M3_MAX",
    "F4_E2M1_MAX",
    "F8_E4M3_MAX",
    "HADAMARD_BLOCK",
    "NVFP4_BLOCK",
    "Precision",
    "dequantize_fp8_rows",
    "dequantize_int8",
    "dequantize_nvfp4",
    "hadamard_matrix",
    "hadamard_rotate",
    "nvfp4_block_values",
    "nvfp4_to_fp8",
    "nvfp4_to_int8",
    "quantize_fp8_rows",
    "quantize_int8",
    "quantize_nvfp4",
]
