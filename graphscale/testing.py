"""Hypothesis strategies and assertions for putting graphscale's checks into your own pytest suite.

Example (a test file of yours)::

    from hypothesis import given, settings
    import graphscale
    from graphscale.testing import assert_widening_exact, inputs_for, multipliers_for

    model, example = build_my_model()
    plan = graphscale.analyze(model, example)

    @settings(max_examples=25, deadline=None)
    @given(mults=multipliers_for(plan), inputs=inputs_for(plan))
    def test_widening_is_exact(mults, inputs):
        assert_widening_exact(plan, mults, inputs, tolerance=1e-5)
"""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from graphscale.plan import Plan
from graphscale.verify import (
    compare_activations,
    flat_variant,
    input_strategy,
    multiplier_strategy,
    run_recording,
)
from graphscale.widen import widen

__all__ = ["assert_widening_exact", "inputs_for", "multipliers_for"]


def multipliers_for(plan: Plan, choices: tuple[int, ...] = (1, 2, 3, 4)) -> st.SearchStrategy[dict]:
    """Per-width-class multipliers drawn from ``choices``.

    Example:
        >>> import torch, graphscale
        >>> plan = graphscale.analyze(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)),
        ...                           (torch.randn(1, 2),))
        >>> from hypothesis import find
        >>> find(multipliers_for(plan), lambda m: m["0.weight[0]"] > 2)  # the smallest such draw
        {'0.weight[0]': 3}
    """
    return multiplier_strategy(plan, choices)


def inputs_for(plan: Plan, vary_batch: bool = False, vary_seq: bool = False
               ) -> st.SearchStrategy[list[torch.Tensor]]:
    """Random input tensors shaped like the plan's example inputs (batch/sequence drawn if asked)."""
    return input_strategy(plan, vary_batch, vary_seq)


def assert_widening_exact(plan: Plan, multipliers: dict[str, int], inputs: list[torch.Tensor],
                          tolerance: float = 1e-10) -> None:
    """Widen with ``multipliers`` and assert every activation equals the narrow one repeated along its
    width axes, within ``tolerance`` relative to ``1 + max |activation|``; the message names the node.

    Example:
        >>> import torch, graphscale
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).double()
        >>> plan = graphscale.analyze(net, (torch.randn(3, 2, dtype=torch.float64),))
        >>> assert_widening_exact(plan, {"0.weight[0]": 3}, [torch.randn(5, 2, dtype=torch.float64)])
    """
    flat = flat_variant(plan, inputs)
    wide = widen(plan.captured.gm, None, multipliers, plan=plan)
    _, narrow_acts = run_recording(plan.captured.gm, flat)
    _, wide_acts = run_recording(wide, flat)
    errors = compare_activations(plan, multipliers, narrow_acts, wide_acts)
    bad = [e for e in errors.values() if not e.relative <= tolerance]
    if bad:
        worst = max(bad, key=lambda e: e.relative)
        raise AssertionError(f"widening with {multipliers} is not exact: node {worst.node!r} differs by "
                             f"{worst.relative:.3g} (relative; tolerance {tolerance:.1g}); "
                             f"{len(bad)} node(s) over tolerance")
