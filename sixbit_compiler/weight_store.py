"""Quantized weights, held once per ``nn.Parameter``.

The store is keyed by Parameter identity, not by module path or graph, so:

* a recompile (new resolution, dynamic shapes) finds the weights already
  quantized and never reads the released bf16 storage again;
* graphs shared by several module instances (regional compile) look weights up
  by the Parameter that arrives at call time, never baking one block's weights
  into a graph;
* two compiled models never share entries (their Parameters differ).

Releasing a weight resizes its storage to 0 bytes; the Parameter keeps its
shape, dtype and device, so Dynamo's guards (metadata only) still hold and no
recompile happens. Any module that owned a released weight gets a forward
pre-hook that raises a clear error if it is ever called eagerly: the bf16 data
is gone (see docs/memory.md).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import weakref

import torch

from .formats import hadamard_rotate, quantize_int8, quantize_nvfp4
from .formats._common import pad_last
from .formats.nvfp4 import NVFP4_BLOCK

log = logging.getLogger("sixbit")


#: the stored weight formats: NVFP4 (the default, 4.5 bits) and per-channel INT8 (8 bits, for
#: the layers a user names in ``int8_weights``, where NVFP4's error costs the most fidelity)
WEIGHT_FORMATS = ("nvfp4", "int8")
#: how NVFP4 weights pick their e4m3 block scales (option ``weight_scales``): "mse" searches a few
#: scales per block for the smallest squared error, "amax" takes the block's amax / 6 as
#: activations do (formats.nvfp4.quantize_nvfp4)
WEIGHT_SCALE_RULES = ("mse", "amax")


@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized linear weight [out_features, in_features], in one of two formats that travel
    through the same three op arguments:

    * ``nvfp4`` (formats.nvfp4): ``packed`` uint8 [N, Kp/2] (two e2m1 codes a byte),
      ``block_scales`` float8_e4m3fn [N, Kp/16], ``tensor_scale`` fp32 scalar;
    * ``int8`` (formats.int8, per output channel): ``packed`` int8 [N, Kp], ``block_scales``
      fp32 [N, 1] (the channel scales), ``tensor_scale`` fp32 1.0 (unused).

    Kp is K rounded up to 16 (to 128 with ``hadamard``) with zero columns in both, so that
    activations pad alike. The op and the kernels tell the formats apart by ``packed``'s dtype
    (int8 for INT8, uint8 for NVFP4).
    """

    packed: torch.Tensor
    block_scales: torch.Tensor
    tensor_scale: torch.Tensor
    in_features: int
    out_features: int
    hadamard: bool
    source_dtype: torch.dtype
    source_nbytes: int
    format: str = "nvfp4"
    scale_rule: str = "mse"  # how NVFP4 block scales were chosen (WEIGHT_SCALE_RULES); unused for INT8

    @property
    def block_scales_bits(self) -> torch.Tensor:
        """The scales in the form the custom op and kernels take: NVFP4's e4m3 block scales as
        raw uint8 bits; INT8's fp32 channel scales as they are."""
        return self.block_scales if self.format == "int8" else self.block_scales.view(torch.uint8)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.block_scales, self.tensor_scale))


def quantize_weight(
    weight: torch.Tensor, hadamard: bool, fmt: str = "nvfp4", scale_rule: str = "mse"
) -> QuantizedWeight:
    """Quantize a [N, K] weight to ``fmt`` (rotated first if ``hadamard``); NVFP4 block scales
    follow ``scale_rule``."""
    if fmt not in WEIGHT_FORMATS:
        raise ValueError(f"sixbit: unknown weight format {fmt!r}; expected one of {WEIGHT_FORMATS}")
    if scale_rule not in WEIGHT_SCALE_RULES:
        raise ValueError(f"sixbit: unknown weight scale rule {scale_rule!r}; expected one of {WEIGHT_SCALE_RULES}")
    with torch.no_grad(), torch.inference_mode(False):
        w = weight.detach()
        src = hadamard_rotate(w) if hadamard else w
        if fmt == "int8":
            packed, scales = quantize_int8(pad_last(src.to(torch.float32), NVFP4_BLOCK), axis=-1)
            tscale = torch.ones((), dtype=torch.float32, device=w.device)
        else:
            packed, scales, tscale = quantize_nvfp4(src, scale_search=scale_rule == "mse")
    return QuantizedWeight(
        packed=packed,
        block_scales=scales,
        tensor_scale=tscale,
        in_features=w.shape[1],
        out_features=w.shape[0],
        hadamard=hadamard,
        source_dtype=w.dtype,
        source_nbytes=w.numel() * w.element_size(),
        format=fmt,
        scale_rule=scale_rule,
    )


class WeightStoreError(RuntimeError):
    pass


class WeightStore:
    """Parameter -> QuantizedWeight, plus which Parameters had their storage released."""

    def __init__(self):
        self._entries: dict[int, tuple[weakref.ref, QuantizedWeight]] = {}
        self._released: set[int] = set()
        self._lock = threading.Lock()

    def _forget(self, key: int) -> None:
        with self._lock:
            self._entries.pop(key, None)
            self._released.discard(key)

    def get(self, param: torch.Tensor) -> QuantizedWeight | None:
        entry = self._entries.get(id(param))
        if entry is None or entry[0]() is not param:
            return None
        return entry[1]

    def is_released(self, param: torch.Tensor) -> bool:
        return id(param) in self._released and self.get(param) is not None

    def quantize(
        self, param: torch.Tensor, hadamard: bool, fmt: str = "nvfp4", scale_rule: str = "mse"
    ) -> QuantizedWeight:
        """The stored quantized form of ``param``, quantizing it on first use."""
        existing = self.get(param)
        if existing is not None:
            checks = [("hadamard", existing.hadamard, hadamard), ("weight format", existing.format, fmt)]
            if fmt == "nvfp4":
                checks.append(("weight_scales", existing.scale_rule, scale_rule))
            for name, had, want in checks:
                if had != want:
                    raise WeightStoreError(
                        f"sixbit: a weight of shape {tuple(param.shape)} was already quantized with "
                        f"{name} {had!r}, and its bf16 storage may be released; it cannot be re-quantized "
                        f"with {name} {want!r}. Compile every use of a model with the same options."
                    )
            return existing
        if param.untyped_storage().nbytes() == 0 and param.numel() > 0:
            raise WeightStoreError("sixbit: a weight's storage is empty and it is not in the weight store")
        qw = quantize_weight(param, hadamard, fmt, scale_rule)
        key = id(param)
        ref = weakref.ref(param, lambda _r, key=key: self._forget(key))
        with self._lock:
            self._entries[key] = (ref, qw)
        return qw

    def discard(self, params) -> None:
        """Forget the quantized form of unreleased ``params`` (a compile that failed)."""
        for p in params:
            if self.get(p) is not None and id(p) not in self._released:
                self._forget(id(p))

    def release(self, params: list[torch.Tensor]) -> int:
        """Free the bf16 storage of quantized ``params``; returns bytes released."""
        freed = 0
        new = [p for p in params if self.get(p) is not None and id(p) not in self._released]
        for p in new:
            storage = p.untyped_storage()
            freed += storage.nbytes()
            storage.resize_(0)
            self._released.add(id(p))
        if new:
            _guard_owner_modules(new)
        return freed


STORE = WeightStore()


def _released_weight_hook(module: torch.nn.Module, args):
    if torch.compiler.is_compiling():
        return
    for name, p in module._parameters.items():
        if p is not None and STORE.is_released(p):
            raise RuntimeError(
                f"sixbit: {type(module).__name__}.{name} was quantized to NVFP4 when this model was compiled "
                "with backend='sixbit', and its bf16 storage was released. Call the compiled model instead, "
                "or reload the original weights (from_pretrained / load_state_dict; see docs/memory.md). "
                "Compile with options={'free_weights': False} to keep them."
            )


def _guard_owner_modules(params: list[torch.Tensor]) -> None:
    """Give every module that owns a released weight a pre-hook that raises on eager use.

    Dynamo passes Parameters, not modules, to the backend, so the owners are found by
    one scan of the live objects. Hooks added after compile do not cause recompiles
    (Dynamo skips nn.Module hook guards), and the hook does nothing while compiling.
    """
    wanted = {id(p) for p in params}
    for obj in gc.get_objects():
        # type() rather than isinstance(): some lazy module objects warn when probed.
        if issubclass(type(obj), torch.nn.Module) and not getattr(obj, "_sixbit_guarded", False):
            if any(p is not None and id(p) in wanted for p in obj._parameters.values()):
                obj.register_forward_pre_hook(_released_weight_hook)
                obj._sixbit_guarded = True
