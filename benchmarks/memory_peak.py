"""What is alive at the peak: a CUDA memory-history recording replayed to its highest point.

    with PeakRecorder() as rec:
        model(...)
    rec.breakdown(top=15)  # {"peak_bytes", "baseline_bytes", "live_at_peak": [...]}

``baseline_bytes`` is what was allocated when the recording started (weights, caches);
``live_at_peak`` lists the allocations made during the recording that were still alive at
the peak, largest first, each with its size and the innermost Python frames that made it
(Inductor's generated modules show as their file and line). ``peak_from_trace`` is the
replay itself, separate so it is testable without a GPU.
"""

from __future__ import annotations

import torch

_SKIP_FRAMES = ("torch/", "<frozen", "contextlib.py", "functools.py", ".cpp", "??")


def _where(frames: list[dict], depth: int = 4) -> list[str]:
    """The innermost frames outside torch's own Python code (file:line function)."""
    out = []
    for f in frames:
        name = f.get("filename", "")
        if any(s in name for s in _SKIP_FRAMES) and "torchinductor" not in name:
            continue
        out.append(f"{'/'.join(name.split('/')[-2:])}:{f.get('line')} {f.get('name')}")
        if len(out) == depth:
            break
    return out


def peak_from_trace(events: list[dict], baseline: int, top: int = 15) -> dict:
    """Replay allocator events (``alloc`` / ``free_completed``) from ``baseline`` bytes."""
    live: dict[int, dict] = {}
    current = peak = baseline
    at_peak: list[dict] = []
    for e in events:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            current += e["size"]
        elif action == "free_completed":
            current -= e["size"]  # also frees of blocks allocated before the recording
            live.pop(e["addr"], None)
        else:
            continue
        if current > peak:
            peak, at_peak = current, list(live.values())
    at_peak.sort(key=lambda e: -e["size"])
    return {
        "peak_bytes": peak,
        "baseline_bytes": baseline,
        "live_at_peak_bytes": sum(e["size"] for e in at_peak),
        "live_at_peak": [{"mb": round(e["size"] / 1e6, 1), "where": _where(e.get("frames", []))} for e in at_peak[:top]],
    }


class PeakRecorder:
    def __init__(self, max_entries: int = 200_000):
        self.max_entries = max_entries
        self.snapshot = None
        self.baseline = 0

    def __enter__(self):
        torch.cuda.synchronize()
        self.baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.max_allocated = torch.cuda.max_memory_allocated()
        self.snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return False

    def breakdown(self, top: int = 15) -> dict:
        device = torch.cuda.current_device()
        events = self.snapshot["device_traces"][device]
        # The allocator's own peak over the same window, next to the replay's: they differ
        # when frees are deferred by record_stream (the replay counts them at free_completed).
        return {**peak_from_trace(events, self.baseline, top), "max_allocated_bytes": self.max_allocated}
