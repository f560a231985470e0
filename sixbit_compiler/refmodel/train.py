"""Train the reference model (``python -m sixbit_compiler.refmodel.train``); GPU, ~15 minutes.

Writes ``<out>/ref_model.safetensors`` (bf16 weights + the text encoder's table),
``<out>/config.json``, ``<out>/loss.json`` and ``<out>/loss.png``. Data: random_spec seeds,
rendered on the fly; 10 % of prompts dropped to the empty prompt for CFG.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

from .data import random_spec, render
from .model import REF_CONFIG, TEXT_TOKENS, flow_matching_loss, make_model, to_model
from .text import TextEncoder


def batch(step: int, size: int, encoder: TextEncoder, device, drop: float = 0.1):
    specs = [random_spec(step * size + i) for i in range(size)]
    video = torch.stack([render(s) for s in specs]).to(device)
    g = torch.Generator().manual_seed(step)
    keep = torch.rand(size, generator=g) >= drop
    text = torch.stack([encoder(s if k else None) for s, k in zip(specs, keep)]).to(device)
    return to_model(video), text


def plot_loss(losses: list[float], path: str) -> None:
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.98 * acc + 0.02 * v
        smooth.append(acc)
    lo, hi = min(smooth), max(smooth)
    pts = [(pad + i * (w - 2 * pad) / max(len(smooth) - 1, 1), h - pad - (v - lo) / max(hi - lo, 1e-9) * (h - 2 * pad))
           for i, v in enumerate(smooth)]
    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.line(pts, fill="blue", width=2)
    d.text((pad, 10), f"flow-matching loss (EMA), {len(losses)} steps: {hi:.3f} -> {smooth[-1]:.3f}", fill="black")
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="refmodel_out")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--minutes", type=float, default=14.0, help="stop after this long")
    ap.add_argument("--tiny", action="store_true", help="a tiny config, for a CPU smoke run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(REF_CONFIG, num_layers=2, ffn_dim=128, num_attention_heads=2, attention_head_dim=16) if args.tiny else REF_CONFIG
    torch.manual_seed(args.seed)
    model = make_model(config).to(device).train()
    encoder = TextEncoder(config["text_dim"], TEXT_TOKENS, seed=args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05)
    os.makedirs(args.out, exist_ok=True)
    losses, t0 = [], time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    for step in range(args.steps):
        x0, text = batch(step, args.batch, encoder, device)
        with autocast:
            loss = flow_matching_loss(model, x0, text)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0:
            print(f"step {step} loss {losses[-1]:.4f} {time.time() - t0:.0f}s", flush=True)
        if time.time() - t0 > args.minutes * 60:
            print(f"stopping at step {step}: time budget", flush=True)
            break
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in encoder.state_dict().items()})
    save_file(state, os.path.join(args.out, "ref_model.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"model": config, "text_tokens": TEXT_TOKENS, "steps": len(losses), "batch": args.batch,
                   "lr": args.lr, "seed": args.seed, "seconds": time.time() - t0}, f, indent=1, default=list)
    with open(os.path.join(args.out, "loss.json"), "w") as f:
        json.dump(losses, f)
    plot_loss(losses, os.path.join(args.out, "loss.png"))
    return losses


if __name__ == "__main__":
    main()
