"""Host <-> device copy bandwidth with pinned memory: what the host block cache moves per entry.

    python benchmarks/pcie.py [--mb 168]

Times (CUDA events, median of 10) a host-to-device copy, a device-to-host copy, and both at
once on two streams, of one buffer the size of a W-14B cache entry (32,760 tokens x 5,120
INT8 codes, 168 MB). Prints GB/s and writes $OUT/pcie.json.
"""

from __future__ import annotations

import argparse
import json

import torch

from _results import write_json


def _median_ms(fn, reps=10):
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=32760 * 5120 / 1e6)
    args = ap.parse_args(argv)
    n = int(args.mb * 1e6)
    host_in = torch.empty(n, dtype=torch.uint8, pin_memory=True).fill_(1)
    host_out = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    dev_in, dev_out = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.ones(n, dtype=torch.uint8, device="cuda")
    s_in, s_out = torch.cuda.Stream(), torch.cuda.Stream()

    def both():
        main = torch.cuda.current_stream()
        for s in (s_in, s_out):
            s.wait_stream(main)
        with torch.cuda.stream(s_in):
            dev_in.copy_(host_in, non_blocking=True)
        with torch.cuda.stream(s_out):
            host_out.copy_(dev_out, non_blocking=True)
        main.wait_stream(s_in)
        main.wait_stream(s_out)

    ms = {
        "h2d": _median_ms(lambda: dev_in.copy_(host_in, non_blocking=True)),
        "d2h": _median_ms(lambda: host_out.copy_(dev_out, non_blocking=True)),
        "both": _median_ms(both),
    }
    result = {"card": torch.cuda.get_device_name(), "bytes": n,
              **{f"{k}_ms": round(v, 3) for k, v in ms.items()},
              **{f"{k}_gb_s": round((2 if k == "both" else 1) * n / v / 1e6, 1) for k, v in ms.items()}}
    print(json.dumps(result))
    write_json("pcie.json", result)
    return result


if __name__ == "__main__":
    main()
