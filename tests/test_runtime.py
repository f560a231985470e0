"""The runtime's step / generation / CFG-branch tracking and its decision point."""

import pytest
import torch

from models import scratch_dit
import sixbit_compiler
from sixbit_compiler.options import SixbitOptions
from sixbit_compiler.runtime import SixbitRuntime, StepTracker


def place(tracker, calls):
    out = []
    for t, cond in calls:
        tracker.advance(t, cond)
        out.append((tracker.generation, tracker.step, tracker.branch))
    return out


def test_separate_cfg_calls_like_wan():
    got = place(StepTracker(), [(999, 1), (999, 2), (950, 1), (950, 2), (900, 1), (900, 2)])
    assert got == [(0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (0, 2, 0), (0, 2, 1)]


def test_batched_cfg_like_cogvideox():
    got = place(StepTracker(), [(999, 7), (950, 7), (900, 7)])
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_timestep_going_up_starts_a_generation():
    got = place(StepTracker(), [(999, 1), (500, 1), (999, 1), (500, 1)])
    assert got == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0)]


def test_interrupted_after_one_step_then_restarted():
    # Generation 0 ran only step 0 (both branches); generation 1 starts at the same timestep.
    got = place(StepTracker(), [(999, 1), (999, 2), (999, 1), (999, 2), (950, 1)])
    assert got == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0)]


def test_fresh_conditioning_tensors_every_step_stay_one_generation():
    # A loop that concatenates [uncond, cond] every step passes a new tensor each time.
    got = place(StepTracker(), [(999, 1), (800, 2), (700, 3), (999, 4)])
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0), (1, 0, 0)]


def test_no_timestep_means_every_call_is_a_step():
    got = place(StepTracker(), [(None, None)] * 3)
    assert got == [(0, 0, 0), (0, 1, 0), (0, 2, 0)]


def test_reset_forces_a_new_generation():
    tr = StepTracker()
    place(tr, [(999, 1), (500, 1)])
    tr.reset()
    assert place(tr, [(400, 1)]) == [(1, 0, 0)]


def test_slots_are_stable_and_default_to_the_activation_option():
    rt = SixbitRuntime(SixbitOptions.from_dict({"activation": "nvfp4"}))
    assert rt.slot_for("blocks.0.q", "blocks.0") == 0
    assert rt.slot_for("blocks.0.k", "blocks.0") == 1
    assert rt.slot_for("blocks.0.q", "blocks.0") == 0  # a recompile asks again: same slot
    assert rt.precision_slots.tolist() == [2, 2]


def test_one_sync_at_most_per_call_and_none_on_cpu():
    rt = SixbitRuntime(SixbitOptions())
    rt.slot_for("a", None)
    for t in (900, 800):
        rt.begin_call(torch.tensor([t]), None, torch.zeros(1, 4))
    assert [r.syncs for r in rt.records] == [0, 0]  # CPU timesteps need no device sync


def test_stats_errors_for_an_uncompiled_model():
    with pytest.raises(LookupError, match="not compiled with backend='sixbit'"):
        sixbit_compiler.stats(scratch_dit())


def test_inductor_lowering_matches_eager_lowering():
    x, t = torch.randn(2, 6, 8), torch.tensor([500.0, 500.0])
    outs = []
    for lowering in ("eager", "inductor"):
        torch._dynamo.reset()
        model = scratch_dit(depth=1, dim=32)
        with torch.no_grad():
            outs.append(torch.compile(model, backend="sixbit", options={"lowering": lowering})(x, t))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)


def test_call_history_is_bounded_to_recent_generations():
    rt = SixbitRuntime(SixbitOptions())
    rt.slot_for("a", None)
    for gen in range(rt.HISTORY_GENERATIONS + 3):
        for t in (900, 500, 100):
            rt.begin_call(torch.tensor([t]), None, None)
    gens = sorted({r.generation for r in rt.records})
    assert gens == list(range(3, rt.HISTORY_GENERATIONS + 3))
    assert len(rt.records) == 3 * rt.HISTORY_GENERATIONS
