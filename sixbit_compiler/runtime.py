"""The sixbit runtime: one per compiled model.

It sits between Dynamo and the transformed graph. On every model call it

1. works out where the call sits in the sampling loop (:class:`StepTracker`):
   the generation, the denoising step, and the CFG branch;
2. takes the once-per-call decision: it fills the precision-slot tensor that
   every ``sixbit::quantized_linear`` reads (static policy: the ``activation``
   option). All device values the decision needs are read in **one**
   device-to-host transfer (today: the timestep; with the dynamic policy, also
   the block statistics of the previous call), so a call costs at most one sync;
3. assembles the graph's inputs: Dynamo's arguments, minus released weights,
   plus each quantized weight looked up by the Parameter that arrived;
4. records what ran, for :func:`stats`.

A runtime is found again from any Parameter of its model, so recompiles (new
resolution) share it, and two compiled models never share one.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import weakref
from typing import Any, Callable, Sequence

import torch

from .context import InputSpec
from .delta_store import StoredDelta, make_delta_store
from .formats import Precision
from .options import SixbitOptions
from .policy import TDCParams, TDCPolicy
from .weight_store import STORE

log = logging.getLogger("sixbit")


@dataclasses.dataclass
class CallRecord:
    generation: int
    step: int
    branch: int
    timestep: float | None
    batch: int | None
    precisions: bytes  # one Precision code per slot, as used by this call
    syncs: int  # device-to-host transfers this call made (at most one)
    skipped: list[int] = dataclasses.field(default_factory=list)  # block indices reused from the cache
    # block index -> (Γ, residual change) measured by this call (read at the next call)
    block_stats: dict[int, tuple[float, float]] = dataclasses.field(default_factory=dict)


class StepTracker:
    """Generation / step / CFG-branch bookkeeping from the timestep and the conditioning tensor.

    Rules (timesteps decrease within a generation in every diffusers sampler):

    * first call, or the timestep goes back up: a new generation (a new prompt's
      generation starts at the top of the schedule, so this is how it shows);
    * the same timestep as the previous call: the next CFG branch of the same step
      (Wan's pipeline calls the model once per branch) -- unless the same
      conditioning tensor comes again at this step, which means a restart;
    * a lower timestep: the next step. A conditioning tensor never seen before does not
      start a generation here: loops that build the embeddings every step (a fresh
      tensor each time) must keep one generation.

    Batched CFG (CogVideoX) shows up as branch 0 with batch 2. Without a timestep
    input every call is its own step; :meth:`reset` starts a generation explicitly.
    """

    def __init__(self):
        self.generation = -1
        self.step = -1
        self.branch = 0
        self.last_t: float | None = None
        self._step_conds: set[int] = set()
        self._pending_new_generation = True

    def reset(self) -> None:
        """The next call starts a new generation (generation numbers keep counting)."""
        self._pending_new_generation = True

    def advance(self, t: float | None, cond_key: int | None) -> bool:
        """Place one call; returns True if it starts a new generation."""
        new_gen = self._pending_new_generation
        if not new_gen:
            if t is None or self.last_t is None:
                self._next_step()
            elif t > self.last_t:
                new_gen = True
            elif t == self.last_t:
                if cond_key is not None and cond_key in self._step_conds:
                    new_gen = True
                else:
                    self.branch += 1
            else:
                self._next_step()
        if new_gen:
            self.generation += 1
            self.step, self.branch = 0, 0
            self._step_conds = set()
            self._pending_new_generation = False
        self.last_t = t
        if cond_key is not None:
            self._step_conds.add(cond_key)
        return new_gen

    def _next_step(self) -> None:
        self.step, self.branch = self.step + 1, 0
        self._step_conds = set()


class SixbitRuntime:
    #: Call records are kept for this many recent generations, so a long-running server's
    #: runtime stays small; stats() reports over them.
    HISTORY_GENERATIONS = 8

    def __init__(self, options: SixbitOptions, name: str = "model"):
        self.options = options
        self.name = name
        self.slot_names: list[str] = []
        self.slot_blocks: list[str | None] = []
        self._slot_index: dict[str, int] = {}
        self.precision_slots = torch.zeros(0, dtype=torch.int8)
        self.tracker = StepTracker()
        self.records: list[CallRecord] = []
        self.compiles = 0
        self.block_names: list[str] = []
        self.forced: Precision | None = None
        # Block cache state (block_regions): residuals per (CFG branch, block), this call's plan.
        self.keeps_residuals = options.block_cache
        self.skip_schedule: Callable[[int, int], Any] | None = None
        self._deltas = make_delta_store(options.cache_location)
        # Block statistics of the last call, still on the device: block -> [Γ, change].
        self._pending_stats: dict[int, torch.Tensor] = {}
        self.policy = None
        if options.block_cache and options.cache_policy == "tdc":
            self.policy = TDCPolicy(
                TDCParams(options.cache_threshold, options.cache_tau, options.cache_max_skips,
                          options.cache_first_steps, options.cache_last_steps)
            )
        self._skipped_at_last_call: set[tuple[int, int]] = set()  # (branch, block), for PDR
        # DMPQ / PDR inputs, per CFG branch: Γ of each block at its last call (NaN: none, or
        # skipped) and each slot's last outlier ratio max|x| / mean|x| (NaN: not measured).
        self._gamma: dict[int, torch.Tensor] = {}
        self._outliers: dict[int, torch.Tensor] = {}
        self._flat_stats: tuple[torch.Tensor, list[int]] | None = None  # a graph's Γ output, on the device
        self._pending_outlier_counts: dict[int, int] = {}
        self._predictor: tuple[int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.calibration = None
        self.dmpq_budget = options.dmpq_budget
        self._logged_generation = -1
        self._generation_start: float | None = None  # first timestep of this generation
        self._generation_second: float | None = None  # its second step's timestep
        # (first, second timestep) -> steps, learned from generations that ran to the end (a
        # schedule's first two timesteps identify it; an interrupted generation teaches nothing)
        self._schedules: dict[tuple[float, float], int] = {}
        self._skip_plan: frozenset[int] = frozenset()
        self._lock = threading.Lock()

    # ---- compile time -------------------------------------------------------------
    def slot_for(self, layer: str, block: str | None) -> int:
        """Stable precision slot for a layer path (the same across recompiles)."""
        if layer not in self._slot_index:
            self._slot_index[layer] = len(self.slot_names)
            self.slot_names.append(layer)
            self.slot_blocks.append(block)
            slots = torch.full((len(self.slot_names),), int(self.options.precision), dtype=torch.int8)
            slots[: self.precision_slots.numel()] = self.precision_slots
            self.precision_slots = slots
        return self._slot_index[layer]

    def wrap(self, compiled: Callable, specs: Sequence[InputSpec], dynamo_names: Sequence[str],
             stats_blocks: list[int] | None = None) -> Callable:
        """The callable handed back to Dynamo: Dynamo's args in, the graph's outputs out.

        With ``stats_blocks`` the graph has one extra output (precision_guards' Γ vector):
        it is kept on the device for the next call's decision and not returned."""
        t_index = _find_input(dynamo_names, self.options.timestep_input or ("timestep", "timesteps", "t"))
        cond_index = _find_input(dynamo_names, ("encoder_hidden_states", "context", "cond", "y"))
        x_index = _find_input(dynamo_names, ("hidden_states", "x", "latents", "sample"))
        resolve = InputResolver(specs, self)

        def sixbit_call(*args):
            self.begin_call(
                args[t_index] if t_index is not None else None,
                args[cond_index] if cond_index is not None else None,
                args[x_index] if x_index is not None else None,
            )
            out = compiled(*resolve(args))
            if stats_blocks is None:
                return out
            self._flat_stats = (out[-1], stats_blocks)
            return type(out)(out[:-1]) if isinstance(out, (tuple, list)) else out

        sixbit_call._sixbit_runtime = self  # type: ignore[attr-defined]
        return sixbit_call

    # ---- per call -------------------------------------------------------------------
    def begin_call(self, timestep, cond, hidden) -> None:
        """The once-per-call decision point (at most one device-to-host sync).

        Everything on the device that the decision needs (the timestep, and the block
        statistics the previous call left) travels to the host in one transfer.
        """
        with self._lock:
            self._begin_call(timestep, cond, hidden)

    def _begin_call(self, timestep, cond, hidden) -> None:
        t, syncs = None, 0
        device_values = []
        if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
            device_values.append(timestep.reshape(-1)[:1].to(torch.float32))
        elif isinstance(timestep, (int, float)):
            t = float(timestep)
        pending = self._pending_vectors()
        if pending:
            dev = pending[0].device
            device_values = [v.to(dev) for v in device_values] + pending
        if device_values:
            values = torch.cat(device_values)
            syncs = int(values.device.type != "cpu")  # the single transfer of this call
            values = values.tolist()
            if isinstance(timestep, torch.Tensor) and timestep.numel() > 0:
                t, values = values[0], values[1:]
            self._take_pending(values)
        cond_key = cond.data_ptr() if isinstance(cond, torch.Tensor) else None
        last_step, last_t = self.tracker.step, self.tracker.last_t
        new_gen = self.tracker.advance(t, cond_key)
        if new_gen:
            if self.records:
                self._log_generation_summary(self.records[-1].generation)  # before its cache is dropped
            self._deltas.clear()  # cached residuals never cross generations
            self._skipped_at_last_call.clear()
            self._gamma.clear()
            self._outliers.clear()
            if self.policy:
                self.policy.reset()
            if self.records:
                self._learn_schedule(last_step + 1, last_t)
                oldest_kept = self.tracker.generation - self.HISTORY_GENERATIONS + 1
                if self.records[0].generation < oldest_kept:
                    self.records = [r for r in self.records if r.generation >= oldest_kept]
            self._generation_start, self._generation_second = t, None
        elif self.tracker.step == 1 and self._generation_second is None:
            self._generation_second = t
        self.decide()
        batch = int(hidden.shape[0]) if isinstance(hidden, torch.Tensor) and hidden.dim() > 0 else None
        self.records.append(
            CallRecord(
                self.tracker.generation, self.tracker.step, self.tracker.branch, t, batch,
                self.precision_slots.numpy().tobytes(), syncs,
            )
        )

    def decide(self) -> None:
        """Set every precision slot and the block skip plan for this call.

        Static policy: the ``activation`` option (or :func:`set_activation`), and the skip
        schedule set with :func:`set_skip_schedule` (none: every block computes).
        """
        step, branch = self.tracker.step, self.tracker.branch
        if self.forced is None and self.options.dynamic:
            self._dmpq(branch)
        else:
            self.precision_slots.fill_(int(self.forced if self.forced is not None else self.options.precision))
        if self.skip_schedule is not None:
            plan = self.skip_schedule(step, branch)
        elif self.policy is not None:
            plan = self.policy.plan(step, branch, len(self.block_names), self.expected_steps())
        else:
            plan = ()
        self._skip_plan = frozenset(plan or ())
        self._purified_refresh(branch)
        self._outlier_refresh(branch)

    def _dmpq(self, branch: int) -> None:
        """DMPQ: NVFP4 activations where α·Γ_{t−1} + β ≤ budget, else INT8 (also where the
        block has no Γ from this branch's previous call: first step, or it was skipped)."""
        n = len(self.slot_names)
        if self._predictor is None or self._predictor[0] != n:
            from .calibration import Calibration

            if self.calibration is None:
                self.calibration = Calibration.load(self.options.calibration)
                if self.dmpq_budget is None:
                    self.dmpq_budget = self.calibration.default_budget
            alpha, beta = self.calibration.coefficients(self.slot_names, self.slot_blocks)
            index = {name: i for i, name in enumerate(self.block_names)}
            block_of_slot = torch.tensor([index.get(b, -1) for b in self.slot_blocks], dtype=torch.long)
            self._predictor = (n, torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64),
                               block_of_slot)
        _, alpha, beta, block_of_slot = self._predictor
        gamma = self._gamma.get(branch)
        if gamma is None or gamma.numel() == 0:
            self.precision_slots.fill_(int(Precision.INT8))
            return
        g = torch.where(block_of_slot >= 0, gamma[block_of_slot.clamp(min=0)], torch.tensor(math.nan, dtype=torch.float64))
        nvfp4 = (alpha * g + beta) <= self.dmpq_budget  # NaN compares False: INT8
        self.precision_slots.copy_(torch.where(nvfp4, int(Precision.NVFP4), int(Precision.INT8)).to(torch.int8))

    #: PDR's first rule: a layer whose activation outlier ratio max|x| / mean|x| exceeded this
    #: at its last compute runs bf16 when its block computes (and so refreshes the cache).
    PDR_OUTLIER_RATIO = 25.0

    def _outlier_refresh(self, branch: int) -> None:
        ratios = self._outliers.get(branch)
        if ratios is None or not self.keeps_residuals:
            return
        outlier = ratios > self.PDR_OUTLIER_RATIO
        if self._skip_plan:
            skipped = {self.block_names[i] for i in self._skip_plan if i < len(self.block_names)}
            outlier &= torch.tensor([b not in skipped for b in self.slot_blocks], dtype=torch.bool)
        self.precision_slots[outlier] = int(Precision.BF16)

    def _block_slots(self) -> dict[int, list[int]]:
        index = {name: i for i, name in enumerate(self.block_names)}
        out: dict[int, list[int]] = {}
        for slot, block in enumerate(self.slot_blocks):
            if block in index:
                out.setdefault(index[block], []).append(slot)
        return out

    def _purified_refresh(self, branch: int) -> None:
        """PDR, second rule: the first compute of a block after a skip refreshes its cached
        residual, so its linears run INT8 rather than NVFP4 (keeps NVFP4 noise out of the
        cache). (The first rule, bf16 for layers with max|x|/mean|x| > 25 on a refresh,
        needs the per-layer outlier ratios: issue 4.)"""
        if not self._skipped_at_last_call:
            return
        refreshing = {self.block_names[i] for (b, i) in self._skipped_at_last_call
                      if b == branch and i not in self._skip_plan and i < len(self.block_names)}
        if refreshing:
            in_block = torch.tensor([block in refreshing for block in self.slot_blocks], dtype=torch.bool)
            self.precision_slots[in_block & (self.precision_slots == int(Precision.NVFP4))] = int(Precision.INT8)

    #: A generation counts as finished (and teaches its step count) when its last timestep is
    #: at most this fraction of its first: samplers end near t = 0.
    FINISHED_FRACTION = 0.05

    def _learn_schedule(self, steps: int, last_t: float | None) -> None:
        t0, t1 = self._generation_start, self._generation_second
        if t0 is None or t1 is None or last_t is None or t0 <= 0 or last_t > self.FINISHED_FRACTION * t0:
            return  # no timesteps, a single step, or interrupted: nothing to learn
        self._schedules[(t0, t1)] = steps

    def expected_steps(self) -> int | None:
        """Steps in this generation, if an earlier finished generation ran the same schedule
        (same first two timesteps); None until this generation's second step."""
        if self._generation_start is None or self._generation_second is None:
            return None
        return self._schedules.get((self._generation_start, self._generation_second))

    def _take_block_stats(self, record: CallRecord, stats: dict[int, tuple[float, float]],
                          outliers: dict[int, list[float]]) -> None:
        """Record a call's block statistics and feed DMPQ's Γ table, PDR's outlier ratios and
        the skip policy, for that call's CFG branch."""
        record.block_stats = dict(sorted(stats.items()))
        n_blocks = len(self.block_names)
        gamma = self._gamma.setdefault(record.branch, torch.full((n_blocks,), math.nan, dtype=torch.float64))
        for index, (g, change) in record.block_stats.items():
            if index < n_blocks:
                gamma[index] = g
            if self.policy is not None:
                self.policy.observe(record.branch, index, change)
        if outliers:
            ratios = self._outliers.setdefault(record.branch, torch.full((len(self.slot_names),), math.nan))
            block_slots = self._block_slots()
            for index, values in outliers.items():
                slots = block_slots.get(index, [])
                if len(slots) == len(values):
                    ratios[slots] = torch.tensor(values)

    # ---- called by BlockRunner during the call (no syncs) ---------------------------
    def _cache_kernels(self, x: torch.Tensor) -> bool:
        """Whether the fused cache kernels (kernels/cache.py) serve this stream (INT8 storage)."""
        from .kernels import cache_kernels_take
        from .ops import use_kernels

        return self.options.cache_dtype == "int8" and cache_kernels_take(x) and use_kernels()

    def skip_outputs(self, index: int, inputs: list[torch.Tensor]) -> list[torch.Tensor] | None:
        """X + Δ_cached for each residual stream if block ``index`` is skipped in this call, else None.

        A residual cached at another shape (a new resolution within what looked like one
        generation) is never added: the block computes and refreshes it. Called at the start
        of every cacheable block, so it also starts the host cache's prefetches: a computing
        block's own entry (its copy overlaps the block) and, ahead of a skip, the next one.
        """
        key = (self.tracker.branch, index)
        if index not in self._skip_plan:
            self._deltas.prefetch(key)
            if index + 1 in self._skip_plan:
                self._deltas.prefetch((key[0], index + 1))
            return None
        shapes = self._deltas.shapes(key)
        if shapes is None or any(s != x.shape for s, x in zip(shapes, inputs)):
            return None
        stored = self._deltas.get(key)
        if index + 1 in self._skip_plan:
            self._deltas.prefetch((key[0], index + 1))
        if self.records:
            self.records[-1].skipped.append(index)
        if self.policy is not None and self.skip_schedule is None:
            self.policy.skipped(self.tracker.branch, index)
        self._skipped_at_last_call.add(key)
        gamma = self._gamma.get(self.tracker.branch)
        if gamma is not None and index < gamma.numel():
            gamma[index] = math.nan  # skipped at this call: no Γ for the next one (DMPQ: INT8)
        outs = []
        for x, d in zip(inputs, stored):
            if d.scale is not None and d.data.dtype == torch.int8 and self._cache_kernels(x):
                from .kernels.cache import apply_delta

                outs.append(apply_delta(x, d.data, d.scale))
            else:
                outs.append(x + d.load())
        return outs

    def block_computed(self, index: int, inputs: list[torch.Tensor], outputs: list[torch.Tensor],
                       outliers: torch.Tensor | None = None) -> None:
        """Refresh the cached residual Δ = Y − X of a computed block and queue its statistics.

        On the first residual stream: Γ = ‖Δ‖₁ / ‖X‖₁ (the block's input-output difference)
        and the residual change ‖Δ_t − Δ_prev‖₁ / ‖Δ_prev‖₁ against the residual cached
        for this branch (NaN when there is none). Both stay on the device until the next
        call's single transfer. On CUDA with INT8 storage one fused kernel per stream
        computes Δ, its INT8 codes and the sums (kernels/cache.py); elsewhere, torch ops with
        the same numerics.
        """
        key = (self.tracker.branch, index)
        shapes = self._deltas.shapes(key)
        prev = self._deltas.get(key) if shapes is not None else None
        stored, gamma, change = [], None, None
        for k, (x, y) in enumerate(zip(inputs, outputs)):
            p = prev[k] if prev is not None and k < len(prev) and prev[k].shape == x.shape else None
            if self._cache_kernels(x) and (p is None or p.data.dtype == torch.int8):
                from .kernels.cache import delta_refresh

                codes, scales, sums = delta_refresh(x, y, (p.data, p.scale) if p is not None else None)
                stored.append(StoredDelta(codes, scales, x.dtype))
                if k == 0:
                    gamma = sums[0] / sums[1]
                    change = sums[2] / sums[3] if p is not None else None
                continue
            d = y - x
            if k == 0:
                df = d.float()
                gamma = df.abs().sum() / x.float().abs().sum()
                if p is not None:
                    pf = p.load().float()
                    change = (df - pf).abs().sum() / pf.abs().sum()
            stored.append(StoredDelta.store(d, self.options.cache_dtype))
        if change is None:
            change = torch.full((), float("nan"), device=gamma.device)
        vector = torch.stack([gamma, change])
        if outliers is not None:  # PDR's outlier ratios of the block's layers (precision_guards)
            vector = torch.cat([vector, outliers.reshape(-1).float().to(vector.device)])
            self._pending_outlier_counts[index] = outliers.numel()
        self._pending_stats[index] = vector
        self._skipped_at_last_call.discard(key)
        self._deltas.put(key, stored)

    def flush_block_stats(self) -> None:
        """Read the last call's pending block statistics now (one sync; for stats())."""
        with self._lock:
            pending = self._pending_vectors()
            if pending:
                self._take_pending(torch.cat([p.to(pending[0].device) for p in pending]).tolist())

    def _pending_vectors(self) -> list[torch.Tensor]:
        """The device vectors the last call left: the graph's Γ output, then per computed block
        [Γ, change, outlier ratios...] in block order."""
        out = [self._flat_stats[0].reshape(-1).float()] if self._flat_stats is not None else []
        return out + [v for _, v in sorted(self._pending_stats.items())]

    def _take_pending(self, values: list[float]) -> None:
        """Attach the host copy of the pending statistics to the call that measured them."""
        record = self.records[-1] if self.records else None
        stats: dict[int, tuple[float, float]] = {}
        outliers: dict[int, list[float]] = {}
        if self._flat_stats is not None:  # [Σ|Δ|, Σ|X|] per block: Γ is their ratio
            blocks = self._flat_stats[1]
            stats.update({b: (_ratio(values[2 * k], values[2 * k + 1]), math.nan) for k, b in enumerate(blocks)})
            values = values[2 * len(blocks):]
        for index, _ in sorted(self._pending_stats.items()):
            n = self._pending_outlier_counts.get(index, 0)
            stats[index] = (values[0], values[1])
            if n:
                outliers[index] = values[2 : 2 + n]
            values = values[2 + n :]
        self._flat_stats, self._pending_stats, self._pending_outlier_counts = None, {}, {}
        if record is not None:
            self._take_block_stats(record, stats, outliers)

    def cache_bytes(self) -> int:
        """Bytes of the cached residuals held now (on the device or in host memory)."""
        return self._deltas.entry_bytes()

    def reset(self) -> None:
        """Forget all per-generation state: the next call starts a new generation."""
        with self._lock:
            if self.records and not self.tracker._pending_new_generation:
                self._log_generation_summary(self.records[-1].generation)
            self.tracker.reset()
            self._deltas.clear()
            self._pending_stats, self._pending_outlier_counts, self._flat_stats = {}, {}, None
            self._skipped_at_last_call.clear()
            self._gamma.clear()
            self._outliers.clear()
            if self.policy:
                self.policy.reset()

    def free_cache_memory(self) -> None:
        """Release whatever the block cache keeps allocated between generations."""
        with self._lock:
            self._deltas.release()

    def _log_generation_summary(self, generation: int) -> None:
        """One log line per finished generation (and, with a dump dir, its blocks x calls heatmap).
        A generation is known to be finished when the next one starts, or at reset()."""
        records = [r for r in self.records if r.generation == generation]
        if not records or generation == self._logged_generation:
            return
        self._logged_generation = generation
        s = summarize(records, self)
        log.info(
            "sixbit: generation %d of %s: %d calls, %d steps, skip rate %.2f, precision %s, avg activation bits %.2f "
            "(computed layers), cache %.1f MB on the %s, syncs/call %.2f",
            generation, self.name, s["calls"], s["steps"], s["skip_rate"], s["precision_counts"], s["avg_activation_bits"],
            self.cache_bytes() / 2**20, self._deltas.location, s["syncs_per_call"],
        )
        if self.options.dump_dir and self.block_names and s["steps"] > 1:  # not for a lone warm-up call
            import os

            from .heatmap import write_heatmap

            try:
                os.makedirs(self.options.dump_dir, exist_ok=True)
                write_heatmap(os.path.join(self.options.dump_dir, f"heatmap_generation{generation:03d}.png"),
                              records, self.block_names, self.slot_blocks)
            except Exception as exc:  # a picture must never break a generation
                log.warning("sixbit: could not write the heatmap: %s", exc)


def _ratio(a: float, b: float) -> float:
    return a / b if b != 0 else (math.nan if a == 0 or math.isnan(a) else math.inf)


class InputResolver:
    """Maps Dynamo's args to the transformed graph's inputs, caching the weight lookups.

    Used per call by the runtime, and once at compile time to build example inputs.
    """

    def __init__(self, specs: Sequence[InputSpec], runtime: SixbitRuntime):
        self.specs = list(specs)
        self.runtime = runtime
        self.weight_arg_indices = sorted({s.index for s in self.specs if s.kind == "qweight"})
        self._cached_params: list[Any] | None = None
        self._cached_weights: dict[int, Any] = {}

    def __call__(self, args) -> list[Any]:
        params = [args[i] for i in self.weight_arg_indices]
        if self._cached_params is None or any(a is not b for a, b in zip(params, self._cached_params)):
            weights = {}
            for i in self.weight_arg_indices:
                qw = STORE.get(args[i])
                if qw is None:
                    raise RuntimeError(
                        "sixbit: a Parameter reaching a compiled graph has no quantized weight in the store "
                        f"(Dynamo input {i}, shape {tuple(args[i].shape)}). Was the model's weight replaced after compile?"
                    )
                weights[i] = qw
            self._cached_params, self._cached_weights = params, weights
        out = []
        for s in self.specs:
            if s.kind == "arg":
                out.append(args[s.index])
            elif s.kind == "qweight":
                out.append(getattr(self._cached_weights[s.index], s.field))
            else:
                out.append(self.runtime.precision_slots)
        return out


def _find_input(names: Sequence[str], wanted) -> int | None:
    wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted)
    cleaned = [_clean_input_name(n) for n in names]
    for w in wanted:
        for i, n in enumerate(cleaned):
            if n == w:
                return i
    return None


def _clean_input_name(name: str) -> str:
    for prefix in ("l_kwargs_", "l_args_", "l_"):
        if name.startswith(prefix):
            name = name[len(prefix):]
            break
    return name.rstrip("_")


# ---- registry: model -> runtime -------------------------------------------------------
_OWNERS: dict[int, tuple[weakref.ref, SixbitRuntime]] = {}


def runtime_for_inputs(example_inputs, options: SixbitOptions) -> SixbitRuntime:
    """The runtime that owns these Parameters (a recompile), or a new one."""
    params = [p for p in example_inputs if isinstance(p, torch.nn.Parameter)]
    for p in params:
        entry = _OWNERS.get(id(p))
        if entry is not None and entry[0]() is p:
            rt = entry[1]
            if rt.options != options:
                raise ValueError(
                    "sixbit: this model was already compiled with different options; "
                    f"was {rt.options}, now {options}. Its weights are quantized (and possibly released) "
                    "under the first options."
                )
            break
    else:
        rt = SixbitRuntime(options)
    for p in params:
        key = id(p)
        _OWNERS[key] = (weakref.ref(p, lambda _r, key=key, owners=_OWNERS: owners.pop(key, None)), rt)
    return rt


def runtime_of(model: torch.nn.Module) -> SixbitRuntime:
    """The runtime of a model compiled with backend='sixbit' (the compiled or the original module)."""
    for p in model.parameters():
        entry = _OWNERS.get(id(p))
        if entry is not None and entry[0]() is p:
            return entry[1]
    raise LookupError(
        "sixbit: this model has no sixbit runtime: it was not compiled with backend='sixbit', "
        "or it has not been called yet (torch.compile compiles on the first call)."
    )


def summarize(records: list[CallRecord], rt: SixbitRuntime) -> dict:
    """Counts over computed layers only: a skipped block's layers are not 0-bit work."""
    counts = {p.name.lower(): 0 for p in Precision}
    skipped_blocks = 0
    for r in records:
        skipped = {rt.block_names[i] for i in r.skipped if i < len(rt.block_names)}
        skipped_blocks += len(r.skipped)
        for code, block in zip(r.precisions, rt.slot_blocks):
            if block not in skipped:
                counts[Precision(code).name.lower()] += 1
    total = sum(counts.values())
    bits = sum(Precision[k.upper()].bits * v for k, v in counts.items()) / total if total else 0.0
    steps = {(r.generation, r.step) for r in records}
    return {
        "calls": len(records),
        "steps": len(steps),
        "precision_counts": counts,
        "avg_activation_bits": bits,
        "skip_rate": skipped_blocks / (len(records) * len(rt.block_names)) if records and rt.block_names else 0.0,
        "skipped_blocks": skipped_blocks,
        "syncs_per_call": sum(r.syncs for r in records) / len(records) if records else 0.0,
    }


def stats(model: torch.nn.Module) -> dict:
    """What the compiled model ran: a summary plus one entry per model call, over the
    last ``SixbitRuntime.HISTORY_GENERATIONS`` generations (older calls are dropped).

    ``summary``: calls, generations, steps, ``precision_counts`` (layer-calls per
    precision), ``avg_activation_bits`` over computed layers, ``skip_rate`` (0 until
    the block cache lands), ``syncs_per_call``, compiles, quantized layers and blocks.
    ``last_generation``: the same counts for the latest generation only.
    ``calls``: per call, its generation, step, CFG branch, timestep, batch and the
    precision of every quantized layer.
    """
    rt = runtime_of(model)
    rt.flush_block_stats()
    summary = summarize(rt.records, rt)
    summary.update(
        generations=rt.tracker.generation + 1,
        compiles=rt.compiles,
        quantized_layers=len(rt.slot_names),
        blocks=len(rt.block_names),
        cache_bytes=rt.cache_bytes(),
    )
    calls = [
        {
            "generation": r.generation,
            "step": r.step,
            "branch": r.branch,
            "timestep": r.timestep,
            "batch": r.batch,
            "skipped_blocks": list(r.skipped),
            "block_stats": dict(r.block_stats),
            "layers": {name: Precision(code).name.lower() for name, code in zip(rt.slot_names, r.precisions)},
        }
        for r in rt.records
    ]
    last = [r for r in rt.records if r.generation == rt.tracker.generation]
    return {
        "summary": summary,
        "last_generation": summarize(last, rt),
        "calls": calls,
        "layers": list(rt.slot_names),
        "blocks": list(rt.block_names),
    }


def set_activation(model: torch.nn.Module, activation: str | None) -> None:
    """Run every quantized linear at ``activation`` ("nvfp4", "int8", "bf16") from the next
    call on, without recompiling; ``None`` returns to the compile-time option."""
    runtime_of(model).forced = None if activation is None else Precision.parse(activation)


def set_skip_schedule(model: torch.nn.Module, schedule: Callable[[int, int], Any] | None) -> None:
    """Force which blocks reuse their cached residual: ``schedule(step, branch)`` returns the
    block indices to skip at that call (None: compute everything). Needs
    ``options={"block_cache": True}``. A block is only skipped once it has a cached residual
    from an earlier step of the same generation and CFG branch. For measuring the cache
    mechanism apart from any policy (see :func:`evenly_spaced_skips`)."""
    rt = runtime_of(model)
    if schedule is not None and not rt.keeps_residuals:
        raise ValueError("sixbit: set_skip_schedule needs the model compiled with options={'block_cache': True}")
    rt.skip_schedule = schedule


def evenly_spaced_skips(num_blocks: int, fraction: float, compute_first_steps: int = 1):
    """A schedule skipping ``fraction`` of the blocks, evenly spread, at every step after the
    first ``compute_first_steps`` (which compute everything and fill the cache)."""
    n_skip = round(num_blocks * fraction)
    chosen = frozenset(int((i + 0.5) * num_blocks / n_skip) for i in range(n_skip)) if n_skip else frozenset()

    def schedule(step: int, branch: int):
        return chosen if step >= compute_first_steps else ()

    return schedule


def reset(model: torch.nn.Module, free_cache_memory: bool = False) -> None:
    """Start a new generation on the next call (e.g. after an interrupted one).

    The block cache's entries are dropped either way; its pinned host buffers
    (``cache_location="host"``) are kept for the next generation unless
    ``free_cache_memory`` (e.g. before switching a server to another model)."""
    rt = runtime_of(model)
    rt.reset()
    if free_cache_memory:
        rt.free_cache_memory()


def _cache_bytes(model: torch.nn.Module) -> dict:
    try:
        store = runtime_of(model)._deltas
    except LookupError:
        return {"cache_bytes": 0, "cache_location": None, "cache_pinned_host_bytes": 0}
    return {"cache_bytes": store.entry_bytes(), "cache_location": store.location,
            "cache_pinned_host_bytes": store.host_bytes()}


def memory_report(model: torch.nn.Module) -> dict:
    """Parameter bytes before and after sixbit, measured from the storages.

    ``before_bytes``: every parameter at its original size. ``after_bytes``: what is
    resident now: unreleased parameters at their storage size plus the quantized
    weights in the store. Released parameters count 0 (their storage is empty).
    ``cache_bytes``: the block cache's residuals held now, in ``cache_location``
    ("device" or "host"); ``cache_pinned_host_bytes``: pinned host memory the host cache
    has allocated (kept for the next generation).
    """
    before = after = quantized = released = 0
    n_quantized = 0
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        nominal = p.numel() * p.element_size()
        resident = p.untyped_storage().nbytes()
        qw = STORE.get(p)
        before += nominal
        after += resident
        if qw is not None:
            n_quantized += 1
            quantized += qw.nbytes
            after += qw.nbytes
            if resident == 0:
                released += nominal
    return {
        "before_bytes": before,
        "after_bytes": after,
        "quantized_weight_bytes": quantized,
        "released_bytes": released,
        "quantized_parameters": n_quantized,
        **_cache_bytes(model),
        "ratio": before / after if after else float("inf"),
    }
