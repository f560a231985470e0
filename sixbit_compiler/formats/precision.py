"""The activation precisions a quantized linear can run at."""

from __future__ import annotations

import enum


class Precision(enum.IntEnum):
    """Activation precision of one quantized-linear call.

    The integer values are what the runtime writes into the precision-slot tensor
    read by ``sixbit::quantized_linear``; they are part of the op's contract.
    """

    BF16 = 0  # activations unquantized; weights dequantized from NVFP4
    INT8 = 1  # per-token INT8 activations x per-channel INT8 weights (from NVFP4)
    NVFP4 = 2  # NVFP4 activations x NVFP4 weights
    FP8 = 3  # per-token FP8 e4m3 activations x per-channel FP8 weights (from NVFP4)

    @property
    def bits(self) -> float:
        """Average stored bits per activation value, scales included."""
        return {Precision.BF16: 16.0, Precision.INT8: 8.0, Precision.NVFP4: 4.5, Precision.FP8: 8.0}[self]

    @classmethod
    def parse(cls, name: str) -> "Precision":
        try:
            return cls[name.upper()]
        except KeyError:
            valid = ", ".join(p.name.lower() for p in cls)
            raise ValueError(f"unknown precision {name!r}; expected one of: {valid}") from None
