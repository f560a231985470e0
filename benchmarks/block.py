"""One Wan2.1 transformer block, computed four ways (codegen issue): fused sixbit, unfused sixbit,
Inductor bf16, eager bf16.

The model is the diffusers ``WanTransformer3DModel`` architecture (1.3B or 14B config, random
bf16 weights) cut to two blocks, at 480×832, 81 frames (32,760 tokens), text 512. The two
blocks run as one module (``Blocks``: sixbit's ``find_blocks`` wants a group of at least two),
fed the inputs the first block receives in a real forward; the time per block is half of it.

Reported per mode, all in one process on one card:

* time per block (CUDA-event medians of ``triton.testing.do_bench``) and its ratio to Inductor;
* the non-attention part: the block's time minus its two attentions, which are timed alone
  (the same ``F.scaled_dot_product_attention`` calls on the block's q/k/v shapes; every mode
  runs the same SDPA kernels);
* fidelity of the block output to eager bf16 (relative L2);
* HBM bytes: the minimum a block must move (weights once in their stored format, the block's
  input and output, the text states, attention's q/k/v/o) and, with ``--ncu`` runs (see the
  command below), what ``ncu`` measured (``dram__bytes_read/write.sum``).

    python benchmarks/block.py --model 14b [--modes eager,inductor,sixbit,sixbit_fused] [--ncu]

``--ncu`` then runs each mode once more in a child process under Nsight Compute
(``ncu --profile-from-start off``, one profiled forward) and sums ``dram__bytes_read.sum`` and
``dram__bytes_write.sum`` over its kernels, and over the attention kernels apart.

Writes ``block_<model>.json`` to $OUT (or ./out).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))
from e2e import TINY_WAN, WAN_1_3B, WAN_14B, build  # noqa: E402

#: name: (config, latent [C, F, H, W], text tokens); "tiny" is the CPU smoke test's
MODELS = {"1.3b": (WAN_1_3B, (16, 21, 60, 104), 512), "14b": (WAN_14B, (16, 21, 60, 104), 512),
          "tiny": (TINY_WAN, (16, 3, 8, 8), 16)}
MODES = {
    "eager": None,
    "inductor": {},
    "sixbit": {"activation": "int8"},
    "sixbit_fused": {"activation": "int8", "codegen": True},
    "sixbit_int8_attention": {"activation": "int8", "attention": "int8"},  # the default (unfused) path
    # the same without the folds (the q/k RMS norms and RoPE into the attention's quantization,
    # the feed-forward GELU into the next GEMM's): the default path of block runs 6-9
    "sixbit_int8_attention_unfolded": {"activation": "int8", "attention": "int8",
                                       "passes": {"fold_qk_norm_rope": False, "fold_gelu": False}},
    # attention too: INT8 Q·Kᵀ, FP8 P·V (its non-attention part subtracts that attention's time)
    "sixbit_fused_int8_attention": {"activation": "int8", "codegen": True, "attention": "int8"},
    # the FP8 tier's activations (per-token e4m3, the FP8 GEMM accumulating in the MMA) instead of INT8
    "sixbit_fp8_int8_attention": {"activation": "fp8", "attention": "int8"},
    # ... each FP8 GEMM quantizing its own activation, GELU not folded (the FP8 tier before block run 11)
    "sixbit_fp8_int8_attention_unshared": {"activation": "fp8", "attention": "int8",
                                           "passes": {"share_quantization": False, "fold_gelu": False}},
    # the same with the norm prologues also writing their GEMMs' INT8 codes (opt-in quantize_prologues)
    "sixbit_fused_int8_attention_prologue_codes": {"activation": "int8", "codegen": True, "attention": "int8",
                                                   "passes": {"quantize_prologues": True}},
    # ... and with each GEMM quantizing its activation itself (q, k and v: three times)
    "sixbit_fused_int8_attention_unshared": {"activation": "int8", "codegen": True, "attention": "int8",
                                             "passes": {"share_quantization": False}},
}


class Blocks(torch.nn.Module):
    """The first two blocks of a Wan transformer, called as the model calls them."""

    def __init__(self, blocks):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, hidden_states, encoder_hidden_states, temb, rotary_emb):
        for block in self.blocks:
            hidden_states = block(hidden_states, encoder_hidden_states, temb, rotary_emb)
        return hidden_states


def block_inputs(model_name, device):
    """The model cut to two blocks, and the arguments its first block receives."""
    config, latent, text_tokens = MODELS[model_name]
    model = build("wan", dict(config, num_layers=2), device)
    seen = {}

    def grab(module, args, kwargs):
        seen["args"], seen["kwargs"] = args, kwargs

    handle = model.blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, *latent, generator=g).to(device, torch.bfloat16)
    text = torch.randn(1, text_tokens, config["text_dim"], generator=g).to(device, torch.bfloat16)
    with torch.no_grad():
        model(hidden_states=x, timestep=torch.tensor([500.0], device=device), encoder_hidden_states=text,
              return_dict=False)
    handle.remove()
    args = list(seen["args"])
    names = ["hidden_states", "encoder_hidden_states", "temb", "rotary_emb"]
    for name in names[len(args):]:
        args.append(seen["kwargs"][name])
    return Blocks(list(model.blocks)), tuple(args)


def minimum_bytes(config, tokens, text, weight_bytes_per_param):
    """HBM bytes one block cannot avoid: weights once, its input and output, the text states,
    and the attentions' q, k, v read and output written (attention is its own kernel)."""
    d, ffn = config["num_attention_heads"] * config["attention_head_dim"], config["ffn_dim"]
    params = 4 * d * d + 4 * d * d + 2 * d * ffn  # self-attn, cross-attn (q, k, v, o), FFN
    act = 2  # bf16
    io = 2 * tokens * d * act + text * d * act
    attention = 4 * tokens * d * act + 2 * tokens * d * act + 2 * text * d * act
    return params * weight_bytes_per_param + io + attention


def attention_time(config, tokens, text, device, bench, quantized=False):
    """Self- and cross-attention of one block, as the block calls SDPA (bf16, [B, H, S, D]), or
    (``quantized``) sixbit's quantized attention op on the same inputs."""
    h, hd = config["num_attention_heads"], config["attention_head_dim"]
    q = torch.randn(1, h, tokens, hd, device=device, dtype=torch.bfloat16)
    kv = torch.randn(1, h, text, hd, device=device, dtype=torch.bfloat16)
    if quantized:
        from sixbit_compiler.ops import quantized_attention

        def attend(q, k, v):
            return quantized_attention(q, k, v, None)
    else:
        attend = torch.nn.functional.scaled_dot_product_attention
    return bench(lambda: attend(q, q, q)) + bench(lambda: attend(q, kv, kv))


def compiled(mode, blocks):
    options = MODES[mode]
    if options is None:
        return blocks
    if mode == "inductor":
        return torch.compile(blocks)
    # a copy per sixbit mode: sixbit quantizes the module's weights and frees the bf16 ones
    return torch.compile(copy.deepcopy(blocks), backend="sixbit", options=options)


def ncu_child(args):
    """One profiled forward (cudaProfilerStart/Stop around it) for ``ncu --profile-from-start off``."""
    blocks, inputs = block_inputs(args.model, "cuda")
    fn = compiled(args.ncu_child, blocks)
    with torch.no_grad():
        for _ in range(2):  # compile, autotune, warm
            fn(*inputs)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        fn(*inputs)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


#: substrings of the SDPA kernels' names (cuDNN, flash, memory-efficient), counted apart
ATTENTION_KERNELS = ("sdpa", "flash", "fmha", "attention")
_UNITS = {"byte": 1, "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9, "Tbyte": 1e12,
          "KB": 1e3, "MB": 1e6, "GB": 1e9, "B": 1}


def ncu_bytes(model: str, mode: str, timeout: int) -> dict:
    """HBM bytes read and written by one forward of ``mode`` (two blocks), per Nsight Compute."""
    import subprocess

    cmd = ["ncu", "--profile-from-start", "off", "--clock-control", "none", "--csv",
           "--metrics", "dram__bytes_read.sum,dram__bytes_write.sum",
           sys.executable, os.path.abspath(__file__), "--model", model, "--ncu-child", mode]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    result = parse_ncu_csv(done.stdout)
    if result is None:
        return {"error": f"ncu printed no metrics (rc {done.returncode}): {done.stderr[-500:]}"}
    return result


def parse_ncu_csv(text: str, calls: int = 2) -> dict | None:
    """Per block (``calls`` blocks profiled): DRAM bytes read / written over all kernels and
    over the attention kernels, from ``ncu --csv`` output (other lines are ignored)."""
    import csv
    import io

    lines = [line for line in text.splitlines() if line.startswith('"')]
    if not lines:
        return None
    total = {"dram__bytes_read.sum": 0.0, "dram__bytes_write.sum": 0.0}
    attention = dict(total)
    kernels = set()
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        name = row.get("Metric Name")
        if name in total:
            value = float(row["Metric Value"].replace(",", "")) * _UNITS.get(row.get("Metric Unit", "byte"), 1)
            total[name] += value
            if is_attention_kernel(row.get("Kernel Name", "")):
                attention[name] += value
            kernels.add(row.get("ID"))
    return {"read": total["dram__bytes_read.sum"] / calls, "written": total["dram__bytes_write.sum"] / calls,
            "attention_read": attention["dram__bytes_read.sum"] / calls,
            "attention_written": attention["dram__bytes_write.sum"] / calls, "kernels_per_block": len(kernels) / calls}


#: sixbit's quantized attention: the kernel and its Q/K and V quantization passes (the folded
#: q/k norm + RoPE kernels, ``_rope_rows_kernel`` and ``_rstd_kernel``, count as attention here,
#: as the Q/K quantization they include does, so ``kernel_split`` undercounts the non-attention
#: part of folded modes by their norm and RoPE work)
SIXBIT_ATTENTION_KERNELS = ("_attention_kernel", "_qk_rows_kernel", "_v_kernel", "_rope_rows_kernel", "_rstd_kernel")


def is_attention_kernel(name: str) -> bool:
    """SDPA's kernels and sixbit's attention kernels. Inductor's generated kernels (``triton_*``)
    are not, even when their fused name mentions the attention they feed (the q/k RMS norms')."""
    if name.startswith(SIXBIT_ATTENTION_KERNELS):
        return True
    return not name.startswith("triton_") and any(tag in name.lower() for tag in ATTENTION_KERNELS)


def kernel_split(rows) -> dict:
    """Per block: the summed kernel time, and its attention / non-attention parts (``rows`` from
    :func:`top_kernels` with every kernel). A second measure of the non-attention part, beside
    ``non_attention_s`` (the block's time minus separately timed attention). It undercounts
    sixbit's attention by the generic PyTorch kernels its op launches (V's amax and amin, K's
    token mean: ~0.5 ms a W-14B block), which no name tells apart."""
    attention = sum(r[1] for r in rows if is_attention_kernel(r[0])) * 1e-6
    total = sum(r[1] for r in rows) * 1e-6
    return {"kernels_s": total, "attention_kernels_s": attention, "non_attention_kernels_s": total - attention}


def top_kernels(call, count=25, timeline=None):
    """The GPU kernels of one call (two blocks) by total time: [name, µs per block, launches]
    (``count`` None: all of them). ``timeline``: a dict to fill with :func:`gpu_idle` of the
    same call."""
    from torch.profiler import ProfilerActivity, profile

    call()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        call()
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if t > 0:
            rows.append([e.key[:90], round(t / 2, 1), e.count / 2])
    if timeline is not None:
        timeline.update(gpu_idle(prof.events()))
    return sorted(rows, key=lambda r: -r[1])[:count]


def gpu_idle(events, top=6) -> dict:
    """Per block: the span from the call's first kernel start to its last kernel end, the time in
    it when no kernel ran (``idle_s``), and the longest gaps [µs, kernel before, kernel after].
    Idle inside the span is the GPU waiting for the host (launch overhead, a synchronization),
    which the kernel sums do not see; the block time (``do_bench``) includes it."""
    from torch.autograd import DeviceType

    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                     if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start)
    if not kernels:
        return {}
    gaps, reach, last = [], kernels[0][1], kernels[0][2]
    for start, end, name in kernels[1:]:
        if start > reach:
            gaps.append([round(start - reach, 1), last[:60], name[:60]])
        if end > reach:
            reach, last = end, name
    span = reach - kernels[0][0]
    idle = sum(g[0] for g in gaps)
    return {"span_s": span * 1e-6 / 2, "idle_s": idle * 1e-6 / 2, "gaps": len(gaps) / 2,
            "longest_gaps": sorted(gaps, key=lambda g: -g[0])[:top]}


def synchronizations(call, shown=5) -> dict:
    """Host-device synchronizations one call (two blocks) makes, as PyTorch's sync debug mode
    reports them: their count and the first messages (with the line that made each)."""
    import warnings

    call()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            call()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # (the mode's one-time "prototype feature" notice is not a synchronization)
    found = [w for w in caught if "called a synchronizing" in str(w.message)]
    return {"count": len(found), "first": [f"{w.filename}:{w.lineno}: {str(w.message)[:120]}" for w in found[:shown]]}


def graph_replay_time(call, bench) -> float:
    """One call captured in a CUDA graph and replayed: its time without host launch overhead."""
    for _ in range(2):
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    torch.cuda.synchronize()
    return bench(graph.replay)


def cpu_bench(fn, repeats=3):
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=list(MODELS), default="14b")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--ncu", action="store_true", help="also measure HBM bytes per mode with Nsight Compute")
    ap.add_argument("--profile", action="store_true",
                    help="record each mode's top kernels and the GPU's idle time in a call (torch.profiler)")
    ap.add_argument("--sync-debug", action="store_true",
                    help="count the host-device synchronizations of one call (torch.cuda sync debug mode)")
    ap.add_argument("--cuda-graph", action="store_true",
                    help="also time one call captured in a CUDA graph and replayed (block_graph_s)")
    ap.add_argument("--ncu-timeout", type=int, default=240)
    ap.add_argument("--ncu-child", choices=list(MODES), help="(internal) one profiled forward of this mode")
    args = ap.parse_args(argv)
    if args.ncu_child:
        return ncu_child(args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        from triton.testing import do_bench

        def bench(fn):
            # a W-14B call (two blocks) takes ~130 ms: with a 50 ms budget do_bench timed one
            # call after one warm-up, which caught first-call costs (an int8-attention block
            # measured 65 ms there and 57 ms in steady state)
            return do_bench(fn, warmup=400, rep=1000, return_mode="median") * 1e-3
    else:
        bench = cpu_bench

    out_dir = os.environ.get("OUT", "out")
    os.makedirs(out_dir, exist_ok=True)
    config, latent, text = MODELS[args.model]
    tokens = latent[1] * (latent[2] // 2) * (latent[3] // 2)
    import diffusers
    import triton

    res = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__, "triton": triton.__version__,
           "diffusers": diffusers.__version__, "date": time.strftime("%Y-%m-%d"), "model": args.model,
           "tokens": tokens, "sdpa_backend_note": "default F.scaled_dot_product_attention dispatch", "modes": {}}
    path = os.path.join(out_dir, f"block_{args.model}.json")

    def save():
        with open(path, "w") as f:
            json.dump(res, f, indent=1)

    blocks, inputs = block_inputs(args.model, device)
    res["attention_s"] = attention_time(config, tokens, text, device, bench)
    res["min_bytes_bf16"] = minimum_bytes(config, tokens, text, 2.0)
    res["min_bytes_nvfp4"] = minimum_bytes(config, tokens, text, 0.5625)
    with torch.no_grad():
        reference = blocks(*inputs).float()
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        entry = res["modes"].setdefault(mode, {})
        try:
            fn = compiled(mode, blocks)
            t0 = time.perf_counter()
            with torch.no_grad():
                out = fn(*inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    resident = torch.cuda.memory_allocated()
                entry["first_call_s"] = time.perf_counter() - t0
                entry["block_s"] = bench(lambda: fn(*inputs)) / 2
                if device == "cuda":
                    # what one call adds on top of what is resident (every mode's weights, inputs)
                    entry["activation_peak_gb"] = (torch.cuda.max_memory_allocated() - resident) / 1e9
                    if args.profile:
                        timeline = {}
                        rows = top_kernels(lambda: fn(*inputs), count=None, timeline=timeline)
                        entry["top_kernels"] = rows[:25]
                        entry.update(kernel_split(rows))
                        entry["timeline"] = timeline
                    if args.sync_debug:
                        entry["synchronizations"] = synchronizations(lambda: fn(*inputs))
                    if args.cuda_graph:
                        try:
                            entry["block_graph_s"] = graph_replay_time(lambda: fn(*inputs), bench) / 2
                        except Exception as exc:  # a capture-unsafe op: recorded, the rest still runs
                            entry["block_graph_s"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            if MODES[mode] and MODES[mode].get("attention") == "int8":
                res.setdefault("quantized_attention_s", attention_time(config, tokens, text, device, bench, True))
                entry["non_attention_s"] = entry["block_s"] - res["quantized_attention_s"]
            else:
                entry["non_attention_s"] = entry["block_s"] - res["attention_s"]
            entry["rel_l2_vs_eager"] = float((out.float() - reference).norm() / reference.norm())
            del out
        except Exception as exc:  # recorded; the other modes still run
            entry["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        print(mode, entry, flush=True)
        save()
    del blocks, inputs, reference
    torch.cuda.empty_cache() if device == "cuda" else None
    if args.ncu:
        for mode, entry in res["modes"].items():
            try:
                entry["hbm_bytes_measured"] = ncu_bytes(args.model, mode, args.ncu_timeout)
            except Exception as exc:
                entry["hbm_bytes_measured"] = {"error": f"{type(exc).__name__}: {exc}"}
            print(mode, "ncu", entry["hbm_bytes_measured"], flush=True)
            save()
    base = res["modes"].get("inductor", {})
    for mode, entry in res["modes"].items():
        if "block_s" in entry and "block_s" in base:
            entry["speedup_vs_inductor"] = base["block_s"] / entry["block_s"]
            entry["non_attention_speedup_vs_inductor"] = base["non_attention_s"] / entry["non_attention_s"]
    save()
    print(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
