"""Look inside sixbit: the dumped stages of one compile, the generated kernels, and a pass test.

A tiny diffusers Wan transformer (random weights) is compiled with a dump directory and the
experimental region codegen; the script then prints what each pass did (the dump's index),
the fusion regions with their generated kernels, and the head of one generated kernel's Triton
source. Last, it runs two passes by hand on a captured graph and checks the ops they added,
the way the project's own pass tests do (``sixbit_compiler.testing``).

    python examples/inspect_passes.py [--out sixbit_inspect]

On a machine without a GPU the generated kernels run under Triton's interpreter
(``TRITON_INTERPRET=1``, set below before Triton is imported).
"""

from __future__ import annotations

import argparse
import os
import pathlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before sixbit's kernels import Triton

import sixbit_compiler  # noqa: E402,F401  (registers backend="sixbit")
from sixbit_compiler.passes import find_blocks, quantize_linears  # noqa: E402
from sixbit_compiler.testing import capture, context_for, op_counts  # noqa: E402


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4,
        text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=1e-6, rope_max_seq_len=32,
    ).eval()


def inputs(device):
    g = torch.Generator().manual_seed(1)
    return {"hidden_states": torch.randn(1, 4, 3, 8, 8, generator=g).to(device),
            "timestep": torch.tensor([500.0], device=device),
            "encoder_hidden_states": torch.randn(1, 7, 32, generator=g).to(device), "return_dict": False}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="sixbit_inspect")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    # 1. One compile, every stage dumped.
    compiled = torch.compile(tiny_wan().to(device), backend="sixbit",
                             options={"activation": "int8", "codegen": True, "dump_dir": args.out})
    with torch.no_grad():
        compiled(**inputs(device))
    (dump,) = sorted(pathlib.Path(args.out).iterdir())[-1:]
    print(f"dump: {dump}")
    print("stages:", ", ".join(sorted(p.name for p in dump.glob("*.py"))))
    index = (dump / "index.md").read_text()
    passes = index[index.index("| #"):].split("\n\n")[0] if "| #" in index else ""
    print(passes)

    # 2. The fusion regions and the kernels generated for them.
    regions = index[index.index("## Fusion regions"):].split("\n## ")[0]
    print("\n".join(regions.splitlines()[:8]))
    kernels = sorted((dump / "kernels").glob("*.py"))
    gemm = next(k for k in kernels if k.name.startswith("gemm_epilogue_"))
    source = gemm.read_text().splitlines()
    start = next(i for i, line in enumerate(source) if line.startswith("def "))
    print(f"\n{len(kernels)} generated kernels; the head of {gemm.name}:")
    print("\n".join(source[start:start + 14]))

    # 3. A pass test: run passes by hand and check what they changed.
    gm, example_inputs = capture(tiny_wan(), **inputs("cpu"))
    gm, ctx = context_for(gm, example_inputs, activation="int8")
    find_blocks(gm, ctx)
    before = op_counts(gm.graph)
    quantize_linears(gm, ctx)
    after = op_counts(gm.graph)
    quantized = after.get("sixbit.quantized_linear.default", 0)
    assert quantized == before["F.linear"] - after.get("F.linear", 0), "each quantized linear replaced one F.linear"
    print(f"\nquantize_linears: {quantized} F.linear -> sixbit.quantized_linear in {len(ctx.blocks)} blocks; "
          f"{after.get('F.linear', 0)} linears outside the blocks stay as they are")
    return {"dump": dump, "kernels": kernels, "quantized": quantized}


if __name__ == "__main__":
    main()
