"""sixbit: a torch.compile backend for video diffusion transformers.

``torch.compile(pipe.transformer, backend="sixbit", options={...})`` quantizes the
linear layers inside the transformer blocks to NVFP4 weights with NVFP4 or INT8
activations (the 6Bit-Diffusion method). See README.md and docs/.
"""

from .formats import Precision
from .options import SixbitOptionError, SixbitOptions

__version__ = "0.1.0"


def __getattr__(name):  # keep `import sixbit_compiler` light; torch.fx machinery loads on use
    if name in ("stats", "memory_report", "reset", "runtime_of", "set_activation", "set_skip_schedule", "evenly_spaced_skips"):
        from . import runtime

        return getattr(runtime, name)
    if name == "sixbit_backend":
        from .backend import sixbit_backend

        return sixbit_backend
    raise AttributeError(f"module 'sixbit_compiler' has no attribute {name!r}")


__all__ = [
    "Precision",
    "SixbitOptionError",
    "SixbitOptions",
    "memory_report",
    "reset",
    "runtime_of",
    "set_activation",
    "set_skip_schedule",
    "evenly_spaced_skips",
    "sixbit_backend",
    "stats",
]
