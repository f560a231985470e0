"""Presets and forced schedules on the reference model: fidelity, skip rate, precision mix, adherence.

Random-weight models say nothing about realistic skip rates or what a skipped block does to a
video; the reference model (docs/reference_model.md) does. For each mode, the same prompts and
seeds are sampled (UniPC, CFG, all prompts batched) and compared with the unquantized model:
PSNR / SSIM / relative L2 of the frames, adherence of each video, and sixbit's stats.

    python benchmarks/ref_presets.py [--model DIR] [--prompts 4] [--steps 20] [--modes int8,fast+cache_dtype=fp8,fbc=0.1,...]

Mode ``fbc=T`` is the peer users would pick for skipping: diffusers' FirstBlockCache at
threshold T (``enable_cache(FirstBlockCacheConfig(threshold=T))``, eager bf16), with one cache
state per CFG branch as the Wan pipeline names them; its skip rate is counted from how often the
last block's feed-forward ran.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import traceback

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="a refmodel.train output directory (default: the shipped model)")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--modes", default="int8,nvfp4,dynamic,quality,balanced,fast")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    args = ap.parse_args(argv)

    from sixbit_compiler.refmodel import shipped_model_dir
    from sixbit_compiler.refmodel.evaluate import eval_specs, score
    from sixbit_compiler.refmodel.model import load, sample_batch

    args.model = args.model or shipped_model_dir()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    specs = eval_specs(args.prompts)
    seeds = list(range(args.prompts))
    model, encoder = load(args.model, device, dtype)
    t0 = time.perf_counter()
    reference = sample_batch(model, encoder, specs, args.steps, 4.0, seeds, device, dtype)
    report = {"model": args.model, "prompts": args.prompts, "steps": args.steps, "device": device,
              "modes": {"unquantized": {"seconds": time.perf_counter() - t0, **_task(score(reference, specs))}}}
    os.makedirs(args.out, exist_ok=True)
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        model, encoder = load(args.model, device, dtype)
        try:
            if mode.startswith("fbc="):
                result = _first_block_cache(model, encoder, specs, seeds, args.steps, float(mode[4:]), reference,
                                            device, dtype)
            else:
                result = _sixbit(mode, model, encoder, specs, seeds, args.steps, reference, device, dtype)
        except Exception as exc:  # recorded; the other modes still run
            result = {"failed": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=3)}
        report["modes"][mode] = result
        print(mode, json.dumps(report["modes"][mode]), flush=True)
        with open(os.path.join(args.out, "ref_presets.json"), "w") as f:
            json.dump(report, f, indent=1)
    return report


def _sixbit(mode, model, encoder, specs, seeds, steps, reference, device, dtype) -> dict:
    import sixbit_compiler
    from sixbit_compiler.quality import fidelity
    from sixbit_compiler.refmodel.evaluate import score
    from sixbit_compiler.refmodel.model import sample_batch

    from e2e import option_overrides  # the same "+key=value" parts as the end-to-end modes

    name, *overrides = mode.split("+")  # e.g. "fast+cache_dtype=fp8"
    options = {"preset": name} if name in ("quality", "balanced", "fast") else {"activation": name}
    options.update(option_overrides(overrides))
    options["lowering"] = "eager"  # quality and decisions do not depend on the lowering
    compiled = torch.compile(model, backend="sixbit", options=options)
    t0 = time.perf_counter()
    videos = sample_batch(compiled, encoder, specs, steps, 4.0, seeds, device, dtype)
    s = sixbit_compiler.stats(compiled)["last_generation"]
    return {"options": options, "seconds": time.perf_counter() - t0, "fidelity": fidelity(videos, reference),
            "skip_rate": s["skip_rate"], "avg_activation_bits": s["avg_activation_bits"],
            "precision_counts": s["precision_counts"], **_task(score(videos, specs))}


def _first_block_cache(model, encoder, specs, seeds, steps, threshold, reference, device, dtype) -> dict:
    from diffusers import FirstBlockCacheConfig

    from sixbit_compiler.quality import fidelity
    from sixbit_compiler.refmodel.evaluate import score
    from sixbit_compiler.refmodel.model import sample_batch

    model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    ran = {"last_block": 0, "calls": 0}
    # FirstBlockCache replaces the tail blocks' forward (their own forward hooks still fire when
    # skipped), so count a submodule that only a computed block calls
    model.blocks[-1].ffn.register_forward_hook(lambda *a: ran.__setitem__("last_block", ran["last_block"] + 1))
    model.register_forward_hook(lambda *a: ran.__setitem__("calls", ran["calls"] + 1))
    t0 = time.perf_counter()
    videos = sample_batch(model, encoder, specs, steps, 4.0, seeds, device, dtype)
    seconds = time.perf_counter() - t0
    skipped = 1 - ran["last_block"] / max(ran["calls"], 1)  # a skipping call runs only the first block
    blocks = len(model.blocks)
    return {"options": {"first_block_cache_threshold": threshold}, "seconds": seconds,
            "fidelity": fidelity(videos, reference), "skip_rate": skipped * (blocks - 1) / blocks,
            "skipped_calls": skipped, **_task(score(videos, specs))}


def _task(scores: dict) -> dict:
    return {k: scores[k] for k in ("adherence", "present", "shape", "direction", "mean_area_cv")}


if __name__ == "__main__":
    main()
