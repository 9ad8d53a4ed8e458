"""How exact a widening can be: the relative output tolerance of a model's dtype.

Widening copies units and rescales, so in exact arithmetic the wide model computes the narrow one's
function. In floating point the wide model sums k copies where the narrow sums one, with other roundings:
float64 agrees to ~1e-15 relative, float32 to ~1e-7. A float64 model whose own code reduces a widened axis
in float32 (Hugging Face's RMSNorm computes its variance in float32 whatever the weights' dtype) agrees
only to float32 rounding. :func:`exactness_tolerance` gives the bound the checks use
(:func:`graphscale.widen_into`, ``graphscale upscale``); anything looser would let a wrong convention
through where tiny random weights make attention nearly uniform.

Example:
    >>> import torch, graphscale
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)).double()
    >>> plan = graphscale.analyze(m, (torch.randn(1, 3, dtype=torch.float64),))
    >>> exactness_tolerance(plan, plan.sizes(2))
    1e-10
"""

from __future__ import annotations

from typing import Any

import torch

from graphscale.plan import Plan, Sizes

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}
# a float64 model whose class casts to float32 inside (RMSNorm, rotary) is exact only to float32 rounding
FLOAT32_INSIDE_TOLERANCE = 1e-6


def exactness_tolerance(plan: Plan, sizes: Sizes) -> float:
    """The relative output error a correct widening of ``plan``'s model at ``sizes`` stays within: by the
    dtype of its floating-point parameters (the widest one, float32 if it has none), relaxed to float32's
    rounding for a float64 model that reduces a widened axis in float32 (:func:`float32_reductions`)."""
    dtypes = [p.dtype for p in plan.captured.gm.parameters() if p.is_floating_point()]
    dtype = max(dtypes, key=lambda d: torch.finfo(d).bits) if dtypes else torch.float32
    tol = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if dtype == torch.float64 and float32_reductions(plan, sizes):
        tol = FLOAT32_INSIDE_TOLERANCE
    return tol


def float32_reductions(plan: Plan, sizes: Sizes) -> list[str]:
    """Nodes of a float64 model's graph that reduce a widened axis in float32 (the class's own casts, e.g.
    RMSNorm's variance): there the wide model sums k copies with other roundings than the narrow one.
    Float32 work that keeps every widened axis (a softmax over positions per head) rounds the same in both
    and does not count."""
    from graphscale.infer.values import TensorInfo

    def widened_roots(node: Any) -> set[int] | None:
        val, info = node.meta.get("val"), plan.walk.info.get(node.name)
        # export's meta["val"], else the dtype the analysis walk saw (an fx graph has no meta["val"])
        dtype = val.dtype if isinstance(val, torch.Tensor) else node.meta.get("graphscale_dtype")
        if not isinstance(info, TensorInfo) or dtype != torch.float32:
            return None
        return {sizes.res.root(d) for d in info.dims if sizes.mult(d) > 1}

    out = []
    for n in plan.captured.gm.graph.nodes:
        info = plan.walk.info.get(n.name)
        if n.op == "get_attr" or not isinstance(info, TensorInfo):
            continue
        kept = {sizes.res.root(d) for d in info.dims}
        for a in n.all_input_nodes:
            roots = widened_roots(a)
            if roots and roots - kept:
                out.append(n.name)
                break
    return out
