"""Runs the passes in order, lints after each, records op counts, and dumps.

A pass is a function ``pass_fn(gm, ctx) -> None`` that rewrites ``gm.graph`` in
place. Each lives in its own file under ``passes/`` with a docstring contract. A pass
that implements an opt-in feature names its option in ``pass_fn.enabled_by``; it is
reported "off" (and not dumped) while that option is False. A pass marked ``pass_fn.opt_in``
runs only when ``options["passes"]`` switches it on.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Callable

import torch.fx as fx

from .context import CompileContext
from .dump import DumpWriter
from .fx_utils import op_counts

log = logging.getLogger("sixbit")

PassFn = Callable[[fx.GraphModule, CompileContext], None]


@dataclasses.dataclass
class PassRecord:
    name: str
    status: str  # "ran" | "disabled" (options["passes"]) | "off (needs <option>)" | "off (opt-in: ...)"
    seconds: float
    counts_before: dict[str, int]
    counts_after: dict[str, int]
    dump_file: str | None = None

    def delta(self) -> dict[str, int]:
        keys = set(self.counts_before) | set(self.counts_after)
        d = {k: self.counts_after.get(k, 0) - self.counts_before.get(k, 0) for k in keys}
        return {k: v for k, v in sorted(d.items()) if v}


class PassManager:
    def __init__(self, passes: list[tuple[str, PassFn]]):
        self.passes = passes

    def run(self, gm: fx.GraphModule, ctx: CompileContext, dump: DumpWriter | None = None) -> list[PassRecord]:
        records: list[PassRecord] = []
        if dump:
            dump.write_graph("captured", gm, ctx)
        for name, fn in self.passes:
            before = op_counts(gm.graph)
            if not ctx.options.pass_enabled(name):
                status = "disabled" if name in ctx.options.passes else f"off (opt-in: passes={{'{name}': True}})"
                records.append(PassRecord(name, status, 0.0, before, before))
                log.debug("sixbit: pass %s disabled by options", name)
                continue
            gate = getattr(fn, "enabled_by", None)
            if gate is not None and not getattr(ctx.options, gate):
                records.append(PassRecord(name, f"off (needs {gate})", 0.0, before, before))
                continue
            t0 = time.perf_counter()
            fn(gm, ctx)
            gm.graph.lint()
            gm.recompile()
            rec = PassRecord(name, "ran", time.perf_counter() - t0, before, op_counts(gm.graph))
            if dump:
                rec.dump_file = dump.write_graph(name, gm, ctx)
            records.append(rec)
        return records
