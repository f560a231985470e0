"""DMPQ's predictor: E_rel ≈ α·Γ_{t−1} + β, its calibration file, and fitting it.

* **Γ_{t−1}**: the block's input-output difference ‖Y − X‖₁ / ‖X‖₁ at the previous call of
  the same CFG branch (``precision_guards`` measures it in the compiled graph).
* **E_rel**: a linear layer's relative output error with NVFP4 activations,
  ‖Q(x)·Ŵ − x·Ŵ‖₂ / ‖x·Ŵ‖₂, Ŵ the stored (dequantized NVFP4) weight.

A :class:`Calibration` holds least-squares fits of E_rel on Γ_{t−1} per *layer kind* (the
layer's path inside its block, e.g. ``attn1.to_q``: one fit pooled over all blocks), per
layer, and over everything. ``mode`` says which the runtime uses: the one with the lower
error on held-out generations when it was fitted (see :mod:`.calibrate`). A layer the file
does not know falls back to its kind, then to the overall fit, so one file serves any model
whose blocks name their layers alike.

The shipped default (``sixbit_compiler/data/default_calibration.json``) and how it was made
are described in docs/calibration.md.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Sequence

DEFAULT_CALIBRATION = os.path.join(os.path.dirname(__file__), "data", "default_calibration.json")
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Fit:
    alpha: float
    beta: float
    r: float  # Pearson correlation of E_rel with Γ_{t−1} (NaN if undefined)
    n: int  # samples

    def predict(self, gamma: float) -> float:
        return self.alpha * gamma + self.beta

    @classmethod
    def least_squares(cls, gammas: Sequence[float], errors: Sequence[float]) -> "Fit":
        n = len(gammas)
        if n == 0:
            return cls(0.0, math.nan, math.nan, 0)
        mg, me = sum(gammas) / n, sum(errors) / n
        sgg = sum((g - mg) ** 2 for g in gammas)
        see = sum((e - me) ** 2 for e in errors)
        sge = sum((g - mg) * (e - me) for g, e in zip(gammas, errors))
        # spreads at rounding level are no spread (a constant series sums to ~1e-33, not 0)
        sgg = sgg if sgg > 1e-12 * n * (mg * mg + 1e-30) else 0.0
        see = see if see > 1e-12 * n * (me * me + 1e-30) else 0.0
        alpha = sge / sgg if sgg > 0 else 0.0
        r = sge / math.sqrt(sgg * see) if sgg > 0 and see > 0 else math.nan
        return cls(alpha, me - alpha * mg, r, n)


def layer_kind(layer: str, block: str | None) -> str:
    """The layer's path inside its block ("blocks.3.attn1.to_q" in "blocks.3" -> "attn1.to_q")."""
    if block and layer.startswith(block + "."):
        return layer[len(block) + 1 :]
    return layer


@dataclasses.dataclass
class Calibration:
    kinds: dict[str, Fit]
    layers: dict[str, Fit]
    overall: Fit
    mode: str = "kind"  # "kind" | "layer": which fits the runtime uses first
    default_budget: float = 0.12  # the error budget used when options give none
    source: str = ""  # what it was fitted on
    held_out: dict = dataclasses.field(default_factory=dict)  # held-out RMSE of each mode

    def fit_for(self, layer: str, block: str | None) -> Fit:
        kind = self.kinds.get(layer_kind(layer, block))
        own = self.layers.get(layer)
        first, second = (own, kind) if self.mode == "layer" else (kind, own)
        for fit in (first, second, self.overall):
            if fit is not None and fit.n > 0 and math.isfinite(fit.beta):
                return fit
        return Fit(0.0, math.inf, math.nan, 0)  # nothing known: always INT8

    def coefficients(self, layers: Sequence[str], blocks: Sequence[str | None]) -> tuple[list[float], list[float]]:
        fits = [self.fit_for(layer, block) for layer, block in zip(layers, blocks)]
        return [f.alpha for f in fits], [f.beta for f in fits]

    # ---- file format ---------------------------------------------------------------
    def to_json(self) -> dict:
        def fits(d):
            return {k: dataclasses.asdict(v) for k, v in sorted(d.items())}

        return {
            "format": "sixbit-calibration", "version": FORMAT_VERSION, "mode": self.mode,
            "default_budget": self.default_budget, "source": self.source, "held_out": self.held_out,
            "overall": dataclasses.asdict(self.overall), "kinds": fits(self.kinds), "layers": fits(self.layers),
        }

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            json.dump(self.to_json(), f, indent=1, allow_nan=True)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        if data.get("format") != "sixbit-calibration" or data.get("version") != FORMAT_VERSION:
            raise ValueError(f"not a sixbit calibration file of version {FORMAT_VERSION}")
        if data["mode"] not in ("kind", "layer"):
            raise ValueError(f"calibration mode must be 'kind' or 'layer', got {data['mode']!r}")

        def fits(d):
            return {k: Fit(**v) for k, v in d.items()}

        return cls(fits(data["kinds"]), fits(data["layers"]), Fit(**data["overall"]), data["mode"],
                   float(data["default_budget"]), data.get("source", ""), data.get("held_out", {}))

    @classmethod
    def load(cls, path: str | None = None) -> "Calibration":
        """The calibration in ``path``, or the shipped default."""
        with open(path or DEFAULT_CALIBRATION) as f:
            try:
                return cls.from_json(json.load(f))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"sixbit: {path or DEFAULT_CALIBRATION}: {exc}") from None

    def table(self) -> str:
        """Per-kind (and overall) fits as a Markdown table."""
        rows = ["| layer kind | α | β | Pearson r | samples |", "| --- | ---: | ---: | ---: | ---: |"]
        for name, f in sorted(self.kinds.items()):
            rows.append(f"| {name} | {f.alpha:.4f} | {f.beta:.4f} | {f.r:.3f} | {f.n} |")
        f = self.overall
        rows.append(f"| (all layers) | {f.alpha:.4f} | {f.beta:.4f} | {f.r:.3f} | {f.n} |")
        return "\n".join(rows)
