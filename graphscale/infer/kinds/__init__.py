"""The rule kinds, one module per family: how each family of ops relates its inputs' and outputs' axes.

A rule in ``rules/*.toml`` picks one kind and gives it arguments; the kind is the only code that looks at
an op. Each kind is registered with :func:`~graphscale.infer.schema.kind`, which declares the rule keys
it accepts (checked when a rule file loads). Its handler takes a :class:`~graphscale.infer.call.Call`
(the op's arguments by name, the called module, the result) and returns the output's
:class:`~graphscale.infer.values.Info`, adding relations to the dimension system and requests (argument
rewrites, inserted multipliers, refusals) for the widen stage. Adding a kind is rare; adding an op to an
existing kind is a rule.

Example (the rule that covers ``nn.Linear`` in fx and ``aten.linear`` in export graphs)::

    [[rule]]
    name = "linear"
    kind = "einsum"
    targets = ["torch.nn.functional.linear", "aten.linear.default", "module:torch.nn.Linear"]
    operands = ["input", "weight", "bias"]
    module_operands = ["input", "param:weight", "param:bias"]
    pattern = "... i, o i, o -> ... o"
    weights = [1, 2]
    module_attrs = { in_features = "weight[1]", out_features = "weight[0]" }
"""

from __future__ import annotations

# importing a family registers its kinds (graphscale.infer.schema.KINDS)
from graphscale.infer.kinds import (  # noqa: F401
    addproduct,
    attention,
    complexview,
    contraction,
    einsum,
    elementwise,
    indexing,
    interleave,
    layout,
    losses,
    normalization,
    padding,
    pooling,
    reductions,
    routing,
    shapes,
    unfold,
)
