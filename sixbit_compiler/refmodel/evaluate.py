"""Task-metric evaluation of the reference model: ``python -m sixbit_compiler.refmodel.evaluate``.

Samples ``n`` seeded prompts (``random_spec(EVAL_SEED_BASE + i)``: seeds training never draws),
scores each video with :func:`.metrics.adherence`, and reports the adherence rate, per-check
rates (present, shape, direction) and temporal consistency. Writes ``eval.json`` and, with
``--gif``, a grid of the first prompts' videos.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .data import describe, random_spec
from .metrics import adherence
from .model import load, sample_batch

#: Evaluation prompts start here; training draws seeds below 10^8 (steps x batch).
EVAL_SEED_BASE = 10**9


def eval_specs(n: int = 32):
    return [random_spec(EVAL_SEED_BASE + i) for i in range(n)]


def score(videos: torch.Tensor, specs) -> dict:
    """Adherence of each video [T, H, W, 3] to its spec, and the aggregate rates."""
    results = [adherence(v, s) for v, s in zip(videos, specs)]
    objects = [o for r in results for o in r["objects"]]
    finite = [o for o in objects if o["present"]]
    return {
        "prompts": len(results),
        "adherence": sum(r["ok"] for r in results) / max(len(results), 1),
        "present": sum(o["present"] for o in objects) / max(len(objects), 1),
        "shape": sum(o["shape_ok"] for o in objects) / max(len(objects), 1),
        "direction": sum(o["direction_ok"] for o in objects) / max(len(objects), 1),
        "mean_area_cv": sum(o["area_cv"] for o in finite) / max(len(finite), 1),
        "mean_color_spread": sum(o["color_spread"] for o in finite) / max(len(finite), 1),
        "per_prompt": [{"prompt": describe(s), "ok": r["ok"], "objects": r["objects"]} for s, r in zip(specs, results)],
    }


def evaluate(model, encoder, n: int = 32, steps: int = 20, guidance: float = 4.0, batch: int = 32,
             device="cpu", dtype=torch.float32) -> tuple[dict, torch.Tensor]:
    """(scores, videos [n, T, H, W, 3]) for the first ``n`` evaluation prompts (seed i for prompt i)."""
    specs = eval_specs(n)
    videos = []
    for i in range(0, n, batch):
        chunk = specs[i:i + batch]
        videos.append(sample_batch(model, encoder, chunk, steps, guidance, list(range(i, i + len(chunk))), device, dtype))
    videos = torch.cat(videos)
    return score(videos, specs), videos


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="directory written by refmodel.train (default: the shipped model)")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--out", default=None, help="write eval.json (and eval.gif) here")
    ap.add_argument("--gif", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    from . import shipped_model_dir

    model, encoder = load(args.model or shipped_model_dir(), device, dtype)
    scores, videos = evaluate(model, encoder, args.n, args.steps, args.guidance, device=device, dtype=dtype)
    print(f"adherence {scores['adherence']:.3f} over {scores['prompts']} prompts "
          f"(present {scores['present']:.3f}, shape {scores['shape']:.3f}, direction {scores['direction']:.3f})")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(scores, f, indent=1)
        if args.gif:
            save_grid(videos[:8], os.path.join(args.out, "eval.gif"))
    return scores


def save_grid(videos: torch.Tensor, path: str, fps: int = 6) -> None:
    """Videos [B, T, H, W, 3] side by side in one GIF."""
    from .model import save_gif

    save_gif(torch.cat(list(videos), dim=2), path, fps)


if __name__ == "__main__":
    main()
