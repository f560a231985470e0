"""Train the reference model (``python -m sixbit_compiler.refmodel.train``); one H100, <= 15 minutes.

Writes ``<out>/ref_model.safetensors`` (bf16 EMA weights + the text encoder's table),
``<out>/config.json``, ``<out>/loss.json`` and ``<out>/loss.png``; with ``--eval N``, also the
task metrics of N evaluation prompts (``eval.json``, ``eval.gif``). Data: ``random_spec`` seeds
rendered on the fly by DataLoader workers; 10 % of prompts dropped to the empty prompt for CFG.
The shipped weights are the EMA of the trained ones (decay ``--ema``), which sample cleaner videos
than the last iterate.
"""

from __future__ import annotations

import argparse
import json
import math
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


class Batches(torch.utils.data.IterableDataset):
    """Training batches in step order; worker w of n renders steps w, w + n, ... (the DataLoader
    interleaves workers round-robin, so the order is the same for any number of workers)."""

    def __init__(self, steps: int, size: int, encoder: TextEncoder):
        self.steps, self.size, self.encoder = steps, size, encoder

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(wid, self.steps, n):
            yield batch(step, self.size, self.encoder, "cpu")


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
    ap.add_argument("--lr", type=float, default=6e-4)
    ap.add_argument("--minutes", type=float, default=14.0, help="stop after this long")
    ap.add_argument("--tiny", action="store_true", help="a tiny config, for a CPU smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    ap.add_argument("--workers", type=int, default=None, help="data workers (default: 8 on GPU, 0 on CPU)")
    ap.add_argument("--sigma-shift", type=float, default=3.0, help="training noise-level shift (the sampler's)")
    ap.add_argument("--init", default=None, help="start from the weights of this directory (a second stage)")
    ap.add_argument("--eval", type=int, default=0, help="after training, score this many evaluation prompts")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = dict(REF_CONFIG, num_layers=2, ffn_dim=128, num_attention_heads=2, attention_head_dim=16) if args.tiny else REF_CONFIG
    torch.manual_seed(args.seed)
    encoder = TextEncoder(config["text_dim"], TEXT_TOKENS, seed=args.seed)
    model, earlier = make_model(config), None
    if args.init:  # a later stage: same config and text encoder, weights from the earlier stage
        from .model import load

        model, encoder = load(args.init)
        with open(os.path.join(args.init, "config.json")) as f:
            earlier = json.load(f)
        config = earlier["model"]
    model = model.to(device).train()
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    live = [model.state_dict()[k] for k in names]
    ema = [v.detach().clone().float() for v in live]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    os.makedirs(args.out, exist_ok=True)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(Batches(args.steps, args.batch, encoder), batch_size=None,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    losses, t0 = [], time.time()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    pending = None  # the previous step's loss, read one step late so the GPU never waits for the host
    for step, (x0, text) in enumerate(loader):
        x0, text = x0.to(device, non_blocking=True), text.to(device, non_blocking=True)
        with autocast:
            loss = flow_matching_loss(model, x0, text, shift=args.sigma_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # warm-up, then cosine decay over whichever budget (steps or minutes) runs out first
        progress = max(step / args.steps, (time.time() - t0) / (args.minutes * 60))
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        opt.step()
        with torch.no_grad():
            decay = min(args.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [v.float() for v in live], 1 - decay)
        if pending is not None:
            losses.append(pending.item())
        pending = loss.detach()
        if step % 100 == 0 and losses:
            print(f"step {step} loss {losses[-1]:.4f} {time.time() - t0:.0f}s", flush=True)
        if time.time() - t0 > args.minutes * 60:
            print(f"stopping at step {step}: time budget", flush=True)
            break
    losses.append(pending.item())
    with torch.no_grad():
        for v, e in zip(live, ema):
            v.copy_(e)
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in encoder.state_dict().items()})
    save_file(state, os.path.join(args.out, "ref_model.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"model": config, "text_tokens": TEXT_TOKENS, "steps": len(losses), "batch": args.batch,
                   "lr": args.lr, "seed": args.seed, "ema": args.ema, "seconds": time.time() - t0,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "sigma_shift": args.sigma_shift,
                   "total_steps": len(losses) + (earlier or {}).get("total_steps", (earlier or {}).get("steps", 0)),
                   "total_seconds": time.time() - t0 + (earlier or {}).get("total_seconds", (earlier or {}).get("seconds", 0)),
                   "earlier_stage": earlier}, f, indent=1, default=list)
    with open(os.path.join(args.out, "loss.json"), "w") as f:
        json.dump(losses, f)
    plot_loss(losses, os.path.join(args.out, "loss.png"))
    print(f"trained {len(losses)} steps in {time.time() - t0:.0f}s; final loss (EMA of last 100) "
          f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", flush=True)
    if args.eval:
        from .evaluate import evaluate, save_grid

        model.eval()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        scores, videos = evaluate(model.to(dtype), encoder, args.eval, device=device, dtype=dtype)
        print(f"adherence {scores['adherence']:.3f} over {scores['prompts']} prompts (present {scores['present']:.3f}, "
              f"shape {scores['shape']:.3f}, direction {scores['direction']:.3f})", flush=True)
        with open(os.path.join(args.out, "eval.json"), "w") as f:
            json.dump(scores, f, indent=1)
        save_grid(videos[:8], os.path.join(args.out, "eval.gif"))
    return losses


if __name__ == "__main__":
    main()
