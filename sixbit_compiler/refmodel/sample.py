"""Sample the reference model from a prompt to a GIF: ``python -m sixbit_compiler.refmodel.sample``.

    python -m sixbit_compiler.refmodel.sample --prompt "a red square moving right fast on gray" --out video.gif

Prints the prompt adherence of the video (:func:`.metrics.adherence`). ``--sixbit`` samples
through ``torch.compile(model, backend="sixbit")`` instead (``--preset`` picks its options).
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", required=True, help="e.g. 'a blue triangle moving up slow and a red circle moving left fast on black'")
    ap.add_argument("--model", default=None, help="a refmodel.train output directory (default: the shipped model)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=4.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="video.gif")
    ap.add_argument("--sixbit", action="store_true", help="sample through backend='sixbit'")
    ap.add_argument("--preset", default=None, choices=["quality", "balanced", "fast"], help="with --sixbit")
    args = ap.parse_args(argv)

    from . import shipped_model_dir
    from .data import describe
    from .metrics import adherence
    from .model import load, sample, save_gif
    from .text import parse_prompt

    spec = parse_prompt(args.prompt)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, encoder = load(args.model or shipped_model_dir(), device, dtype)
    if args.sixbit:
        model = torch.compile(model, backend="sixbit", options={"preset": args.preset} if args.preset else {})
    frames = sample(model, encoder, spec, args.steps, args.guidance, args.seed, device, dtype)
    save_gif(frames, args.out)
    result = adherence(frames, spec)
    print(f"{describe(spec)}: {'follows the prompt' if result['ok'] else 'does not follow the prompt'}; wrote {args.out}")
    return frames, result


if __name__ == "__main__":
    main()
