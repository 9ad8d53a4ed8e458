"""Widen: emit the wide model as a new ``GraphModule`` (:mod:`graphscale.fill` fills a larger model the
user built instead, with these tensors).

Every parameter and buffer is copied with adjacent repetition along its width axes and rescaled by its
derived copy scale (``P' = c * E(P)``). The graph is then edited where a number in it depends on width:
shape literals of width axes become wide literals, ints read off width axes keep their narrow value (so
a scale computed from head_dim keeps its meaning), slices of width axes get wide bounds, SDPA's scale is
divided by head_dim's multiplier, and a sum over a width axis that no parameter absorbs (``q @ k.T``,
``x.sum(-1)``, a tied readout) gets an inserted ``1/k``. The source model is never modified: the wide
module is built from new tensors and shallow clones of the leaf modules.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 4)
    >>> wide = widen(model, (x,), multiplier=3)
    >>> torch.allclose(wide(x), model(x), atol=1e-6), wide.get_submodule("2").in_features
    (True, 24)
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx

from graphscale.capture import (
    Tracer,
    get_frontend,
    written_operand,
)
from graphscale.derive import ScalingRule
from graphscale.edits import EditContext, set_module_attrs
from graphscale.errors import (
    GraphscaleError,
    MultiplierError,
    WidthConflictError,
)
from graphscale.infer.classes import HeadsPolicy
from graphscale.plan import Plan, Sizes, analyze
from graphscale.record import (
    AxisReplication,
    ParamScaling,
    WideningRecord,
    attach_record,
    resolve_string_annotations,
)


def widen(model: torch.nn.Module, example_inputs: Any, multiplier: int | dict[str, int] = 2, *,
          tracer: Tracer = "auto", rules: str | Path | list[str | Path] | None = None,
          heads: HeadsPolicy = "fixed", outputs: Literal["fixed", "width"] = "fixed",
          noise: Any = None, seed: int = 0, plan: Plan | None = None,
          names: dict[str, str] | None = None) -> fx.GraphModule:
    """Return a wide ``GraphModule`` computing the same function as ``model`` (exactly, without noise).

    ``multiplier`` is an int for every width class or a dict from class name (or any member axis, such as
    ``"fc1.weight[0]"``) to an int; classes not named keep their width. ``noise`` is a scheme from
    :mod:`graphscale.train.noise` (applied after copying, seeded by ``seed``). The result carries
    ``.graphscale``, a :class:`~graphscale.record.WideningRecord` with every tensor's source and rule;
    ``print(wide.graphscale.summary())`` shows what was done.

    Example:
        >>> wide = widen(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)),
        ...              (torch.randn(1, 2),), multiplier={"0.weight[0]": 3})
        >>> tuple(wide.get_parameter("1.weight").shape)
        (1, 12)
    """
    if plan is None:
        plan = analyze(model, example_inputs, tracer=tracer, rules=rules, heads=heads, outputs=outputs,
                       names=names)
    elif model is not None and model is not plan.captured.gm and model is not plan.captured.source:
        raise GraphscaleError("plan= was made from a different model than the one passed to widen: "
                              "the widened weights would be the plan's, not this model's. Analyze this "
                              "model (graphscale.analyze(model, inputs)) and pass that plan.")
    mults = plan.multipliers(multiplier)
    sizes = Sizes(plan, mults)
    check_memory(plan, sizes)
    record = build_record(plan, sizes, mults)
    check_exact(plan, record)
    gm = plan.captured.gm
    state = source_state(gm)
    if model is not None and model is plan.captured.source:
        state.update(_current_state(model, state))  # the plan traced a copy: read today's weights
    note_untraced(plan, record, model, "widen")
    wide_tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, scaling in record.params.items():
            canonical = plan.canonical(name)  # tied names share one wide tensor
            if canonical not in wide_tensors:
                src = state[canonical]
                t = scaling.widen(src.detach())
                if isinstance(src, torch.nn.Parameter):
                    t = torch.nn.Parameter(t, requires_grad=src.requires_grad)
                wide_tensors[canonical] = t
            wide_tensors[name] = wide_tensors[canonical]
    with warnings.catch_warnings():  # deep-copying an export graph's pytree codegen warns about LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(gm.graph)
    root = _wide_root(gm, graph, plan, sizes, wide_tensors)
    _rewrite_graph(graph, plan, sizes, root)
    resolve_string_annotations(graph)  # before the module's code is generated: attach_record needn't again
    wide = fx.GraphModule(root, graph, class_name=f"Wide{type(model).__name__}")
    # after the module is built (it copies every attribute the graph reads, dead or not); the code is
    # generated again only if a node went
    if wide.graph.eliminate_dead_code(is_impure_node=_keep_node):
        wide.recompile()
    wide.graph.lint()
    wide.train(model.training)
    attach_record(wide, record)  # as .graphscale, kept by deepcopy/pickle (see graphscale.record)
    if noise is not None:
        gen = torch.Generator().manual_seed(seed)
        noise.apply(wide, record, gen)
        record.notes.append(f"noise: {noise!r} (seed {seed})")
    return wide


def _keep_node(node: fx.Node) -> bool:
    """Dead-code elimination keeps what has effects beyond its output, not only fx's impure ops: in-place
    writes (a buffer's EMA, ``h.clamp_()``, ``out=``) and modules with buffers (BatchNorm's running
    statistics) or ``inplace=True``."""
    if node.op == "call_module":
        module = node.graph.owning_module.get_submodule(str(node.target))
        if getattr(module, "inplace", False) is True or next(module.buffers(), None) is not None:
            return True
    return node.is_impure() or written_operand(node) is not None


def named_tensors(model: torch.nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Every parameter and buffer of ``model`` under every name (tied tensors once per name)."""
    return [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]


def _current_state(model: torch.nn.Module, traced: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``model``'s tensors by name, where the traced copy has the same name (weights loaded after analyze)."""
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors(model):
        if name in traced:
            if t.shape != traced[name].shape:
                raise GraphscaleError(f"{name} has shape {tuple(t.shape)} now, {tuple(traced[name].shape)} "
                                      "when the plan was made; analyze the model again")
            out[name] = t
    return out


def check_memory(plan: Plan, sizes: Sizes, available: int | None = None) -> int:
    """Refuse before allocating when the wide tensors would not fit in memory; return their bytes.

    Example:
        >>> plan = analyze(torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.Linear(4, 1)),
        ...                (torch.randn(1, 2),))
        >>> check_memory(plan, plan.sizes(2))  # (8*2 + 8 + 1*8 + 1) float32
        132
    """
    state = source_state(plan.captured.gm)
    need: dict[str, int] = {}
    for name in plan.rules:
        t = state.get(plan.canonical(name))
        if t is None or t.device.type == "meta":
            continue
        numel = math.prod(sizes.wide(d) for d in plan.tensor_dims[name])
        need[str(t.device)] = need.get(str(t.device), 0) + numel * t.element_size()
    for device, nbytes in need.items():
        have = available if available is not None else _available_bytes(torch.device(device))
        if have is not None and nbytes > have:
            raise MultiplierError(
                f"widening by {sizes_summary(plan, sizes)} needs {nbytes:,} bytes ({_gib(nbytes)}) "
                f"for the wide tensors on {device}, but only {have:,} bytes ({_gib(have)}) are "
                "available; choose smaller multipliers")
    return sum(need.values())


def _gib(nbytes: int) -> str:
    """``nbytes`` in GiB to three digits, or its order of magnitude past what a float holds.

    Example:
        >>> _gib(3 * 2**29), _gib(10**400)
        ('1.5 GiB', 'about 10^390 GiB')
    """
    try:
        return f"{nbytes / 2**30:.3g} GiB"
    except OverflowError:  # int / int past 1.8e308: the refusal must not fail itself
        return f"about 10^{len(str(nbytes >> 30)) - 1} GiB"


def sizes_summary(plan: Plan, sizes: Sizes) -> str:
    return ", ".join(f"{c.name}={sizes.atom_mult[c.atom]}" for c in plan.width_classes) or "1"


def _available_bytes(device: torch.device) -> int | None:
    """Memory that allocations on ``device`` can use (available RAM for the CPU), or None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import os

        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_exact(plan: Plan, record: WideningRecord) -> None:
    """Refuse what the widened graph cannot compute exactly (checked once multipliers are known)."""
    gm = plan.captured.gm
    for name, node in (plan.captured.mutated_buffers or {}).items():
        s = record.params.get(name)
        if s is not None and s.copy_scale != 1.0 and is_widened(s):
            raise WidthConflictError(
                f"forward updates buffer {name!r} in place (node {node!r}), and its widened value must be "
                f"scaled by {s.copy_scale:.6g}: the update would write unscaled values into it. Keep the "
                "buffer off contractions over width axes, or keep its class fixed")
    for n in gm.graph.nodes:
        max_norm, weight = None, None
        if n.op == "call_module":
            max_norm = getattr(gm.get_submodule(str(n.target)), "max_norm", None)
            weight = f"{n.target}.weight"
        elif n.op == "call_function" and n.target in (torch.nn.functional.embedding,
                                                      torch.nn.functional.embedding_bag):
            max_norm = n.kwargs.get("max_norm", n.args[2] if len(n.args) > 2 else None)
            arg = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            weight = str(arg.target) if isinstance(arg, fx.Node) and arg.op == "get_attr" else None
        if max_norm is None:
            continue
        s = record.params.get(plan.canonical(weight)) if weight else None
        if s is None or is_widened(s):
            raise WidthConflictError(
                f"node {n.name!r} ({n.target if n.op == 'call_module' else 'embedding'}) renormalizes "
                f"embedding rows to max_norm={max_norm}: the norm of a widened row is not the narrow one's, "
                "so the wide model would compute something else. Set max_norm=None (or renormalize the "
                "weights yourself before widening), or keep the embedding dimension fixed")


def is_widened(s: ParamScaling) -> bool:
    """Whether any axis of the tensor grows."""
    return any(a is not None and not a.is_identity() for a in s.axes)


def note_untraced(plan: Plan, record: WideningRecord, model: torch.nn.Module | None, what: str) -> None:
    """Tensors of the model that its forward never reads (on the example inputs) are not in the graph,
    so they are not widened: say so, naming them."""
    source = plan.captured.source if model is None else model
    if source is None:
        return
    traced = set(plan.rules) | set(record.params) | set(plan.aliases)
    for r in plan.rules.values():
        traced.update(r.aliases)
    left = [n for n, _ in named_tensors(source) if n not in traced]
    if left:
        shown = ", ".join(left[:20]) + (f" and {len(left) - 20} more" if len(left) > 20 else "")
        fate = "are not in the wide model" if what == "widen" else "keep the larger model's own values"
        msg = (f"{what}: {len(left)} tensor(s) that forward does not use on the example inputs were not "
               f"widened and {fate}: {shown}. Widen them yourself if you need them (e.g. an auxiliary head), "
               "or call them from forward")
        record.notes.append(msg)
        warnings.warn(msg, stacklevel=3 if what == "widen" else 4)  # the user's call


def build_record(plan: Plan, sizes: Sizes, mults: dict[str, int]) -> WideningRecord:
    """Numeric :class:`ParamScaling` for every tensor under ``mults`` (checks concatenations agree)."""
    params: dict[str, ParamScaling] = {}
    for name, rule in plan.rules.items():
        dims = plan.tensor_dims[name]
        axes = []
        for i, d in enumerate(dims):
            ax = sizes.axis(d)
            _check_uniform(name, i, ax.tree)
            axes.append(None if ax.is_identity() else ax)
        scaling = _scaling(plan, rule, name, name, tuple(axes), mults)
        params[name] = scaling
        for alias in rule.aliases:
            params[alias] = _scaling(plan, rule, alias, alias, tuple(axes), mults)
    return WideningRecord(params, dict(mults), plan.frontend, list(plan.notes))


def _scaling(plan: Plan, rule: ScalingRule, name: str, source: str, axes: tuple, mults: dict[str, int]
             ) -> ParamScaling:
    wide_shape = tuple(a.wide_size if a is not None else s for a, s in zip(axes, rule.shape))
    return ParamScaling(
        name=name, source=source, narrow_shape=tuple(rule.shape), wide_shape=wide_shape, axes=axes,
        copy_scale=plan.substitute(rule.copy_scale, mults),
        total_mult=round(plan.substitute(rule.total, mults)),
        fan_in_mult=round(plan.substitute(rule.fan_in, mults)), fan_in_axes=rule.fan_in_axes,
        is_buffer=rule.is_buffer, role=rule.role)


def _check_uniform(name: str, axis: int, tree: tuple, top: bool = True) -> None:
    """Refuse an axis whose parts grow by different multipliers where they are no contiguous rows: an
    axis that is a concatenation (of concatenations) at its top level is cut into blocks of their own
    ``(c, M)`` (``ParamScaling.blocks``), but inside a product (per head) the blocks would interleave."""
    if tree[0] == "sum":
        ms = {AxisReplication(c).multiplier for c in tree[1]}
        if len(ms) > 1 and not top:
            raise MultiplierError(
                f"{name}[{axis}] concatenates, inside a product (per head), parts that would grow by "
                f"different multipliers {sorted(ms)}; give the classes of its parts the same multiplier")
    if tree[0] in ("sum", "prod"):
        for c in tree[1]:
            _check_uniform(name, axis, c, top=top and tree[0] == "sum")


def source_state(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The traced copy's tensors by name: parameters, buffers and the graph's constant tensors."""
    state: dict[str, torch.Tensor] = {}
    for n, p in gm.named_parameters(remove_duplicate=False):
        state[n] = p
    for n, b in gm.named_buffers(remove_duplicate=False):
        state[n] = b
    for node in gm.graph.nodes:  # constant tensors that are neither parameters nor buffers
        if node.op == "get_attr" and str(node.target) not in state:
            val = get_attr(gm, str(node.target))
            if isinstance(val, torch.Tensor):
                state[str(node.target)] = val
    return state


def get_attr(root: torch.nn.Module, target: str) -> Any:
    """``root``'s attribute at the dotted path ``target`` (an fx ``get_attr`` node's)."""
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _wide_root(gm: fx.GraphModule, graph: fx.Graph, plan: Plan, sizes: Sizes,
               wide: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The attributes the wide graph needs: wide tensors and shallow clones of leaf modules."""
    root: dict[str, Any] = {}
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "get_attr":
            root[target] = wide.get(target, get_attr(gm, target))
        elif node.op == "call_module" and target not in root:
            module = gm.get_submodule(target)
            root[target] = _clone_module(module, target, plan, wide)
    return root


def _clone_module(module: torch.nn.Module, path: str, plan: Plan, wide: dict[str, torch.Tensor]
                  ) -> torch.nn.Module:
    """A new module object sharing nothing mutable with ``module``, holding the wide tensors."""
    clone = module.__class__.__new__(module.__class__)
    clone.__dict__ = dict(module.__dict__)
    clone._parameters, clone._buffers, clone._modules = {}, {}, {}
    clone._non_persistent_buffers_set = set(module._non_persistent_buffers_set)
    clone._forward_hooks, clone._forward_pre_hooks = copy.copy(module._forward_hooks), \
        copy.copy(module._forward_pre_hooks)
    for name, p in module._parameters.items():
        clone._parameters[name] = wide[f"{path}.{name}"] if p is not None else None
    for name, b in module._buffers.items():
        clone._buffers[name] = wide.get(f"{path}.{name}", b) if b is not None else None
    for name, sub in module._modules.items():
        clone._modules[name] = _clone_module(sub, f"{path}.{name}", plan, wide) if sub is not None else None
    set_module_attrs(clone, plan.module_rule(path))
    return clone


def _rewrite_graph(graph: fx.Graph, plan: Plan, sizes: Sizes, root: dict[str, Any]) -> None:
    """Apply the plan's graph edits (:mod:`graphscale.edits`) to the copied graph, in order."""
    ctx = EditContext(graph, plan, sizes, get_frontend(plan.frontend), root)
    for edit in plan.edits:
        try:
            edit.apply(ctx)
        except MultiplierError as e:  # Sizes.mult: a concatenation whose parts grow differently
            node = getattr(edit, "node", None)
            raise MultiplierError(f"node {node!r} ({type(edit).__name__}): {e}" if node else str(e)) from e


def check_shapes(large: torch.nn.Module, record: WideningRecord) -> None:
    """Every tensor of ``large`` must have the wide shape the record derives (used by ``widen_into``)."""
    state = dict(named_tensors(large))
    for name, s in record.params.items():
        if name not in state:
            raise WidthConflictError(f"the larger model has no tensor {name!r} (the small model has one)")
        if tuple(state[name].shape) != s.wide_shape:
            raise WidthConflictError(f"{name}: the larger model has shape {tuple(state[name].shape)}, "
                                     f"widening the small one gives {s.wide_shape}")


def relative_record(model: torch.nn.Module, example_inputs: Any, base: torch.nn.Module | dict[str, int], *,
                    tracer: Tracer = "auto", rules: str | Path | list[str | Path] | None = None,
                    heads: HeadsPolicy = "fixed") -> WideningRecord:
    """The scaling record of ``model`` relative to a narrower ``base``, for μP training from scratch.

    ``base`` is a smaller instance of the same architecture (multipliers are read off the shapes, as in
    :func:`widen_into`) or a dict from ``model``'s width-class names to multipliers (the base is then
    ``model``'s widths divided by them). :func:`graphscale.mup_optimizer` and
    :func:`graphscale.mup_init_` use it so that hyperparameters tuned at the base width transfer.

    Example:
        >>> small = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> big = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
        >>> relative_record(big, (torch.randn(1, 3),), small)["2.weight"].fan_in_mult
        4
    """
    if isinstance(base, torch.nn.Module):
        plan = analyze(base, example_inputs, tracer=tracer, rules=rules, heads=heads)
        state = dict(named_tensors(model))
        mults = plan.multipliers_from(state)
        record = build_record(plan, Sizes(plan, mults), mults)
        for name in plan.unused_tensors():
            record.params.pop(name, None)
        check_shapes(model, record)
        return record
    plan = analyze(model, example_inputs, tracer=tracer, rules=rules, heads=heads)
    mults = plan.multipliers(base)
    for c in plan.width_classes:
        if c.atom_size % mults[c.name]:
            raise MultiplierError(f"class {c.name!r} has {c.atom_size} units per group, not divisible by its "
                                  f"multiplier {mults[c.name]}")
    record = build_record(plan, Sizes(plan, mults), mults)
    for name, s in record.params.items():  # the record was built as if model were the base: rescale shapes
        narrow = tuple(n // (a.multiplier if a is not None else 1) for n, a in zip(s.narrow_shape, s.axes))
        record.params[name] = replace(s, narrow_shape=narrow, wide_shape=s.narrow_shape,
                                      axes=tuple(None for _ in s.axes))
    record.notes.append("relative to a base given by multipliers: no narrow tensors, so no replication maps")
    return record
