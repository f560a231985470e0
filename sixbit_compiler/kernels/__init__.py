"""Triton kernels for the quantized linear (Hopper first; any CUDA GPU Triton supports).

* ``quantize``: activation quantization, one read of the activation: per-token INT8
  (plus the per-row max|x| and sum|x| that give PDR's outlier ratio) and NVFP4.
* ``weights``: decode the stored NVFP4 weight per call into the GEMM's operand (INT8 per
  channel, or exact bf16 block values). One layer's operand lives for one call only, so
  the resident copy stays NVFP4.
* ``gemm``: one scaled-GEMM template for INT8 (int32 accumulation) and bf16/fp16
  operands (fp32 accumulation), epilogue fused: per-row x per-column scales, bias, cast.
* ``dispatch``: what ``sixbit::quantized_linear`` runs on CUDA.

Every kernel has its pure-PyTorch spec in ``sixbit_compiler.formats`` /
``sixbit_compiler.reference``; tests run the kernels on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import logging
import os


_fallbacks_logged: set[tuple[str, str]] = set()


def log_fallback_once(what: str, reason: str) -> None:
    """One warning per (what runs instead, reason) for the life of the process."""
    if (what, reason) not in _fallbacks_logged:
        _fallbacks_logged.add((what, reason))
        logging.getLogger("sixbit").warning("sixbit: %s for %s", what, reason)


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def cache_kernels_take(t) -> bool:
    """Whether the block-cache kernels (``cache.py``) take this activation: CUDA, a float
    dtype, and a row that fits one program. Shared by the Γ op and the runtime's cache."""
    import torch

    return t.is_cuda and t.dtype in (torch.bfloat16, torch.float16, torch.float32) and 0 < t.shape[-1] <= 16384
