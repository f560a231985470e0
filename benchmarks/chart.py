"""Speed-up against fidelity, one point per mode: docs/benchmarks_chart.png.

Reads the end-to-end results in benchmarks/results/ and draws one panel per workload:

* W-1.3B and W-14B (H100) and C-2B (H200), 50 steps (W-1.3B also a 10-step run with INT8
  attention, the presets and torchao, W-14B a 10-step run of the configuration that meets the
  end-to-end targets, each labelled "(10)"): speed-up of the sampling loop over bf16
  eager in the same command (W-14B: the same card model, two commands; Inductor from a 10-step
  command with its own baseline) (x: PSNR of the output against bf16, random weights);
* REF (H100, 20 steps, the trained reference model, where fidelity means something): the
  skip rate (the speed lever the policy controls) against PSNR, per preset and per diffusers
  FirstBlockCache threshold.

    python benchmarks/chart.py [--out docs/benchmarks_chart.png]

PIL only (no plotting library is a dependency).
"""

from __future__ import annotations

import argparse
import json
import math
import os

from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
PSNR_MAX = 60.0  # bf16 itself (infinite PSNR) is drawn at the right edge


def _load(name):
    with open(os.path.join(RESULTS, name)) as f:
        return json.load(f)


def _speed_points(runs, suffix=""):
    """(label, psnr, speed-up) per mode; each run's modes against its own bf16 baseline."""
    points = []
    for run in runs:
        modes = run["modes"]
        base = modes.get("bf16_eager", {}).get("loop_s")
        for mode, m in modes.items():
            if base is None or "loop_s" not in m:
                continue
            psnr = m.get("fidelity_vs_bf16", {}).get("psnr_db")
            if psnr is None or (isinstance(psnr, float) and math.isnan(psnr)):
                label, psnr = f"{mode} (NaN output)", 0.0
            else:
                label = mode
            points.append((label + suffix, min(float(psnr), PSNR_MAX), base / m["loop_s"]))
    return points


#: the W-14B targets' configuration names its INT8 k layers by a glob list too long for a label
_FIRST_HALF_K = 'int8_weights=["blocks.?.attn1.to_k","blocks.1?.attn1.to_k"]'


def panels():
    c2b = _load("e2e_c2b_h200_50steps.json")
    w14_10 = [(label.replace(_FIRST_HALF_K, "int8 k, first half"), psnr, speed)
              for label, psnr, speed in _speed_points([_load("e2e_w14b_h100_10steps_final.json")], " (10)")]
    w14 = [_load("e2e_w14b_h100_50steps.json"), _load("e2e_w14b_h100_inductor_10steps.json")]
    w13 = [_load("method_w13b_h100_50steps.json"), _load("peers_w13b_h100_50steps.json")]
    w13_10 = _load("e2e_w13b_h100_10steps_attention.json")  # INT8 attention, presets, torchao; 10 steps
    ref = _load("ref_presets_h100.json")
    fbc = _load("ref_fbc_h100.json")
    ref_points = []
    for source, fbc_modes in ((ref, False), (fbc, True)):  # FBC rows: from the run that counted its skips
        modes = source.get("modes", source)
        for mode, m in modes.items():
            if isinstance(m, dict) and "fidelity" in m and mode.startswith("fbc") == fbc_modes:
                ref_points.append((mode, min(m["fidelity"]["psnr_db"], PSNR_MAX), m.get("skip_rate", 0.0)))
    return [
        ("W-1.3B, H100, 50 steps; '(10)': 10 steps (random weights)", "speed-up vs bf16 eager",
         _speed_points(w13) + _speed_points([w13_10, w13_10["torchao_fp8_command"]], " (10)")),
        ("W-14B, H100, 50 steps; '(10)': 10 steps (random weights)", "speed-up vs bf16 eager",
         _speed_points(w14) + w14_10),
        ("C-2B, H200, 50 steps (random weights)", "speed-up vs bf16 eager", _speed_points([c2b["run1"], c2b["run2"]])),
        ("REF, H100, 20 steps (trained model)", "skip rate", ref_points),
    ]


def draw(out_path):
    w, h, pad = 560, 420, 60
    drawn = panels()
    img = Image.new("RGB", (w * len(drawn), h), "white")
    d = ImageDraw.Draw(img)
    for k, (title, ylabel, points) in enumerate(drawn):
        x0, y0, x1, y1 = k * w + pad, 40, (k + 1) * w - 20, h - pad
        xs = [p[1] for p in points] or [0.0]
        ys = [p[2] for p in points] or [1.0]
        xlo, xhi = min(0.0, min(xs)) if min(xs) < 15 else 15.0, PSNR_MAX
        ylo, yhi = 0.0, max(ys) * 1.15 if ys else 1.0

        def px(x, y):
            return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0), y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

        d.rectangle([x0, y0, x1, y1], outline="black")
        d.text((x0, 12), title, fill="black")
        d.text((x0, y1 + 30), f"PSNR vs bf16 output (dB; {PSNR_MAX:.0f} = bf16 itself)", fill="black")
        d.text((k * w + 4, y0 - 14), ylabel, fill="black")
        for t in range(5):  # axis ticks
            yv = ylo + (yhi - ylo) * t / 4
            d.text((k * w + 8, px(xlo, yv)[1] - 5), f"{yv:.2f}", fill="gray")
            xv = xlo + (xhi - xlo) * t / 4
            d.text((px(xv, ylo)[0] - 8, y1 + 6), f"{xv:.0f}", fill="gray")
        if ylabel.startswith("speed"):
            yb = px(xlo, 1.0)[1]
            d.line([x0, yb, x1, yb], fill=(200, 200, 200))
        for label, x, y in points:
            cx, cy = px(x, y)
            colour = "blue" if label.startswith(("sixbit", "int8", "nvfp4", "dynamic", "quality", "balanced",
                                                  "fast")) else "red"
            d.ellipse([cx - 4, cy - 4, cx + 4, cy + 4], fill=colour)
            d.text((cx + 6, cy - 6), label, fill=colour)
    img.save(out_path)
    return out_path


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "benchmarks_chart.png"))
    args = ap.parse_args(argv)
    print(draw(args.out))


if __name__ == "__main__":
    main()
