"""Train the reference model (``python -m sixbit_compiler.refmodel.train``); one H100, <= 15 minutes.

Writes ``<out>/ref_model.safetensors`` (bf16 EMA weights + the text encoder's table),
``<out>/config.json``, ``<out>/loss.json`` and ``<out>/loss.png``; with ``--eval N``, also the
task metrics of N evaluation prompts (``eval.json``, ``eval.gif``). Data: ``random_spec`` seeds,
drawn by DataLoader workers and rendered on the training device; 10 % of prompts dropped to the
empty prompt for CFG. The shipped weights are the EMA of the trained ones (decay ``--ema``), which
sample cleaner videos than the last iterate.

One run can span several processes (the device tool runs at most 10 minutes a command):
``--stop-after M`` ends this process after M minutes with a resumable state (model, EMA,
optimizer, RNG, losses, time spent), and ``--resume`` continues it, on the same learning-rate
schedule, whose length is the whole run's ``--minutes``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from .data import random_spec, render_tensors, spec_tensors
from .model import REF_CONFIG, TEXT_TOKENS, flow_matching_loss, make_model, to_model
from .text import TextEncoder


def batch_inputs(step: int, size: int, encoder: TextEncoder, drop: float = 0.1):
    """(drawing parameters, text embeddings) of training batch ``step``, on the CPU."""
    specs = [random_spec(step * size + i) for i in range(size)]
    g = torch.Generator().manual_seed(step)
    keep = torch.rand(size, generator=g) >= drop
    text = torch.stack([encoder(s if k else None) for s, k in zip(specs, keep)])
    return spec_tensors(specs), text


class Batches(torch.utils.data.IterableDataset):
    """Training batches ``start`` .. ``steps`` - 1 in order; worker w of n draws steps start + w,
    start + w + n, ... (the DataLoader interleaves workers round-robin, so the order is the same
    for any number of workers)."""

    def __init__(self, start: int, steps: int, size: int, encoder: TextEncoder):
        self.start, self.steps, self.size, self.encoder = start, steps, size, encoder

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, n = (info.id, info.num_workers) if info else (0, 1)
        for step in range(self.start + wid, self.steps, n):
            yield batch_inputs(step, self.size, self.encoder)


def plot_loss(losses: list[float], path: str) -> None:
    """The loss curve (EMA-smoothed) on a log scale, with the value at each decade of the y axis."""
    from PIL import Image, ImageDraw

    w, h, left, pad = 640, 360, 60, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    smooth, acc = [], None
    for v in losses:
        acc = v if acc is None else 0.98 * acc + 0.02 * v
        smooth.append(max(acc, 1e-12))
    logs = [math.log10(v) for v in smooth]
    lo, hi = math.floor(min(logs)), math.ceil(max(logs))
    hi = max(hi, lo + 1)
    y = lambda lv: h - pad - (lv - lo) / (hi - lo) * (h - 2 * pad)  # noqa: E731
    pts = [(left + i * (w - left - pad) / max(len(logs) - 1, 1), y(lv)) for i, lv in enumerate(logs)]
    d.rectangle([left, pad, w - pad, h - pad], outline="black")
    for decade in range(lo, hi + 1):
        d.line([(left - 4, y(decade)), (left, y(decade))], fill="black")
        d.text((4, y(decade) - 6), f"{10.0 ** decade:g}", fill="black")
    d.line(pts, fill="blue", width=2)
    d.text((left, 10), f"flow-matching loss (EMA, log scale), {len(losses)} steps: {smooth[0]:.3f} -> {smooth[-1]:.4f}",
           fill="black")
    d.text((left, h - pad + 8), "training step", fill="black")
    img.save(path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="refmodel_out")
    ap.add_argument("--steps", type=int, default=200_000, help="at most this many steps (the time budget usually ends first)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=8e-4)
    ap.add_argument("--minutes", type=float, default=14.0,
                    help="the whole run's training time, over which the learning rate decays (0: steps only)")
    ap.add_argument("--stop-after", type=float, default=None, help="end this process after this many minutes, resumable")
    ap.add_argument("--resume", action="store_true", help="continue the run saved in --state")
    ap.add_argument("--state", default=None, help="resumable state file (default: <out>/train_state.pt)")
    ap.add_argument("--tiny", action="store_true", help="a tiny config, for a CPU smoke run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ema", type=float, default=0.999, help="EMA decay of the shipped weights")
    ap.add_argument("--workers", type=int, default=None, help="data workers (default: 8 on GPU, 0 on CPU)")
    ap.add_argument("--sigma-shift", type=float, default=3.0, help="training noise-level shift (the sampler's)")
    ap.add_argument("--no-compile", action="store_true", help="train eagerly (torch.compile is used on CUDA)")
    ap.add_argument("--eval", type=int, default=0, help="after training, score this many evaluation prompts")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state_path = args.state or os.path.join(args.out, "train_state.pt")
    os.makedirs(args.out, exist_ok=True)
    if args.resume:
        saved = torch.load(state_path, map_location="cpu", weights_only=False)
        config, start, prior, losses = saved["config"], saved["step"], saved["seconds"], saved["losses"]
        for key in ("batch", "lr", "minutes", "seed", "ema", "sigma_shift", "steps"):
            setattr(args, key, saved["args"][key])  # the run's recipe, not this process's defaults
    else:
        config = dict(REF_CONFIG, num_layers=2, ffn_dim=128, num_attention_heads=2, attention_head_dim=16) if args.tiny else REF_CONFIG
        start, prior, losses = 0, 0.0, []
    torch.manual_seed(args.seed)
    encoder = TextEncoder(config["text_dim"], TEXT_TOKENS, seed=args.seed)
    model = make_model(config).to(device).train()
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    live = [model.state_dict()[k] for k in names]
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    if args.resume:
        model.load_state_dict(saved["model"])
        encoder.load_state_dict(saved["encoder"])
        opt.load_state_dict(saved["opt"])
        ema = [e.to(device) for e in saved["ema"]]
        torch.set_rng_state(saved["rng"])
        if device.type == "cuda" and saved.get("cuda_rng") is not None:
            torch.cuda.set_rng_state(saved["cuda_rng"])
    else:
        ema = [v.detach().clone().float() for v in live]
    forward = model if args.no_compile or device.type != "cuda" else torch.compile(model)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    loader = torch.utils.data.DataLoader(Batches(start, args.steps, args.batch, encoder), batch_size=None,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None,
                                         generator=torch.Generator())  # its seed draw must not move the noise RNG
    budget = args.minutes * 60
    first = random_spec(0)  # every training video has the generator's default size
    t0 = time.time()
    elapsed = lambda: prior + time.time() - t0  # noqa: E731 -- training seconds of the whole run
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    pending, step, finished = None, start, True  # pending: the loss read one step late (the GPU never waits)
    for step, (params, text) in enumerate(loader, start):
        params = {k: v.to(device, non_blocking=True) for k, v in params.items()}
        x0 = to_model(render_tensors(params, first.height, first.width))
        text = text.to(device, non_blocking=True)
        with autocast:
            loss = flow_matching_loss(forward, x0, text, shift=args.sigma_shift)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        # warm-up, then cosine decay over whichever budget (steps or minutes) runs out first
        progress = max(step / args.steps, elapsed() / budget if budget else 0.0)
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
            print(f"step {step} loss {losses[-1]:.4f} {elapsed():.0f}s", flush=True)
        if budget and elapsed() > budget:
            print(f"stopping at step {step}: time budget", flush=True)
            break
        if args.stop_after is not None and time.time() - t0 > args.stop_after * 60:
            finished = False
            break
    losses.append(pending.item())
    step += 1
    if not finished:  # resumable: everything the next process needs to go on as if uninterrupted
        torch.save({"model": model.state_dict(), "ema": [e.cpu() for e in ema], "opt": opt.state_dict(),
                    "encoder": encoder.state_dict(), "config": config, "step": step, "seconds": elapsed(),
                    "losses": losses, "args": vars(args), "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state() if device.type == "cuda" else None}, state_path)
        print(f"paused at step {step} after {elapsed():.0f}s; resume with --resume --state {state_path}", flush=True)
    with torch.no_grad():
        for v, e in zip(live, ema):
            v.copy_(e)
    from safetensors.torch import save_file

    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in encoder.state_dict().items()})
    save_file(state, os.path.join(args.out, "ref_model.safetensors"))
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump({"model": config, "text_tokens": TEXT_TOKENS, "steps": len(losses), "batch": args.batch,
                   "lr": args.lr, "seed": args.seed, "ema": args.ema, "seconds": elapsed(), "finished": finished,
                   "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                   "torch": torch.__version__, "sigma_shift": args.sigma_shift, "minutes": args.minutes,
                   "compiled": forward is not model}, f, indent=1, default=list)
    with open(os.path.join(args.out, "loss.json"), "w") as f:
        json.dump(losses, f)
    plot_loss(losses, os.path.join(args.out, "loss.png"))
    print(f"trained {len(losses)} steps in {elapsed():.0f}s; final loss (mean of last 100) "
          f"{sum(losses[-100:]) / len(losses[-100:]):.4f}", flush=True)
    if args.eval and finished:
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
