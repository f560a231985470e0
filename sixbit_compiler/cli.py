"""The ``sixbit`` command. Today one subcommand: ``sixbit calibrate`` (see ``--help``)."""

from __future__ import annotations

import argparse
import importlib
import sys

CALIBRATION_SEED_BASE = 2 * 10**9  # calibration prompts: seeds neither training nor evaluation draws


def _refmodel_task(path: str, prompts: int, steps: int, guidance: float, device: str):
    import torch

    from .refmodel.data import random_spec
    from .refmodel.model import load, sample_batch

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, encoder = load(path, device, dtype)
    items = [(random_spec(CALIBRATION_SEED_BASE + i), i) for i in range(prompts)]

    def run(compiled, item):
        spec, seed = item
        sample_batch(compiled, encoder, [spec], steps, guidance, [seed], device, dtype)

    return model, run, items


def _factory_task(spec: str):
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"sixbit calibrate: --factory must look like 'package.module:function', got {spec!r}")
    task = getattr(importlib.import_module(module), name)()
    if not (isinstance(task, tuple) and len(task) == 3):
        raise SystemExit("sixbit calibrate: the factory must return (model, run, items); see --help")
    return task


def calibrate_main(argv) -> int:
    ap = argparse.ArgumentParser(
        prog="sixbit calibrate",
        description="Fit DMPQ's predictor E_rel ~ alpha * Gamma_{t-1} + beta on real sampling loops and write a "
        "calibration file for options={'calibration': PATH}.",
        epilog="--factory names a function returning (model, run, items): run(compiled_model, item) runs one "
        "generation (a full sampling loop with CFG) for one calibration input (prompt embeddings and a seed).",
    )
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--refmodel", metavar="DIR", help="the project's reference model (a refmodel.train output dir)")
    src.add_argument("--factory", metavar="MODULE:FUNCTION", help="your model and sampling loop (see below)")
    ap.add_argument("--prompts", type=int, default=8, help="calibration prompts (refmodel; default 8)")
    ap.add_argument("--steps", type=int, default=20, help="sampling steps per prompt (refmodel; default 20)")
    ap.add_argument("--guidance", type=float, default=4.0, help="CFG scale (refmodel; default 4)")
    ap.add_argument("--budget", type=float, default=None,
                    help="the error budget stored as the file's default (default: the median measured E_rel)")
    ap.add_argument("--hadamard", action="store_true", help="calibrate with the Hadamard rotation on")
    ap.add_argument("--out", default="sixbit_calibration.json", help="calibration file to write")
    ap.add_argument("--plot", default=None, help="scatter plot PNG (Gamma_{t-1} vs E_rel per layer kind)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    args = ap.parse_args(argv)

    import torch

    from .calibrate import calibrate

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.refmodel:
        model, run, items = _refmodel_task(args.refmodel, args.prompts, args.steps, args.guidance, device)
        source = f"refmodel {args.refmodel}: {args.prompts} prompts x {args.steps} steps, CFG {args.guidance}"
    else:
        model, run, items = _factory_task(args.factory)
        source = f"factory {args.factory}"
    cal = calibrate(model, run, items, out=args.out, plot=args.plot, options={"hadamard": args.hadamard},
                    default_budget=args.budget, source=source)
    print(cal.table())
    print(f"\nmode: per {cal.mode} (held-out RMSE: kind {cal.held_out['kind']:.4g}, layer {cal.held_out['layer']:.4g}); "
          f"default budget {cal.default_budget:.4g}")
    print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(prog="sixbit", description="sixbit: a torch.compile backend for video DiTs.")
    ap.add_argument("command", choices=["calibrate"], help="calibrate: fit DMPQ's predictor (sixbit calibrate --help)")
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        return 0
    args, rest = ap.parse_known_args(argv[:1])
    return calibrate_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
