"""The temporal delta cache policy (TDC): which blocks to skip at a model call.

Per CFG branch and block, from the statistics the block left when it last computed
(read at the decision point, no extra sync):

* (a) its residual was stable: the residual change ‖Δ_t − Δ_{t−1}‖₁ / ‖Δ_{t−1}‖₁ measured
  at its last compute is under ``threshold``;
* (b) the accumulated error estimate stays within ``tau``: each skip adds that change
  (ours: the residual drifts by about that much per step), and the skip is allowed only if
  E_acc + change ≤ tau;
* (c) fewer than ``max_skips`` consecutive skips.

The first ``first_steps`` and last ``last_steps`` steps of a generation always compute
(the last ones only once the number of steps is known, from an earlier finished generation
with the same first two timesteps). A compute resets E_acc and the skip counter. Thresholds are ours
and the presets (options.PRESETS) set them from residual changes measured on the reference
model.
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass(frozen=True)
class TDCParams:
    threshold: float = 0.1
    tau: float = 0.2
    max_skips: int = 2
    first_steps: int = 1
    last_steps: int = 1


@dataclasses.dataclass
class BlockState:
    change: float = math.nan  # residual change measured at the last compute
    e_acc: float = 0.0
    skips: int = 0  # consecutive skips


class TDCPolicy:
    def __init__(self, params: TDCParams):
        self.params = params
        self.state: dict[tuple[int, int], BlockState] = {}

    def reset(self) -> None:
        self.state.clear()

    def observe(self, branch: int, block: int, change: float) -> None:
        """A computed block's residual change (from its statistics)."""
        st = self.state.setdefault((branch, block), BlockState())
        st.change, st.e_acc, st.skips = change, 0.0, 0

    def plan(self, step: int, branch: int, num_blocks: int, total_steps: int | None) -> frozenset[int]:
        p = self.params
        if step < p.first_steps or (total_steps is not None and step >= total_steps - p.last_steps):
            return frozenset()
        skip = set()
        for block in range(num_blocks):
            st = self.state.get((branch, block))
            if st is None or math.isnan(st.change) or st.skips >= p.max_skips:
                continue
            if st.change < p.threshold and st.e_acc + st.change <= p.tau:
                skip.add(block)
        return frozenset(skip)

    def skipped(self, branch: int, block: int) -> None:
        st = self.state[(branch, block)]
        st.e_acc += st.change
        st.skips += 1
