"""Typed options of the sixbit backend.

``torch.compile(model, backend="sixbit", options={...})`` hands the dict to
:func:`SixbitOptions.from_dict`, which rejects unknown keys and bad values with an
error that names the key. ``docs/options.md`` documents every field.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping

import torch

from .formats import Precision
from .weight_store import WEIGHT_SCALE_RULES

log = logging.getLogger("sixbit")

DUMP_DIR_ENV = "SIXBIT_DUMP_DIR"
LOWERINGS = ("auto", "eager", "inductor")
CACHE_DTYPES = ("activation", "int8", "fp8")
CACHE_LOCATIONS = ("auto", "device", "host")
ATTENTIONS = ("exact", "int8")
WEIGHT_SCALES = WEIGHT_SCALE_RULES  # the weight store's rules, named by the option


#: Named presets: the method's knobs at three points of the speed / fidelity trade-off.
#: docs/options.md gives the fidelity and skip rate each reached, and on which model.
PRESETS: dict[str, dict[str, Any]] = {
    # self-attention's q and k as 8-bit weights: on the reference model they carry most of what
    # NVFP4 weights cost (28.9 -> 30.3 dB, docs/benchmarks.md); Wan and CogVideoX name them so
    "quality": {"activation": "auto", "dmpq_budget": 0.05, "block_cache": False,
                "int8_weights": ("*.attn1.to_q", "*.attn1.to_k")},
    # INT8 attention: 42.4 dB on its own on the reference model, ~8 % off a W-14B call (H100)
    "balanced": {"activation": "auto", "dmpq_budget": 0.07, "block_cache": True, "cache_threshold": 0.1,
                 "cache_tau": 0.15, "cache_max_skips": 1, "cache_first_steps": 2, "cache_last_steps": 1,
                 "attention": "int8"},
    "fast": {"activation": "auto", "dmpq_budget": 0.1, "block_cache": True, "cache_threshold": 0.15,
             "cache_tau": 0.3, "cache_max_skips": 2, "cache_first_steps": 1, "cache_last_steps": 1,
             "attention": "int8"},
}


class SixbitOptionError(ValueError):
    """A bad key or value in ``options=``; the message names the key."""


@dataclasses.dataclass(frozen=True)
class SixbitOptions:
    #: Where to dump each compile (graph per pass, index page). ``SIXBIT_DUMP_DIR``
    #: sets it when the option is absent. ``None`` disables dumps.
    dump_dir: str | None = None
    #: A named preset ("quality", "balanced", "fast"; see PRESETS and docs/options.md) that
    #: sets the method's options; any option given explicitly overrides the preset's value.
    preset: str | None = None
    #: Activation precision of the quantized linears: "dynamic" (DMPQ: per layer and per
    #: call, NVFP4 when the calibrated predictor α·Γ_{t−1} + β stays within ``dmpq_budget``,
    #: else INT8), one fixed precision for all ("nvfp4", "int8", "fp8" or "bf16"), or "auto"
    #: (the default): "dynamic" where NVFP4 pays (GPUs with FP4 tensor cores, sm_100+; and
    #: on CPU, where sixbit emulates the method), "int8" on other GPUs such as the H100, where
    #: emulated NVFP4 is both slower and less accurate than INT8 (one log line says so).
    activation: str = "auto"
    #: DMPQ's error budget: a layer runs NVFP4 activations when its predicted relative
    #: output error (E_rel) is at most this, else INT8. None: the calibration's default.
    dmpq_budget: float | None = None
    #: A calibration file (written by ``sixbit calibrate``) with the predictor's α, β per
    #: layer kind / layer. None: the shipped default (docs/calibration.md).
    calibration: str | None = None
    #: Glob patterns over module paths (e.g. "blocks.*.ffn.*"). When given, only
    #: matching linear layers are quantized, inside transformer blocks or not.
    #: When empty, every linear layer inside a transformer block is a candidate.
    include: tuple[str, ...] = ()
    #: Glob patterns over module paths that are never quantized.
    exclude: tuple[str, ...] = ()
    #: Glob patterns over module paths whose weights are stored as per-channel INT8
    #: (8 bits) instead of NVFP4 (4.5 bits): the fidelity lever that costs less memory than
    #: ``exclude``. E.g. ("*.attn1.to_q", "*.attn1.to_k"): docs/options.md.
    int8_weights: tuple[str, ...] = ()
    #: How NVFP4 weights choose their e4m3 block scales, once, at compile time: "mse" (the
    #: default) tries eight scales around amax / 6 per block of 16 and keeps the one with the
    #: smallest squared error; "amax" takes amax / 6 as activations (and the paper) do. Both
    #: store ordinary NVFP4: kernels, memory and speed are the same. docs/numerics.md.
    weight_scales: str = "mse"
    #: Attention inside transformer blocks: "exact" (the model's own SDPA, untouched) or "int8"
    #: (``quantize_attention``: Q·Kᵀ in INT8 with K smoothed, P·V in FP8 e4m3, softmax in fp32;
    #: the SageAttention recipe, formats/attention.py). Calls with a mask other than a boolean
    #: key-padding one, dropout, causality, a head dim the kernels do not take, or a short
    #: cross-attention stay exact. docs/options.md has its speed and fidelity.
    attention: str = "exact"
    #: Rotate activations and weights by a 128-block Hadamard before quantizing.
    hadamard: bool = False
    #: Switch passes on or off by name, e.g. {"quantize_linears": False}.
    passes: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    #: Release the bf16 storage of quantized weights after compile (the memory win).
    #: False keeps them, e.g. to run the original module eagerly for comparisons.
    free_weights: bool = True
    #: What runs the transformed graph: "inductor" (torch._inductor.compile_fx),
    #: "eager" (the graph's Python code, op by op: quick to compile, easy to debug),
    #: or "auto": Inductor when the graph runs on a GPU, eager on CPU.
    lowering: str = "auto"
    #: Lower fuse_regions' prologue / epilogue chains to generated Triton kernels
    #: (codegen/pointwise.py). Experimental and off until measured on the GPU; it needs
    #: CUDA (or Triton's interpreter), else the regions stay unfused with one log line.
    codegen: bool = False
    #: Run each transformer block as a region the runtime can skip by reusing its cached
    #: residual (the temporal delta cache's mechanism). Experimental: the graph outside
    #: the blocks then runs eagerly and each block body is lowered on its own.
    block_cache: bool = False
    #: How cached residuals are stored: "int8" or "fp8" (e4m3), both with one fp32 scale
    #: per token, or "activation" (the activation dtype, no rounding). INT8 is the default:
    #: at the same bytes it was 4-5x more accurate than FP8 (docs/benchmarks.md).
    cache_dtype: str = "int8"
    #: Where cached residuals live: "device", "host" (pinned host memory; each entry is
    #: copied back on a side stream, overlapped with compute: see delta_store.py) or "auto":
    #: host when the graph runs on a GPU, device on CPU. docs/memory.md has the numbers.
    cache_location: str = "auto"
    #: Who decides the skips with block_cache: "tdc" (sixbit_compiler/policy.py) or "none"
    #: (only forced schedules from set_skip_schedule). The cache_* numbers are TDC's.
    cache_policy: str = "tdc"
    cache_threshold: float = 0.1  # skip only if the residual change is under this
    cache_tau: float = 0.2  # bound on the accumulated error estimate of consecutive skips
    cache_max_skips: int = 2  # N_max: consecutive skips of one block
    cache_first_steps: int = 1  # always computed at the start of a generation
    cache_last_steps: int = 1  # always computed at the end (once the step count is known)
    #: Name of the graph input holding the diffusion timestep (used to track the
    #: denoising step and new generations). None: found by name ("timestep", "t").
    timestep_input: str | None = None

    @classmethod
    def from_dict(cls, options: Mapping[str, Any] | None) -> "SixbitOptions":
        options = dict(options or {})
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise SixbitOptionError(
                f"sixbit: unknown option(s) {', '.join(map(repr, unknown))}; valid options: {', '.join(sorted(known))}"
            )
        preset = options.get("preset")
        if preset is not None:
            if preset not in PRESETS:
                raise SixbitOptionError(f"sixbit: option 'preset': must be one of {sorted(PRESETS)} (got {preset!r})")
            options = {**PRESETS[preset], **options}  # explicit options override the preset
        if options.get("dump_dir") is None and os.environ.get(DUMP_DIR_ENV):
            options["dump_dir"] = os.environ[DUMP_DIR_ENV]
        for key in ("include", "exclude", "int8_weights"):
            if key in options:
                options[key] = _as_patterns(key, options[key])
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        def bad(key: str, why: str) -> SixbitOptionError:
            return SixbitOptionError(f"sixbit: option {key!r}: {why} (got {getattr(self, key)!r})")

        if self.dump_dir is not None and not isinstance(self.dump_dir, (str, os.PathLike)):
            raise bad("dump_dir", "must be a path string or None")
        if not isinstance(self.activation, str):
            raise bad("activation", "must be a string")
        if self.activation not in ("dynamic", "auto"):
            try:
                Precision.parse(self.activation)
            except ValueError:
                raise bad("activation", "must be one of 'auto', 'dynamic', 'nvfp4', 'int8', 'fp8', 'bf16'") from None
        if self.dmpq_budget is not None and (
            isinstance(self.dmpq_budget, bool) or not isinstance(self.dmpq_budget, (int, float)) or self.dmpq_budget < 0
        ):
            raise bad("dmpq_budget", "must be a number >= 0 or None")
        if self.calibration is not None:
            if not isinstance(self.calibration, (str, os.PathLike)):
                raise bad("calibration", "must be a path to a calibration file or None")
            if not os.path.isfile(self.calibration):
                raise bad("calibration", "no such file")
            from .calibration import Calibration  # late import: light module, no torch needed

            try:
                Calibration.load(self.calibration)
            except (OSError, ValueError) as exc:
                raise bad("calibration", f"not a readable calibration file: {exc}") from None
        for key in ("hadamard", "free_weights", "block_cache", "codegen"):
            if not isinstance(getattr(self, key), bool):
                raise bad(key, "must be a bool")
        if not isinstance(self.passes, Mapping) or not all(
            isinstance(k, str) and isinstance(v, bool) for k, v in self.passes.items()
        ):
            raise bad("passes", "must map pass names to bools, e.g. {'quantize_linears': False}")
        from .passes import PASS_REGISTRY  # late import: passes import options

        unknown = sorted(set(self.passes) - set(PASS_REGISTRY))
        if unknown:
            raise bad("passes", f"unknown pass name(s) {unknown}; passes are {list(PASS_REGISTRY)}")
        if self.cache_policy not in ("tdc", "none"):
            raise bad("cache_policy", "must be 'tdc' or 'none'")
        for key in ("cache_threshold", "cache_tau"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(key, "must be a number >= 0")
        for key in ("cache_max_skips", "cache_first_steps", "cache_last_steps"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(key, "must be an integer >= 0")
        if self.cache_dtype not in CACHE_DTYPES:
            raise bad("cache_dtype", f"must be one of {CACHE_DTYPES}")
        if self.cache_location not in CACHE_LOCATIONS:
            raise bad("cache_location", f"must be one of {CACHE_LOCATIONS}")
        if self.attention not in ATTENTIONS:
            raise bad("attention", f"must be one of {ATTENTIONS}")
        if self.weight_scales not in WEIGHT_SCALES:
            raise bad("weight_scales", f"must be one of {WEIGHT_SCALES}")
        if self.lowering not in LOWERINGS:
            raise bad("lowering", f"must be one of {LOWERINGS}")
        if self.timestep_input is not None and not isinstance(self.timestep_input, str):
            raise bad("timestep_input", "must be a graph input name or None")

    def for_device(self, device: torch.device | None) -> "SixbitOptions":
        """These options with the "auto" choices resolved for the device the graph runs on."""
        if self.cache_location == "auto":
            on_gpu = device is not None and device.type == "cuda"
            return dataclasses.replace(self, cache_location="host" if on_gpu else "device").for_device(device)
        if self.activation != "auto":
            return self
        if device is None or device.type != "cuda" or native_fp4(device):
            return dataclasses.replace(self, activation="dynamic")
        name = torch.cuda.get_device_name(device)
        major, minor = torch.cuda.get_device_capability(device)
        log.info("sixbit: activation='auto' runs INT8 on %s (sm_%d%d): without FP4 tensor cores NVFP4 "
                 "activations are slower and less accurate than INT8; activation='dynamic' runs DMPQ anyway",
                 name, major, minor)
        return dataclasses.replace(self, activation="int8")

    @property
    def dynamic(self) -> bool:
        return self.activation == "dynamic"

    @property
    def precision(self) -> Precision:
        """The fixed precision, or DMPQ's safe one (INT8) where it has no prediction."""
        return Precision.INT8 if self.activation in ("dynamic", "auto") else Precision.parse(self.activation)

    @property
    def measures_blocks(self) -> bool:
        """Whether the compiled model measures block statistics (DMPQ or the block cache)."""
        return self.dynamic or self.block_cache

    @property
    def quantizes_attention(self) -> bool:
        return self.attention == "int8"

    def pass_enabled(self, name: str) -> bool:
        """``passes[name]`` if given, else the pass's default: on, unless it is opt-in
        (``pass_fn.opt_in = True``: measured no faster, kept for users to try)."""
        from .passes import PASS_REGISTRY  # late import: passes import options

        return self.passes.get(name, not getattr(PASS_REGISTRY.get(name), "opt_in", False))


def native_fp4(device: torch.device) -> bool:
    """Whether the GPU has FP4 tensor cores (Blackwell, compute capability 10.0 and up)."""
    return torch.cuda.get_device_capability(device) >= (10, 0)


def _as_patterns(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise SixbitOptionError(f"sixbit: option {key!r}: must be a glob string or a list of them (got {value!r})")
