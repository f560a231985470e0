"""Calibrating DMPQ's predictor: ``sixbit calibrate`` and :func:`calibrate`.

The model runs real sampling loops (the caller's, over its calibration inputs: prompt
embeddings and seeds), compiled by sixbit with INT8 activations (the trajectory DMPQ falls
back to) and eager lowering. At every call:

* ``precision_guards`` measures each block's Γ = ‖Y − X‖₁ / ‖X‖₁;
* every quantized linear also computes, on the side, its output with NVFP4 activations and
  with unquantized activations (the same stored weights), giving
  E_rel = ‖Q(x)·Ŵ − x·Ŵ‖₂ / ‖x·Ŵ‖₂.

Each (layer, call) with a previous call of the same generation and CFG branch gives one
sample (Γ_{t−1} of the layer's block, E_rel). Least squares fits α, β per layer kind, per
layer and overall; the Pearson r of each is reported. Which the runtime uses ("kind" or
"layer") is chosen by the error on held-out generations: fitted on the even-numbered
generations, scored on the odd ones.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Callable, Iterable

import torch

from .calibration import Calibration, Fit, layer_kind
from .formats import Precision


@dataclasses.dataclass
class Samples:
    """Calibration samples: per layer, (generation, Γ_{t−1}, E_rel) triples."""

    layers: dict[str, list[tuple[int, float, float]]]
    blocks: dict[str, str | None]  # layer -> its block

    def kind_of(self, layer: str) -> str:
        return layer_kind(layer, self.blocks.get(layer))


def _e_rel(x, w_packed, w_block_scales, w_tensor_scale, in_features, hadamard) -> torch.Tensor:
    from .formats import Precision
    from .reference import quantized_linear_reference, reference_scales

    scales = reference_scales(w_packed, w_block_scales)
    exact = quantized_linear_reference(x, w_packed, scales, w_tensor_scale, None, Precision.BF16, in_features, hadamard)
    fp4 = quantized_linear_reference(x, w_packed, scales, w_tensor_scale, None, Precision.NVFP4, in_features, hadamard)
    return (fp4.float() - exact.float()).norm() / exact.float().norm().clamp_min(1e-30)


def collect(model: torch.nn.Module, run: Callable[[torch.nn.Module, Any], None], items: Iterable[Any],
            options: dict | None = None) -> Samples:
    """Run ``run(compiled, item)`` (one generation per item) on a sixbit-compiled deep copy of
    ``model`` and gather the (Γ_{t−1}, E_rel) samples. ``model`` itself is left untouched."""
    from . import ops
    from .runtime import runtime_of
    from .weight_store import STORE

    if any(STORE.is_released(p) for p in model.parameters()):
        raise ValueError("sixbit calibrate: this model's weights were released by an earlier compile; "
                         "calibrate a freshly loaded model (calibration compiles a copy of it)")
    work = copy.deepcopy(model)
    # "dynamic" so that precision_guards measures Γ; the trajectory is then pinned to INT8
    # (set_activation below; the first call has no Γ and runs INT8 anyway).
    opts = {"lowering": "eager", "free_weights": False, **(options or {}), "activation": "dynamic",
            "block_cache": False}
    compiled = torch.compile(work, backend="sixbit", options=opts)
    errors: list[tuple[Any, int, torch.Tensor]] = []  # (call record, slot, E_rel on the device)
    rt_box: list = []
    samples: dict[str, list[tuple[int, float, float]]] = {}

    def recorder(slot, *weights):
        if not rt_box:
            rt_box.append(runtime_of(work))
            rt_box[0].forced = Precision.INT8
        errors.append((rt_box[0].records[-1], slot, _e_rel(*weights)))

    ops.CALIBRATION_RECORDER = recorder
    try:
        with torch.no_grad():
            for item in items:
                run(compiled, item)
                rt = runtime_of(work)
                rt.flush_block_stats()
                _take_samples(rt, errors, samples)
                errors.clear()
                rt.reset()
    finally:
        ops.CALIBRATION_RECORDER = None
    rt = runtime_of(work)
    return Samples(samples, dict(zip(rt.slot_names, rt.slot_blocks)))


def _take_samples(rt, errors, samples) -> None:
    """Pair each E_rel of one generation with Γ_{t−1} of the layer's block (same branch)."""
    values = torch.stack([e for _, _, e in errors]).tolist() if errors else []
    block_index = {name: i for i, name in enumerate(rt.block_names)}
    previous: dict[int, Any] = {}  # id(call record) -> the previous record of its generation and branch
    last: dict[tuple[int, int], Any] = {}
    for r in rt.records:
        key = (r.generation, r.branch)
        if key in last:
            previous[id(r)] = last[key]
        last[key] = r
    for (record, slot, _), e in zip(errors, values):
        prev = previous.get(id(record))
        block = block_index.get(rt.slot_blocks[slot])
        if prev is None or block is None:
            continue
        gamma = prev.block_stats.get(block, (math.nan,))[0]
        if math.isfinite(gamma) and math.isfinite(e):
            samples.setdefault(rt.slot_names[slot], []).append((record.generation, gamma, e))


def fit(samples: Samples, default_budget: float | None = None, source: str = "") -> Calibration:
    """Fit α, β per kind / layer / overall; pick the mode by held-out error (module docstring)."""

    def fits(select) -> tuple[dict[str, Fit], dict[str, Fit], Fit]:
        by_kind: dict[str, list] = {}
        layers, pooled = {}, []
        for layer, rows in samples.layers.items():
            rows = [r for r in rows if select(r[0])]
            layers[layer] = Fit.least_squares([g for _, g, _ in rows], [e for _, _, e in rows])
            by_kind.setdefault(samples.kind_of(layer), []).extend(rows)
            pooled.extend(rows)
        kinds = {k: Fit.least_squares([g for _, g, _ in rows], [e for _, _, e in rows]) for k, rows in by_kind.items()}
        return kinds, layers, Fit.least_squares([g for _, g, _ in pooled], [e for _, _, e in pooled])

    def held_out_rmse(mode: str) -> float:
        kinds, layers, overall = fits(lambda gen: gen % 2 == 0)
        cal = Calibration(kinds, layers, overall, mode)
        sq = [(cal.fit_for(layer, samples.blocks.get(layer)).predict(g) - e) ** 2
              for layer, rows in samples.layers.items() for gen, g, e in rows if gen % 2 == 1]
        sq = [v for v in sq if math.isfinite(v)]
        return math.sqrt(sum(sq) / len(sq)) if sq else math.nan

    held_out = {"kind": held_out_rmse("kind"), "layer": held_out_rmse("layer")}
    mode = "layer" if held_out["layer"] < held_out["kind"] else "kind"
    kinds, layers, overall = fits(lambda gen: True)
    all_errors = sorted(e for rows in samples.layers.values() for _, _, e in rows)
    if default_budget is None:  # the median E_rel: about half the layer-calls may run NVFP4
        default_budget = all_errors[len(all_errors) // 2] if all_errors else 0.12
    return Calibration(kinds, layers, overall, mode, float(default_budget), source, held_out)


def calibrate(model: torch.nn.Module, run: Callable[[torch.nn.Module, Any], None], items: Iterable[Any], *,
              out: str | None = None, plot: str | None = None, options: dict | None = None,
              default_budget: float | None = None, source: str = "") -> Calibration:
    """Calibrate DMPQ's predictor on ``model`` (module docstring). ``run(compiled, item)`` runs one
    generation (a full sampling loop with CFG) for one calibration input. Writes the calibration
    file to ``out`` and the scatter plot to ``plot`` when given; ``options={"calibration": out}``
    then loads it."""
    samples = collect(model, run, items, options)
    cal = fit(samples, default_budget, source)
    if out:
        cal.save(out)
    if plot:
        scatter_png(samples, cal, plot)
    return cal


def scatter_png(samples: Samples, cal: Calibration, path: str, size: int = 200) -> None:
    """One scatter panel per layer kind: Γ_{t−1} (x) against E_rel (y), with the fitted line."""
    from PIL import Image, ImageDraw

    kinds: dict[str, list[tuple[float, float]]] = {}
    for layer, rows in samples.layers.items():
        kinds.setdefault(samples.kind_of(layer), []).extend((g, e) for _, g, e in rows)
    names = sorted(kinds)
    cols = min(4, max(len(names), 1))
    rows_n = max(1, math.ceil(len(names) / cols))
    pad = 28
    img = Image.new("RGB", (cols * size, rows_n * size), "white")
    draw = ImageDraw.Draw(img)
    for i, name in enumerate(names):
        ox, oy = (i % cols) * size, (i // cols) * size
        pts = kinds[name]
        gx = [g for g, _ in pts] or [0.0]
        ey = [e for _, e in pts] or [0.0]
        x0, x1 = min(gx), max(gx) if max(gx) > min(gx) else min(gx) + 1
        y0, y1 = min(ey), max(ey) if max(ey) > min(ey) else min(ey) + 1

        def xy(g, e):
            return (ox + pad + (g - x0) / (x1 - x0) * (size - 2 * pad),
                    oy + size - pad - (e - y0) / (y1 - y0) * (size - 2 * pad))

        draw.rectangle([ox + pad, oy + pad, ox + size - pad, oy + size - pad], outline="gray")
        for g, e in pts:
            x, y = xy(g, e)
            draw.point((x, y), fill="blue")
        f = cal.kinds.get(name)
        if f is not None and f.n > 1:
            draw.line([xy(x0, f.predict(x0)), xy(x1, f.predict(x1))], fill="red", width=1)
        draw.text((ox + 4, oy + 4), f"{name}  r={f.r:.2f}" if f else name, fill="black")
        draw.text((ox + pad, oy + size - pad + 4), f"G {x0:.3g}..{x1:.3g}  E {y0:.3g}..{y1:.3g}", fill="gray")
    img.save(path)
