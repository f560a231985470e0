"""TDC policy decisions on synthetic statistics."""

import math

from sixbit_compiler.policy import TDCParams, TDCPolicy


def run(policy, steps, changes, num_blocks=1, total_steps=None, branch=0):
    """Simulate: at each step plan, then skipped blocks count a skip and computed ones observe."""
    plans = []
    for step in range(steps):
        plan = policy.plan(step, branch, num_blocks, total_steps)
        plans.append(sorted(plan))
        for b in range(num_blocks):
            if b in plan:
                policy.skipped(branch, b)
            else:
                policy.observe(branch, b, changes(step, b))
    return plans


def test_stable_residuals_skip_at_most_max_skips_in_a_row():
    plans = run(TDCPolicy(TDCParams(threshold=0.1, tau=10.0, max_skips=2)), 8, lambda s, b: 0.01)
    assert plans == [[], [0], [0], [], [0], [0], [], [0]]


def test_unstable_residuals_never_skip():
    plans = run(TDCPolicy(TDCParams(threshold=0.1, tau=10.0)), 6, lambda s, b: 0.5)
    assert plans == [[]] * 6


def test_no_statistics_means_compute():
    plans = run(TDCPolicy(TDCParams()), 4, lambda s, b: math.nan)
    assert plans == [[]] * 4


def test_accumulated_error_bound():
    # change 0.08 < threshold; tau 0.1 admits one skip (0 + 0.08), not a second (0.16).
    plans = run(TDCPolicy(TDCParams(threshold=0.1, tau=0.1, max_skips=5)), 6, lambda s, b: 0.08)
    assert plans == [[], [0], [], [0], [], [0]]


def test_first_and_last_steps_compute():
    policy = TDCPolicy(TDCParams(threshold=1.0, tau=10.0, max_skips=10, first_steps=2, last_steps=2))
    plans = run(policy, 8, lambda s, b: 0.01, total_steps=8)
    assert plans == [[], [], [0], [0], [0], [0], [], []]


def test_blocks_and_branches_are_independent():
    policy = TDCPolicy(TDCParams(threshold=0.1, tau=10.0))
    changes = lambda s, b: 0.01 if b == 1 else 0.9
    assert run(policy, 3, changes, num_blocks=3) == [[], [1], [1]]
    assert policy.plan(1, 1, 3, None) == frozenset()  # branch 1 has no statistics yet
