"""widen_into: fill a larger model the user built (same class, larger config) with the exact widened weights.

Where :func:`graphscale.widen` emits a new graph, ``widen_into`` writes ``c * E(P)`` into the user's own
larger model, whose code computes some things from its own sizes that the widened graph would have
edited: the attention scale ``1/sqrt(head_dim)``, a readout's ``1/width``, an embedding scale
``sqrt(d_model)``. Those are folded into weights (the query rows, the readout, the op feeding a
constant); where a convention cannot be read off the code, every candidate is filled and the one that
reproduces the small model's outputs is kept (a probe with random weights decides between several that
do). What no fill can reproduce is refused with the reason (docs/math.md §8).

Example:
    >>> small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> large = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    >>> x = torch.randn(3, 4)
    >>> record = widen_into(small, large, (x,))
    >>> torch.allclose(large(x), small(x), atol=1e-6), record.multipliers
    (True, {'0.weight[0]': 2})
"""

from __future__ import annotations

import contextlib
import functools
import math
import operator
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.fx as fx

from graphscale.capture import (
    Tracer,
    live_nodes,
    preserved_buffers,
    private_copy,
)
from graphscale.edits import OutputMultiplier, SliceBounds, get_arg
from graphscale.errors import (
    GraphscaleError,
    SliceFoldWarning,
    UnsavedBufferWarning,
    WidthConflictError,
)
from graphscale.infer.classes import HeadsPolicy
from graphscale.mupcompat import mup_optimizer_note
from graphscale.on_use import OnUse
from graphscale.plan import Plan, Sizes, analyze
from graphscale.record import AxisReplication, WideningRecord
from graphscale.tolerance import exactness_tolerance
from graphscale.widen import (
    build_record,
    check_exact,
    check_memory,
    check_shapes,
    get_attr,
    is_widened,
    named_tensors,
    note_untraced,
    source_state,
)


def widen_into(small: torch.nn.Module, large: torch.nn.Module, example_inputs: Any, *,
               tracer: Tracer = "auto", rules: str | Path | list[str | Path] | None = None,
               heads: HeadsPolicy = "fixed", outputs: Literal["fixed", "width"] = "fixed",
               attention: Literal["auto", "standard", "mup", "fixed"] = "auto", rtol: float | None = None,
               plan: Plan | None = None, transactional: bool = True, on_use: OnUse | None = None
               ) -> WideningRecord:
    """Fill ``large`` (the same architecture built wider by the user) with the exact widened weights.

    Transactional: if anything fails (a shape, the output check, an exception in ``large``'s forward),
    ``large``'s tensors are restored bitwise and nothing is attached to it. This holds a copy of
    ``large``'s tensors while it runs; ``transactional=False`` skips that copy (for a ``large`` built only
    to be filled, whose values are worthless after a failure: on failure they are then partly filled).
    Besides ``large`` and that copy, it holds one wide tensor at a time.

    Each class multiplier is read off the shapes (``large`` size / ``small`` size of the class's named
    axis); a ratio that is not an integer, or any tensor whose shape does not match the widened one, is an
    error naming the tensor. Because ``large`` computes attention with its own code, its scale for the
    wider head_dim is its own: ``attention="standard"`` (1/sqrt(head_dim): W_q and b_q get a further
    ``k**-0.5``), ``"mup"`` (1/head_dim: nothing to add), ``"fixed"`` (a scale that does not change with
    head_dim, e.g. read off the config: a further ``k**-1``), or ``"auto"``, which tries all three and keeps
    the one closer to ``small`` on ``example_inputs``; it must match within ``rtol`` (relative error; by
    default :func:`graphscale.tolerance.exactness_tolerance`: 1e-10 for float64, float32's rounding where
    the model computes in float32, 1e-5 for float32 weights).
    Where the query is normalized after its projection (a q-norm), the factor goes into the norm's gain
    instead; a normalization without a gain cannot carry it, and only ``"mup"`` is tried.
    ``plan`` is ``graphscale.analyze(small, example_inputs, ...)`` if the caller already made it (it is
    then not made again; the engine options are the plan's).
    ``on_use`` (an :class:`~graphscale.on_use.OnUse`; needs ``transactional=False``): ``large``'s
    floating-point parameters are not written but handed to ``on_use``, which makes each from ``small``'s
    (as the fill would write it, with the conventions being tried, then the chosen ones) only while an op
    of ``large``'s forward reads it: widen_into then holds one op's wide parameters at a time, not
    ``large``'s. Afterwards ``with on_use:`` runs ``large`` and ``on_use.value(p)`` makes one parameter
    (its buffers are written as usual).
    ``small`` is never modified; ``large``'s parameters and buffers are overwritten in place. Returns the
    record, also attached as ``large.graphscale``.

    Example:
        >>> small = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
        >>> large = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> x = torch.randn(5, 3)
        >>> widen_into(small, large, (x,)).multipliers
        {'0.weight[0]': 2}
    """
    if on_use is not None and transactional:
        raise ValueError("widen_into(on_use=...) hands large's parameters to on_use, which a failure cannot "
                         "restore: pass transactional=False")
    saved = [(t, t.detach().clone()) for t in _unique_tensors(large)] if transactional else []
    try:
        return _widen_into(small, large, example_inputs, tracer=tracer, rules=rules, heads=heads,
                           outputs=outputs, attention=attention, rtol=rtol, plan=plan, on_use=on_use)
    except BaseException:
        with torch.no_grad():
            for t, value in saved:
                t.copy_(value)
        raise


def _drop_forward_constants(plan: Plan, record: WideningRecord, small: torch.nn.Module) -> None:
    """Tensors of the graph that are not ``small``'s (constants its forward creates, which torch.export
    lifts as ``lifted_tensor_0`` and fx as ``_tensor_constant0``) are not the user's to fill: the larger
    model's forward creates its own. That is exact only if widening leaves such a constant as it is."""
    own = {n for n, _ in named_tensors(small)}
    for name in [n for n in record.params if n not in own]:
        s = record.params[name]
        if is_widened(s) or s.copy_scale != 1.0:
            node = next((n.name for n in plan.captured.gm.graph.nodes
                         if n.op == "get_attr" and str(n.target) == name), name)
            raise WidthConflictError(
                f"{name} (node {node!r}) is a constant that the model's forward creates, not one of its "
                f"tensors, and widening changes it (wide shape {s.wide_shape}, copy scale "
                f"{s.copy_scale:.6g}): "
                "the larger model creates its own, which widen_into cannot set. Make it a buffer of the "
                "model (register_buffer), or use graphscale.widen, which keeps the widened constant")
        record.params.pop(name)
        record.notes.append(f"widen_into: {name} is a constant the forward creates (the same at every "
                            "width): the larger model computes its own")


def _unsaved_scalars(small: torch.nn.Module, large: torch.nn.Module, record: WideningRecord
                     ) -> dict[str, tuple[float, float]]:
    """The scalar buffers of ``small`` registered with ``persistent=False`` whose value in ``large``
    differs (Gemma's ``embed_scale = sqrt(hidden_size)``): name -> (small's value, large's value). No
    checkpoint carries them, so a filled value would not survive a save and reload."""
    large_buffers = dict(large.named_buffers(remove_duplicate=False))
    out: dict[str, tuple[float, float]] = {}
    for name, mine in _non_persistent(small, record.params, copy=False).items():
        theirs = large_buffers.get(name)
        if isinstance(theirs, torch.Tensor) and mine.numel() == theirs.numel() == 1 \
                and mine.is_floating_point() and mine.item() != theirs.item():
            out[name] = (float(mine.item()), float(theirs.item()))
    return out


def _non_persistent(module: torch.nn.Module, names: Any, copy: bool = True) -> dict[str, torch.Tensor]:
    """Each buffer of ``module`` among ``names`` that is registered with ``persistent=False`` (a copy, or
    the buffer itself with ``copy=False``): a value no checkpoint carries, which the module's class
    computes again when it is rebuilt."""
    out: dict[str, torch.Tensor] = {}
    for path, sub in module.named_modules(remove_duplicate=False):
        for b in getattr(sub, "_non_persistent_buffers_set", ()):
            name = f"{path}.{b}" if path else b
            if name in names and isinstance(sub._buffers.get(b), torch.Tensor):
                out[name] = sub._buffers[b].detach().clone() if copy else sub._buffers[b]
    return out


def _unique_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for _, t in named_tensors(module):
        seen.setdefault(id(t), t)
    return list(seen.values())


def _widen_into(small: torch.nn.Module, large: torch.nn.Module, example_inputs: Any, *, tracer: Tracer,
                rules: str | Path | list[str | Path] | None, heads: HeadsPolicy,
                outputs: Literal["fixed", "width"], attention: Literal["auto", "standard", "mup", "fixed"],
                rtol: float | None, plan: Plan | None = None, on_use: OnUse | None = None) -> WideningRecord:
    if plan is None:
        plan = analyze(small, example_inputs, tracer=tracer, rules=rules, heads=heads, outputs=outputs)
    elif plan.captured.source is not small:
        raise GraphscaleError("plan= was made from a different model than the small one passed to "
                              "widen_into; analyze it (graphscale.analyze(small, inputs)) and pass that plan")
    state = dict(named_tensors(large))
    mults = plan.multipliers_from(state)
    sizes = Sizes(plan, mults)
    if on_use is None:  # with on_use, one op's wide tensors exist at a time, not all of them
        check_memory(plan, sizes)
    if rtol is None:
        rtol = exactness_tolerance(plan, sizes)
    record = build_record(plan, sizes, mults)
    check_exact(plan, record)
    # Tensors the output does not depend on (HF's original_inv_freq; the rotary table of a model whose
    # layers are all linear attention) are not part of the function: large keeps its own. Judged per
    # tensor, not per name: a tied tensor read under one name is live under all (HF's lm_head.bias,
    # read as lm_head.decoder.bias)
    for name in plan.unused_tensors():
        record.params.pop(name, None)
    _drop_forward_constants(plan, record, small)
    # a scalar buffer no checkpoint carries (Gemma's embed_scale): a reload would bring back the larger
    # model's own value, so it keeps that one and the weights compensate (found as a constant below)
    unsaved = _unsaved_scalars(small, large, record)
    for name in unsaved:
        record.params.pop(name)
    check_shapes(large, record)
    note_untraced(plan, record, small, "widen_into")
    source = source_state(plan.captured.gm)
    own_unsaved = _non_persistent(large, record.params)  # to tell the user which ones the fill changes

    blocked: list[str] = []
    q_scales = _query_projections(plan, sizes, blocked)
    att_order = list(_ATTENTION_POWER) if attention == "auto" else [attention]
    if blocked:  # a query that no tensor can rescale: only a convention that needs no factor can hold
        att_order = [a for a in att_order if _ATTENTION_POWER[a] == 0]
    elif not q_scales:
        att_order = att_order[:1]
    args, kwargs = plan.captured.args, plan.captured.kwargs

    q_names = {q[0] for q in q_scales}
    # on_use: large's floating-point parameters that the record fills are made when read, by made()
    lazy = {id(t): t for name in record.params if isinstance(t := state[name], torch.nn.Parameter)
            and t.is_floating_point()} if on_use is not None else {}
    current: list[Any] = []  # the last fill's convention, record and source: what made() makes

    def fold(att: str, axis: int, lo: int, hi: int, m: int, offset: float, t: torch.Tensor) -> None:
        """The query factor of attention convention ``att`` on the rows lo:hi of ``t``'s ``axis``."""
        f = m ** _ATTENTION_POWER[att]
        rows = t.narrow(axis, lo, hi - lo).mul_(f)
        if offset:  # a gain s + w: s + w' = f (s + w)
            rows.add_((f - 1) * offset)

    def fill(att: str, rec: WideningRecord, src: dict[str, torch.Tensor], only: set[str] | None = None
             ) -> None:
        """Widen ``src`` by ``rec`` straight into ``large`` (``only``: just those tensors), then fold the
        query factor of attention convention ``att``. One wide tensor exists besides ``large`` at a time.
        With on_use, large's parameters are left to made(), with the recipes as they are now (the record
        changes afterwards: a whole query's factor moves into its copy scale)."""
        current[:] = [att, dict(rec.params), src]
        with torch.no_grad():
            for name, s in rec.params.items():
                if (only is None or name in only) and id(state[name]) not in lazy:
                    s.widen(src[plan.canonical(name)].detach(), out=state[name])
            if _ATTENTION_POWER[att] and q_scales:
                for name, axis, lo, hi, m, offset in q_scales:
                    if id(state[name]) not in lazy:
                        fold(att, axis, lo, hi, m, offset, state[name])

    def made(t: torch.Tensor) -> torch.Tensor:
        """What fill() writes into ``t`` (one of ``lazy``), bitwise: the last fill's record and convention."""
        att, params, src = current
        names = [name for name in params if state[name] is t]  # tied: the last one's write stays
        if not names:
            raise GraphscaleError(f"widen_into(on_use=...): no recipe fills a parameter of shape "
                                  f"{tuple(t.shape)} in this candidate; please report this")
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        params[names[-1]].widen(src[plan.canonical(names[-1])].detach(), out=out)
        if _ATTENTION_POWER[att] and q_scales:
            for name, axis, lo, hi, m, offset in q_scales:
                if state[name] is t:
                    fold(att, axis, lo, hi, m, offset, out)
        return out

    if on_use is not None:
        for t in lazy.values():
            on_use.add(t, functools.partial(made, t))

    def errors_on(src_model: torch.nn.Module, src: dict[str, torch.Tensor],
                  records: dict[str, WideningRecord]) -> dict[tuple[str, str], float]:
        with torch.no_grad(), preserved_buffers(src_model):
            want = _widened_outputs(plan, sizes, src_model(*args, **kwargs))
        out = {}
        for ro, rec in records.items():  # in the order of candidates
            for i, att in enumerate(att_order):
                # the first convention fills every tensor; the next ones refill only the query tensors
                # that the previous fold multiplied
                fill(att, rec, src, only=q_names if i else None)
                with (torch.no_grad(), preserved_buffers(large),
                      on_use if on_use is not None else contextlib.nullcontext()):
                    out[(att, ro)] = _max_rel(large(*args, **kwargs), want)
        return out

    # A constant that the larger model's code computes from its own sizes (an embedding scale
    # sqrt(d_model)) is only looked for when no candidate holds: then it is undone in the op feeding it
    # (the factor small/large in that op's weights, docs/math.md §8) and every candidate is tried again.
    sum_folds = _product_sum_folds(plan, sizes)  # sum(x * w) over grown axes: 1/k in w, at every try
    folds = dict(sum_folds)
    constant_folds: dict[str, tuple[tuple[str, ...], float, str]] = {}
    constants: list[tuple[str, Any, float, float, str]] = []
    large_gm: fx.GraphModule | None = None  # large's graph: captured once no candidate holds, to say why
    unconfirmed: dict[tuple[str, str], float] = {}  # blocked: held on small's weights, not on random ones
    readouts = _readouts(plan, sizes, record)
    for attempt in range(2):
        records, unavailable, biases = _readout_candidates(plan, sizes, record, readouts, folds)
        candidates = [(att, ro) for ro in records for att in att_order]
        # Try every candidate and keep the closest: with near-uniform attention several may pass.
        reference = plan.captured.private or small  # the traced copy: running small could change it
        errors = errors_on(reference, source, records)
        passing = [c for c in candidates if errors[c] <= rtol]
        if len({c[1] for c in passing}) > 1 or len({c[0] for c in passing}) > 1 or (blocked and passing):
            # Several conventions compute the same function on these weights (a zero-initialized readout,
            # or uniform attention) but train differently: decide on a copy of small with random weights.
            # With a blocked query only 'mup' was tried, and it may hold only because attention is uniform
            # here (a zero-initialized key): the probe must confirm it, or nothing is chosen.
            probe = _probe_copy(small, plan, readouts)
            probe_state = dict(source)  # constants that are neither parameters nor buffers stay the same
            probe_state.update(named_tensors(probe))
            probe_errors = errors_on(probe, probe_state, records)
            confirmed = [c for c in passing if probe_errors[c] <= rtol]
            if blocked and not confirmed:
                unconfirmed = {c: probe_errors[c] for c in passing}
                best = None
            else:
                passing = confirmed or passing
                best = min(passing, key=probe_errors.__getitem__)
        else:
            best = min(candidates, key=errors.__getitem__) if candidates else None
        if best is not None and errors[best] <= rtol:
            break
        if attempt:
            break
        large_gm = _capture_large(plan, large, example_inputs)
        constants = _width_dependent_constants(plan, large_gm, set(unsaved))
        constant_folds = _constant_folds(plan, constants) or {}
        if not constant_folds:
            break
        folds = dict(sum_folds)
        for name, (producers, f, why) in constant_folds.items():  # both on one tensor: the product
            if name in folds:
                earlier = folds[name]
                producers, f, why = (*earlier[0], *producers), earlier[1] * f, f"{earlier[2]}; {why}"
            folds[name] = (producers, f, why)
    if best is not None and errors[best] <= rtol:
        record = records[best[1]]
        fill(best[0], record, source)
        conventions = ([f"attention={best[0]!r}"] if q_scales else []) + [f"readout={best[1]!r}"]
        record.notes.append(f"widen_into: {', '.join(conventions)}, max relative output error "
                            f"{errors[best]:.2g}")
        if best[1] == "own" and readouts["untied"]:
            record.notes.append("widen_into: the larger model's code divides its readout input by its own "
                                f"width multiplier ({', '.join(readouts['untied'])} copied without 1/k)")
        if best[1] == "own-output":
            record.notes.append("widen_into: the larger model's code multiplies its readout output by its "
                                f"own 1/width ({', '.join(readouts['untied'])} copied without 1/k, "
                                f"{', '.join(biases)} times k)")
        power = _ATTENTION_POWER[best[0]]
        if power and q_scales:
            # what fill() did, to redo it tensor by tensor (graphscale.hf_stream): rows lo:hi of axis times
            # m**power after widening with the copy scale before the fold
            # (and the shift it adds then; s of a gain s + w)
            record.info["query_scales"] = [[name, axis, lo, hi, m, record.params[name].copy_scale, power,
                                            offset, record.params[name].shift]
                                           for name, axis, lo, hi, m, offset in q_scales]
            partial = []
            for name, axis, lo, hi, m, offset in q_scales:
                s = record.params[name]
                if lo == 0 and hi == s.wide_shape[axis]:  # a whole tensor: a change of its copy scale
                    f = m ** power
                    for key in [name, *plan.rules[name].aliases]:
                        if key in record.params:
                            t = record.params[key]
                            record.params[key] = replace(t, copy_scale=t.copy_scale * f,
                                                         shift=t.shift * f + (f - 1) * offset)
                else:  # a fused q|k|v tensor: one copy scale cannot describe it; the record marks it
                    assert not offset, "a gain s + w is folded whole"
                    partial.append((name, axis, lo, hi, m))
            if partial:
                _mark_slice_folds(plan, record, partial, power, small, example_inputs, tracer, rules, heads)
            record.notes.append(f"widen_into: the query carries a further k**{power:g} "
                                f"({', '.join(sorted({q[0] for q in q_scales if q[4] >= 1}))})")
            undone = sorted({q[0] for q in q_scales if q[4] < 1})
            if undone:
                record.notes.append(f"widen_into: {', '.join(undone)} carry its inverse, k**{-power:g}, "
                                    "where another reader multiplies the query by their output")
        for name, (_, f, why) in sum_folds.items():
            record.notes.append(f"widen_into: {name} carries a further {f:.6g}: {why}")
        for name, (producers, f, why) in constant_folds.items():
            record.notes.append(f"widen_into: {name} carries a further {f:.6g} for the larger model's own "
                                f"constant at {why} (its ops {', '.join(producers)} feed them)")
        for name, (a, b) in unsaved.items():
            record.notes.append(f"widen_into: {name} is not saved with the model: the larger model keeps its "
                                f"own value {b:.6g} (the small one's is {a:.6g})")
        state_now = dict(named_tensors(large))
        changed = [n for n, t in own_unsaved.items() if not torch.equal(state_now[n], t)]
        if changed:
            msg = (f"widen_into: {', '.join(changed)} (registered with persistent=False) now differ(s) from "
                   f"the value {type(large).__name__} computes from its own config, and no state_dict or "
                   "checkpoint carries it: the filled model is exact, but one saved and rebuilt from its "
                   "config is not. Keep the model object, or re-assign these buffers after loading")
            record.notes.append(msg)
            warnings.warn(msg, UnsavedBufferWarning, stacklevel=3)  # the user's call of widen_into
        record.notes.extend(mup_optimizer_note(small, large, record))
        large.graphscale = record  # type: ignore[assignment]
        return record
    message = _no_candidate_message(plan, sizes, errors, unavailable, readouts, q_scales, blocked,
                                    unconfirmed)
    layout = _layout_differences(plan, sizes, large_gm)
    if layout:  # the root cause, said first
        message = ("the larger model's graph computes other shapes than the widened small one, at "
                    + "; ".join(layout[:3]) + (f" and {len(layout) - 3} more ops" if len(layout) > 3 else "")
                    + ": the two split a width axis into factors that grow differently (head_dim grown "
                      "where widening grows the heads, or the reverse: see heads=; or a factor of size 1 in "
                      "the small model, such as one head per group, whose growth its sizes cannot show), so "
                      "no fill puts the rows where the larger model reads them; use graphscale.widen, whose "
                      "graph keeps the small model's layout; " + message)
    sums = [m.node for m in _uncarried_sums(plan, sizes)]
    if sums and heads == "fixed":
        message += _sums_grow_advice(small, example_inputs, tracer, rules, sums)
    if unsaved:
        message += ("; " + ", ".join(f"{n} ({a:.6g} in the small model, {b:.6g} in the larger)"
                                     for n, (a, b) in unsaved.items())
                    + " are buffers not saved with the model, which each class computes from its own "
                      "config: widen_into keeps the larger model's value, as a reload would, and must "
                      "compensate in weights")
    if constants:
        shown = [c[4] for c in constants]
        message += ("; the larger model's code computes constants from its own sizes, which "
                    + ("no weight carries here: " if not constant_folds else "widen_into folded into "
                       + ", ".join(sorted(constant_folds))
                       + " (the errors above are with those folds), without "
                       "success: ")
                    + ", ".join(shown[:6]) + (f" and {len(shown) - 6} more" if len(shown) > 6 else "")
                    + " (e.g. an embedding scale sqrt(d_model)); use graphscale.widen, whose graph keeps the "
                      "small model's constants")
    raise WidthConflictError(message)


def _capture_large(plan: Plan, large: torch.nn.Module, example_inputs: Any) -> fx.GraphModule | None:
    """``large``'s graph, captured as the small model's was (None where it cannot be): only read when
    widen_into has failed, to say why."""
    from graphscale.capture import capture

    try:
        return capture(large, example_inputs, plan.frontend).gm  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - diagnostics only: the refusal stands without them
        return None


def _paired_calls(plan: Plan, gm: fx.GraphModule | None) -> list[tuple[fx.Node, fx.Node]]:
    """The calls of the small graph and of ``gm`` (the larger model's) paired op by op; empty where the
    two graphs do not have the same ops in the same order."""
    calls = ("call_function", "call_method")  # fx keeps x.to(dtype) a method: the scalar's first reader
    small = [n for n in plan.captured.gm.graph.nodes if n.op in calls]
    big = [n for n in gm.graph.nodes if n.op in calls] if gm is not None else []
    if len(small) != len(big) or any(a.target != b.target for a, b in zip(small, big)):
        return []
    return list(zip(small, big))


def _layout_differences(plan: Plan, sizes: Sizes, gm: fx.GraphModule | None) -> list[str]:
    """The ops where ``gm`` (the larger model's graph) computes a shape other than the widened small graph
    does, described: the larger model's code then splits a width axis into other factors (CodeGen's
    ``qkv.reshape(..., mp_num, -1)`` with one head per group in the small model: the groups' factor grows
    in the plan, the heads per group in the larger model), so no fill puts the rows where it reads them."""
    from graphscale.infer.values import TensorInfo

    pairs = _paired_calls(plan, gm)
    # a data-dependent size (a MoE's tokens per expert) is a SymInt under export: no shape to compare
    shapes = {b.name: tuple(v.shape) for _, b in pairs if isinstance(v := b.meta.get("val"), torch.Tensor)
              and all(type(n) is int for n in v.shape)}
    if pairs and not shapes and gm is not None and not plan.captured.kwargs:  # fx: no shapes recorded
        class Shapes(fx.Interpreter):
            def run_node(self, n: fx.Node) -> Any:
                value = super().run_node(n)
                if isinstance(value, torch.Tensor):
                    shapes[n.name] = tuple(value.shape)
                return value

        try:
            with torch.no_grad():
                Shapes(gm).run(*plan.captured.args)
        except Exception:  # noqa: BLE001 - diagnostics only: the refusal stands without them
            return []
    out = []
    for a, b in pairs:
        info, shape = plan.node_info.get(a.name), shapes.get(b.name)
        if not isinstance(info, TensorInfo) or shape is None:
            continue
        wide = tuple(sizes.wide(d) for d in info.dims)
        if len(wide) == len(shape) and wide != shape:
            out.append(f"{a.name} ({_op_name(a)}): widening gives {wide}, the larger model computes {shape}")
    return out


def _width_dependent_constants(plan: Plan, gm: fx.GraphModule | None,
                               unsaved: set[str] | frozenset[str] = frozenset()
                               ) -> list[tuple[str, Any, float, float, str]]:
    """The constants of ``large``'s graph that differ from the small graph's at the same op: numbers its
    code derives from its config's sizes (``embed_scale = sqrt(d_model)``, a ``1/sqrt(hidden)``), as float
    literals, as scalar tensors it creates in forward, or as the scalar buffers ``unsaved`` (not saved
    with the model: each class computes its own). Each is (small node, operand (index or keyword),
    small value, large value, description) (``gm``: the larger model's graph, from
    :func:`_capture_large`). Only read when widen_into has failed; empty when the graphs cannot be paired
    op by op."""
    out: list[tuple[str, Any, float, float, str]] = []
    own = {n for n, _ in named_tensors(plan.captured.gm)}
    for a, b in _paired_calls(plan, gm):
        for i, (x, y) in enumerate(zip(a.args, b.args)):
            if isinstance(x, float) and isinstance(y, float) and x != y:
                out.append((a.name, i, x, y, f"{a.name} argument {i}: {x:.6g} in the small model, {y:.6g} "
                            "in the larger"))
            elif isinstance(x, fx.Node) and isinstance(y, fx.Node) and x.op == y.op == "get_attr":
                u, v = get_attr(plan.captured.gm, str(x.target)), get_attr(gm, str(y.target))
                scalars = isinstance(u, torch.Tensor) and isinstance(v, torch.Tensor) \
                    and u.numel() == v.numel() == 1
                made = str(x.target) not in own or str(x.target) in unsaved  # in forward, or not saved
                if scalars and made and u.item() != v.item():
                    copy = a  # lift_fresh_copy, detach_, .to(dtype): the op that reads it comes after
                    while len(copy.users) == 1 and _op_name(copy) in _CONSTANT_COPIES \
                            and _op_name(next(iter(copy.users))) in _CONSTANT_COPIES:
                        copy = next(iter(copy.users))
                    for user in copy.users:
                        for j, arg in enumerate(user.args):
                            if arg is copy:
                                out.append((user.name, j, float(u.item()), float(v.item()),
                                            f"{user.name} argument {j} ({x.target}): {u.item():.6g} in the "
                                            f"small model, {v.item():.6g} in the larger"))
        for key in a.kwargs.keys() & b.kwargs.keys():
            x, y = a.kwargs[key], b.kwargs[key]
            if isinstance(x, float) and isinstance(y, float) and x != y and key != "scale":
                out.append((a.name, key, x, y, f"{a.name} {key}={x:.6g} in the small model, {y:.6g} in the "
                            "larger"))
    return out


#: Ops the query's factor does not pass (not homogeneous of degree one): the walk stops there
_NONLINEAR = frozenset({
    "silu", "silu_", "gelu", "relu", "relu_", "relu6", "leaky_relu", "elu", "selu", "celu", "mish",
    "softplus", "hardswish", "hardsigmoid", "hardtanh", "sigmoid", "tanh", "exp", "expm1", "log", "log1p",
    "pow", "square", "sqrt", "rsqrt", "abs", "sin", "cos", "erf", "softmax", "_softmax", "log_softmax",
    "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "sign", "reciprocal"})
_CONSTANT_COPIES = ("lift_fresh_copy", "detach", "detach_", "to", "_to_copy", "clone", "alias")
_PASS_THROUGH = ("view", "reshape", "transpose", "permute", "contiguous", "clone", "alias", "to", "_to_copy",
                 "type_as", "float", "double", "unsqueeze", "squeeze", "flatten", "dropout", "expand")


def _op_name(node: fx.Node) -> str:
    """``view`` for ``x.view``, ``aten.view.default`` and ``torch.Tensor.view`` alike."""
    if node.op == "call_method":
        return str(node.target)
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name.split("::")[-1]
    return getattr(node.target, "__name__", "") if node.op == "call_function" else ""


def _constant_folds(plan: Plan, constants: list[tuple[str, Any, float, float, str]]
                    ) -> dict[str, tuple[tuple[str, ...], float, str]] | None:
    """Where each width-dependent constant can be undone exactly: ``x * c`` with the larger model's ``c'``
    for the small ``c`` needs ``x`` times ``c / c'``, which the op producing ``x`` (an embedding, a
    linear: its weight and bias; T5's final norm written out as ``weight * x``: its gain) carries, found
    through views, casts and dropout. Returns {tensor: (producing
    nodes, factor, why)} (a constant with no such op is left out: the output check rules on the whole;
    one factor may reach a tensor through several ops, M2M-100's embedding shared by encoder and
    decoder), or None where none can be folded or two different ones land on one tensor."""
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    params_of = _params_by_node(plan)
    reads = _reads_per_tensor(plan)
    folds: dict[str, tuple[tuple[str, ...], float, str]] = {}
    for node_name, operand, x, y, why in constants:
        node = nodes[node_name]
        target = _target(node)
        if not isinstance(operand, int) or not (target in _MUL or (target in _DIV and operand == 1)) \
                or len(node.args) != 2 or not isinstance(node.args[1 - operand], fx.Node) or y == 0:
            continue
        factor = x / y if target in _MUL else y / x
        producer = node.args[1 - operand]
        while isinstance(producer, fx.Node) and producer.name not in params_of and _readers(producer) == 1 \
                and _op_name(producer) in _PASS_THROUGH:
            producer = next((a for a in producer.args if isinstance(a, fx.Node)), None)
        carriers = params_of.get(getattr(producer, "name", ""), [])
        if isinstance(producer, fx.Node) and not carriers and _target(producer) in _MUL:
            # a gain written out (T5's final norm: weight * x): the product is linear in the gain too
            _, gain = _data_and_param(plan, [a for a in producer.args if isinstance(a, fx.Node)])
            carriers = [gain] if gain is not None and reads.get(gain, 0) == 1 else []
        if not isinstance(producer, fx.Node) or not carriers or _readers(producer) != 1:
            continue  # e.g. attention scores times 1/sqrt(head_dim): the attention candidates cover it
        for p in carriers:
            if p in folds:  # a tensor read by two ops (a shared embedding of encoder and decoder)
                producers, earlier, whys = folds[p]
                if producer.name in producers or not math.isclose(earlier, factor, rel_tol=1e-12):
                    return None  # two different constants on one tensor: not tried
                folds[p] = ((*producers, producer.name), earlier, f"{whys}; {why}")
                continue
            folds[p] = ((producer.name,), factor, why)
    return folds or None


def _product_sums(plan: Plan, sizes: Sizes) -> dict[str, tuple[str, str, float]]:
    """The sums over grown axes of a product with a tensor of the model, ``sum(x * w)`` (DiffLlama's
    ``exp(sum(lambda_q1 * lambda_k1))``, a sum over head_dim): the larger model's code applies no scale to
    a plain sum, so the whole ``1/k`` that widen inserts after it goes into ``w`` (a whole-tensor fold,
    docs/math.md §8), which must be read only there, through casts and views, by a product read only by
    the sum. Returns {sum node: (tensor, product node, 1/k)}; the first such operand of the product is
    chosen."""
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    reads = _reads_per_tensor(plan)
    out: dict[str, tuple[str, str, float]] = {}
    for m in plan.requests.multipliers:
        k = math.prod(sizes.mult(d) for d in m.dims)
        node = nodes[m.node]
        if k == 1 or getattr(plan.node_rule(m.node), "kind", None) != "reduce" or m.operand is not None \
                or not node.args or not isinstance(node.args[0], fx.Node):
            continue
        product = node.args[0]
        while _op_name(product) in _PASS_THROUGH and _readers(product) == 1 and _node_args(product) \
                and _param_operand(plan, product) is None:
            product = _node_args(product)[0]
        operands = _node_args(product)
        if _target(product) not in _MUL or len(operands) != 2 or _readers(product) != 1:
            continue
        carriers = [p for a in operands
                    if (p := _param_operand(plan, a)) is not None and reads.get(p, 0) == 1]
        if carriers:
            out[m.node] = (carriers[0], product.name, 1.0 / k)
    out.update(_picked_tensor_sums(plan, sizes))
    return out


def _picked_tensor(plan: Plan, node: fx.Node) -> str | None:
    """The tensor of the model that ``node`` takes one position of along an axis (``weight[e]``: aten's
    ``select``, fx's ``getitem`` with an int), else None."""
    ins = _node_args(node)
    picks = _op_name(node) == "select" or (node.target is operator.getitem and len(node.args) == 2
                                           and isinstance(node.args[1], int))
    return _param_operand(plan, ins[0]) if picks and len(ins) == 1 else None


def _picked_tensor_sums(plan: Plan, sizes: Sizes) -> dict[str, tuple[str, str, float]]:
    """The contractions over grown axes (a linear, a matmul) whose operand is a slice of a tensor of the
    model picked by ``select`` (JetMoE's experts: ``F.linear(x_e, self.weight[e])`` over a stacked
    ``(experts, out, in)`` weight, which the engine sees as data, so widen inserts ``1/k`` after each):
    where every read of the tensor is such a contraction with one and the same ``1/k``, that factor goes
    into the tensor whole, as for :func:`_product_sums`. Returns {contraction: (tensor, select node,
    1/k)}."""
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    reads = _reads_per_tensor(plan)
    found: dict[str, list[tuple[str, str, float]]] = {}
    for m in plan.requests.multipliers:
        k = math.prod(sizes.mult(d) for d in m.dims)
        node = nodes[m.node]
        if k == 1 or m.operand is not None or node.op == "call_module":
            continue
        for arg in _node_args(node):
            picked = arg
            while _op_name(picked) in _PASS_THROUGH and len(_node_args(picked)) == 1:
                picked = _node_args(picked)[0]
            name = _picked_tensor(plan, picked)
            if name is not None and _readers(picked) == 1:
                found.setdefault(name, []).append((m.node, picked.name, 1.0 / k))
    out: dict[str, tuple[str, str, float]] = {}
    for name, sums in found.items():
        if len(sums) == reads.get(name, 0) and len({f for _, _, f in sums}) == 1 \
                and len({s[0] for s in sums}) == len(sums):
            out.update({node: (name, picked, f) for node, picked, f in sums})
    return out


def _plain_sum(plan: Plan, node: fx.Node) -> bool:
    """Whether ``node`` is a sum (a reduction) of anything but the product of two different operands: a sum
    of squares (an L2 norm's ``(x * x).sum(-1)``, nGPT's ``x.pow(2).sum(-1)``) is no attention, and no
    attention convention can compensate it (the larger model's code scales no sum)."""
    if getattr(plan.node_rule(node.name), "kind", None) != "reduce" or not node.args \
            or not isinstance(node.args[0], fx.Node):
        return False
    operand = node.args[0]
    while _op_name(operand) in _PASS_THROUGH and _node_args(operand):
        operand = _node_args(operand)[0]
    factors = _node_args(operand)
    return _target(operand) not in _MUL or len(factors) != 2 or factors[0] is factors[1]


def _product_sum_folds(plan: Plan, sizes: Sizes) -> dict[str, tuple[tuple[str, ...], float, str]]:
    """:func:`_product_sums` as folds {tensor: (the product node reading it, 1/k, why)}."""
    out: dict[str, tuple[tuple[str, ...], float, str]] = {}
    for node, (name, reader, f) in _product_sums(plan, sizes).items():
        readers, _, whys = out.get(name, ((), f, ""))
        why = f"{node} sums over axes grown {round(1 / f)}x a product with it, which the larger model's " \
              "code does not scale"
        out[name] = ((*readers, reader), f, f"{whys}; {why}" if whys else why)
    return out


def _mark_slice_folds(plan: Plan, record: WideningRecord, partial: list[tuple[str, int, int, int, int]],
                      power: float, small: torch.nn.Module, example_inputs: Any, tracer: Tracer,
                      rules: str | Path | list[str | Path] | None, heads: HeadsPolicy) -> None:
    """Record the query's k**power folded onto part of a fused tensor (``slice_folds``) and warn once: the
    result is exact, and ``mup_optimizer`` trains it block by block, but an optimizer with one factor per
    tensor would not train it like the narrow model (docs/math.md §8)."""
    grow = _grow_alternative(small, example_inputs, tracer, rules) if heads == "fixed" else \
        "heads='grow' was asked for, yet head_dim grows here"
    convention = "standard attention (1/sqrt(head_dim)" if power == -0.5 else \
        "an attention scale that does not follow head_dim ("
    for name, axis, lo, hi, m in partial:
        why = f"the query's further {m}**{power:g} of {convention}, head_dim grown {m}x); {grow}"
        for key in [name, *plan.rules[name].aliases]:
            if key in record.params:
                s = record.params[key]
                fold = (axis, lo, hi, m ** power, why)
                record.params[key] = replace(s, slice_folds=s.slice_folds + (fold,))
        record.notes.append(f"widen_into: {name} rows {lo}:{hi} (the query part) carry a further "
                            f"{m}**{power:g} that its copy scale does not show")
    names = ", ".join(sorted({p[0] for p in partial}))
    warnings.warn(f"graphscale: the widened model is exact, but {names} carry the query's k**{power:g} on "
                  "part of the tensor only (a fused q|k|v projection with heads='fixed'): train it with "
                  "graphscale.mup_optimizer (and its transfer_optimizer_state and clip_grad_norm_), which "
                  "step those rows as a block of their own; an optimizer with one lr per tensor would train "
                  f"it unlike the narrow model; {grow}", SliceFoldWarning, stacklevel=4)


def _grow_alternative(small: torch.nn.Module, example_inputs: Any, tracer: Tracer,
                      rules: str | Path | list[str | Path] | None) -> str:
    """Whether heads='grow' would avoid every query fold (head_dim unchanged), said as advice."""
    try:
        plan = analyze(small, example_inputs, tracer=tracer, rules=rules, heads="grow")
        left = _query_projections(plan, Sizes(plan, {c.name: 2 for c in plan.width_classes}))
    except GraphscaleError as e:
        return f"heads='grow' is not possible for this model ({e})"
    if left:
        return ("heads='grow' does not help here: head_dim still grows with it "
                f"({', '.join(sorted({q[0] for q in left}))})")
    return ("heads='grow' (more heads, head_dim kept: nothing folded) widens it so that any optimizer "
            "trains it equivalently")


def _candidate(record: WideningRecord) -> WideningRecord:
    """A copy of ``record`` that a candidate convention may edit: its ParamScalings are frozen and edited
    by replacing them, so new containers suffice (a deep copy would copy every replication map)."""
    return replace(record, params=dict(record.params), multipliers=dict(record.multipliers),
                   notes=list(record.notes), info=dict(record.info))


def _readout_candidates(plan: Plan, sizes: Sizes, record: WideningRecord, readouts: dict[str, list[str]],
                        folds: dict[str, tuple[tuple[str, ...], float, str]]
                        ) -> tuple[dict[str, WideningRecord], dict[str, str], dict[str, int]]:
    """The readout conventions to measure, as records (after the constant ``folds``): "graphscale" puts
    the readout's 1/k in its weights (a tied readout's into the op feeding it); "own" leaves it to the
    large model's code, which divides the readout's input by its own width multiplier (mup's MuReadout /
    MuSharedReadout); "own-output" multiplies the readout's output, bias included, by it (a hand-written
    base/width). Also the reason a convention could not be built, and the readout biases."""
    base = _candidate(record)
    for name, (_, f, _) in folds.items():
        for key in [name, *plan.rules[name].aliases]:
            if key in base.params:
                base.params[key] = replace(base.params[key], copy_scale=base.params[key].copy_scale * f)
    records: dict[str, WideningRecord] = {}
    unavailable: dict[str, str] = {}
    graphscale_record = _candidate(base)
    try:
        _compensate_shared_uses(plan, sizes, graphscale_record, folds)
        records["graphscale"] = graphscale_record
    except WidthConflictError as e:
        unavailable["graphscale"] = str(e)
    biases: dict[str, int] = {}
    if readouts:
        own = _candidate(base)
        for name in readouts["untied"]:
            s = own.params[name]
            own.params[name] = replace(s, copy_scale=s.copy_scale * s.fan_in_mult)
        records["own"] = own
        biases = _readout_biases(plan, readouts["untied"], record)
        if biases:
            own_output = _candidate(own)
            for name, m in biases.items():
                for key in [name, *plan.rules[name].aliases]:
                    s = own_output.params[key]
                    own_output.params[key] = replace(s, copy_scale=s.copy_scale * m)
            records["own-output"] = own_output
    return records, unavailable, biases


def _readouts(plan: Plan, sizes: Sizes, record: WideningRecord) -> dict[str, list[str]]:
    """Readout weights whose 1/k the large model's own code may apply: untied output-role weights, and
    tied weights with a width-dependent factor at a shared use. Empty when there is none."""
    untied = [n for n, s in record.params.items()
              if s.role == "output" and s.fan_in_mult > 1 and not s.is_buffer]
    mults = {c.name: sizes.atom_mult[c.atom] for c in plan.width_classes}
    tied = sorted({plan.canonical(u.param) for u in plan.requests.uses
                   if (f := plan.rules[plan.canonical(u.param)].use_multipliers.get(u.node))
                   is not None and plan.substitute(f, mults) != 1.0})
    return {"untied": untied, "tied": tied} if untied or tied else {}


def _readout_biases(plan: Plan, readouts: list[str], record: WideningRecord) -> dict[str, int]:
    """The other parameters (biases) of the ops that use each readout weight, with the readout's m_in."""
    nodes_of = {}
    for u in plan.requests.uses:
        name = plan.canonical(u.param)
        if name in readouts:
            nodes_of[u.node] = record.params[name].fan_in_mult
    out: dict[str, int] = {}
    for u in plan.requests.uses:
        name = plan.canonical(u.param)
        if u.node in nodes_of and name not in readouts and record.params[name].fan_in_mult == 1:
            out[name] = nodes_of[u.node]
    return out


def _probe_copy(small: torch.nn.Module, plan: Plan, readouts: dict[str, list[str]]) -> torch.nn.Module:
    """A deep copy of ``small`` whose readout (and query) weights are random, so that candidate
    conventions that agree on zero or symmetric weights give different outputs. ``small`` is untouched."""
    probe = private_copy(small)  # as capture copies it: mup's infshape kept, deep-copy warnings silenced
    gen = torch.Generator().manual_seed(0)
    names = set(readouts.get("untied", [])) | set(readouts.get("tied", []))
    params = dict(probe.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for name, p in params.items():
            if name in names or p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) / max(1, p.shape[-1]) ** 0.5)
    return probe


def _no_candidate_message(plan: Plan, sizes: Sizes, errors: dict[tuple[str, str], float],
                          unavailable: dict[str, str], readouts: dict[str, list[str]],
                          q_scales: list[QueryFold], blocked: list[str],
                          unconfirmed: dict[tuple[str, str], float] | None = None) -> str:
    """Why widen_into failed: every candidate tried, the tensors each one concerns, nothing not tried
    (``unconfirmed``: candidates that held on small's weights but not on random ones)."""
    tried = ", ".join(
        (f"attention {a} + " if q_scales else "") + f"readout {r}: {e:.3g}" for (a, r), e in errors.items())
    parts = ["the larger model does not compute the same function after filling it (max relative output "
             f"error, per candidate convention: {tried or 'none could be built'})"]
    if readouts:
        tensors = ", ".join(readouts["untied"] + readouts["tied"])
        parts.append("readout candidates: 'graphscale' (1/k in the weights), 'own' (the larger model's "
                     "code divides the readout's input by its own width multiplier) and 'own-output' (it "
                     f"multiplies the readout's output by it), tried on {tensors}")
    if q_scales:
        parts.append("attention candidates: 'standard' 1/sqrt(head_dim) (a further k**-0.5 in "
                     f"{', '.join(sorted({q[0] for q in q_scales}))}), 'mup' 1/head_dim (nothing) and "
                     "'fixed' (a scale that does not follow head_dim: a further k**-1)")
    if blocked:
        parts.append("only attention 'mup' (1/head_dim) could be tried, because a further factor on the "
                     "query has no tensor to live in: " + "; ".join(blocked[:3])
                     + (f" and {len(blocked) - 3} more" if len(blocked) > 3 else "")
                     + "; heads='grow' keeps head_dim, so the query needs no factor")
    if unconfirmed:
        parts.append(", ".join(f"attention {a} + readout {r}" for a, r in unconfirmed)
                     + " held on the small model's weights only because they cannot tell attention scales "
                     "apart (a zero or near-uniform attention): on random weights its error is "
                     + ", ".join(f"{e:.3g}" for e in unconfirmed.values())
                     + ", so the larger model's attention scale is not 1/head_dim")
    for name, why in unavailable.items():
        parts.append(f"readout {name!r} could not be built: {why}")
    sums = _uncarried_sums(plan, sizes)
    if sums:
        parts.append("graphscale.widen would insert 1/k after " + ", ".join(
            f"{m.node} ({m.why})" for m in sums[:6]) + (f" and {len(sums) - 6} more" if len(sums) > 6 else "")
            + ", which no weight of the larger model can carry")
    parts.append("its architecture may differ from the small model's beyond width; graphscale.widen "
                 "builds the wide model itself")
    return "; ".join(parts)


def _uncarried_sums(plan: Plan, sizes: Sizes) -> list[OutputMultiplier]:
    """The sums after which widen inserts ``1/k`` (its OutputMultiplier requests) that no weight of the
    larger model carries: all but those folded into a tensor (:func:`_product_sums`)."""
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    folded = _product_sums(plan, sizes)
    return [m for m in plan.requests.multipliers
            if math.prod(sizes.mult(d) for d in m.dims) != 1 and nodes[m.node].op != "call_module"
            and m.node not in folded]


def _sums_grow_advice(small: torch.nn.Module, example_inputs: Any, tracer: Tracer,
                      rules: str | Path | list[str | Path] | None, sums: list[str]) -> str:
    """Whether heads='grow' (head_dim kept) leaves the plain ``sums`` (node names) over axes that do not
    grow, said as advice: an L2 norm of the query over head_dim, ``q * rsqrt(sum(q**2) + eps)``, is
    k-fold in the larger model's code and its eps keeps any factor from compensating it exactly."""
    try:
        plan = analyze(small, example_inputs, tracer=tracer, rules=rules, heads="grow")
        left = {m.node for m in _uncarried_sums(plan, Sizes(plan, {c.name: 2 for c in plan.width_classes}))}
    except GraphscaleError:
        return ""
    if left & set(sums):
        return ""
    return ("; heads='grow' (more heads, head_dim kept) leaves none of these sums over a grown axis: build "
            "the larger model with the small one's head_dim and more heads, and pass heads='grow'")


def _compensate_shared_uses(plan: Plan, sizes: Sizes, record: WideningRecord,
                            folds: dict[str, tuple[tuple[str, ...], float, str]] | None = None) -> None:
    """A tied weight's extra factor (inserted as a multiplier by :func:`widen`) must live in weights here:
    move it into the parameters of the op that produces the tied use's input (the final LayerNorm
    before a tied readout, or a norm written out whose gain is an elementwise ``weight * x``, with the
    biases added after it), provided nothing else reads that op's output or the gain."""
    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    reads = _reads_per_tensor(plan)
    params_of = _params_by_node(plan)
    mults = {c.name: sizes.atom_mult[c.atom] for c in plan.width_classes}
    for use in plan.requests.uses:
        name = plan.canonical(use.param)
        factor = plan.rules[name].use_multipliers.get(use.node)
        value = 1.0 if factor is None else plan.substitute(factor, mults)
        fold = (folds or {}).get(name)
        if fold is not None and use.node not in fold[0]:  # folded for another use of a tied weight: undo it
            value, factor = value / fold[1], f"{factor or 1} / {fold[1]:.6g}"
        if factor is None or use.operand is None or value == 1.0:
            continue
        producer = get_arg(nodes[use.node], use.operand)
        adds: list[str] = []  # biases added between the gain and the use: they carry the factor too
        gain: str | None = None
        offset = 0.0  # the constant s of a gain written as s + w (Gemma's 1 + w)
        while isinstance(producer, fx.Node) and producer.name not in params_of and _readers(producer) == 1 \
                and producer.op in ("call_method", "call_function") and producer.args:
            operands = [a for a in producer.args if isinstance(a, fx.Node)]
            path, param = _data_and_param(plan, operands)
            if param is not None and _target(producer) in _MUL:
                gain = param
                break
            shifted = _shifted_gain(plan, producer, operands)
            if shifted is not None:
                gain, offset, producer = shifted
                break
            if param is not None and _target(producer) in _ADD:
                adds.append(param)
            producer = path[0] if path else None  # through views and casts
        carriers = [gain, *adds] if gain is not None else params_of.get(getattr(producer, "name", ""), [])
        if gain is None and adds:
            carriers = []  # a bias after a parameter-free op: no gain to carry the factor
        if not isinstance(producer, fx.Node) or not carriers or _readers(producer) != 1 \
                or any(reads.get(p, 0) > 1 for p in carriers if gain is not None):
            raise WidthConflictError(
                f"{name} is shared with {use.node}, which needs a further factor {factor} that widen_into "
                "cannot put into any weight (the op feeding it has no parameters, or other users); use "
                "graphscale.widen, which inserts the factor into the graph")
        for p in carriers:
            for key in [p, *plan.rules[p].aliases]:
                s = record.params[key]
                # s + w' = f (s + w): w' = f w + (f - 1) s, with the shift already there scaled by f too
                shift = s.shift * value + (value - 1) * offset if p == gain else s.shift * value
                record.params[key] = replace(s, copy_scale=s.copy_scale * value, shift=shift)
        record.notes.append(f"widen_into: {', '.join(carriers)} carry a further {factor} "
                            f"for the shared use of {name} at {use.node}"
                            + (f" ({gain} is a gain written as {offset:g} + w: it also moves by "
                               f"{(value - 1) * offset:.6g})" if offset else ""))


def _widened_outputs(plan: Plan, sizes: Sizes, narrow: Any) -> Any:
    """The small model's outputs as the larger model returns them: each repeated along its width axes
    (``outputs="width"``: the output axis widens too, ``E(y)``); unchanged where no axis widens or where
    the outputs cannot be paired with the graph's output nodes (then the shapes differ and the check fails).

    Example:
        >>> plan = analyze(torch.nn.Linear(2, 3), (torch.randn(1, 2),), outputs="width")
        >>> _widened_outputs(plan, plan.sizes(2), torch.tensor([[1.0, 2.0, 3.0]])).tolist()
        [[1.0, 1.0, 2.0, 2.0, 3.0, 3.0]]
    """
    import torch.utils._pytree as pytree

    from graphscale.infer.values import TensorInfo

    out_node = next(n for n in plan.captured.gm.graph.nodes if n.op == "output")
    leaves, spec = pytree.tree_flatten(narrow)
    nodes = pytree.tree_leaves(out_node.args[0])
    if len(leaves) != len(nodes):
        return narrow
    wide = []
    for leaf, node in zip(leaves, nodes):
        info = plan.node_info.get(node.name) if isinstance(node, fx.Node) else None
        if isinstance(leaf, torch.Tensor) and isinstance(info, TensorInfo) \
                and tuple(leaf.shape) == tuple(info.shape):
            for dim, d in enumerate(info.dims):
                ax = sizes.axis(d)
                if not ax.is_identity():
                    leaf = leaf.index_select(dim, ax.index(leaf.device))
        wide.append(leaf)
    return pytree.tree_unflatten(wide, spec)


def _max_rel(got: Any, want: Any) -> float:
    import torch.utils._pytree as pytree

    g = [t for t in pytree.tree_leaves(got) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    w = [t for t in pytree.tree_leaves(want) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    if len(g) != len(w) or any(a.shape != b.shape for a, b in zip(g, w)):
        return float("inf")
    return max(((a.double() - b.double()).abs().max() / (1 + b.double().abs().max())).item()
               for a, b in zip(g, w))


#: The candidate attention conventions of widen_into: the power of head_dim's multiplier k folded into the
#: query (docs/math.md §8): the larger model's own 1/sqrt(head_dim) gives k**-0.5 of the 1/k that the
#: widened q.k needs, 1/head_dim all of it, a scale that does not follow head_dim none of it.
_ATTENTION_POWER: dict[str, float] = {"standard": -0.5, "mup": 0.0, "fixed": -1.0}

#: Where the query's factor goes: (tensor, axis, wide start, wide stop, head_dim multiplier, s), rows
#: start:stop of the axis; s is the constant of a gain written as s + w (Gemma 3's q-norm), else 0. The
#: multiplier is 1/k where the tensor undoes the factor for another reader of the query.
QueryFold = tuple[str, int, int, int, float, float]

_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_", torch.ops.aten.mul.Tensor,
        torch.ops.aten.mul_.Tensor}
_DIV = {operator.truediv, operator.itruediv, torch.div, "div", "div_", torch.ops.aten.div.Tensor,
        torch.ops.aten.div_.Tensor}
_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", torch.ops.aten.add.Tensor,
        torch.ops.aten.add_.Tensor}


def _readers(node: fx.Node) -> int:
    """Users of ``node`` that read its value: torch.export's ``_assert_tensor_metadata`` checks do not."""
    return sum(1 for u in node.users if not str(u.target).startswith(("aten._assert", "_assert")))


def _params_by_node(plan: Plan) -> dict[str, list[str]]:
    """Node name -> the (canonical) parameters and buffers it uses, from the plan's uses."""
    out: dict[str, list[str]] = {}
    for u in plan.requests.uses:
        out.setdefault(u.node, []).append(plan.canonical(u.param))
    return out


def _reads_per_tensor(plan: Plan) -> dict[str, int]:
    """Canonical tensor name -> how many ops read it (``_readers`` of its get_attr nodes): a gain read
    twice is shared, and a factor folded into it would reach the other reader too."""
    out: dict[str, int] = {}
    for n in plan.captured.gm.graph.nodes:
        if n.op == "get_attr":
            key = plan.canonical(str(n.target))
            out[key] = out.get(key, 0) + _readers(n)
    return out


def _target(node: fx.Node) -> Any:
    return node.target if node.op in ("call_function", "call_method") else None


def _node_args(node: fx.Node) -> list[fx.Node]:
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def _param_operand(plan: Plan, node: fx.Node) -> str | None:
    """The parameter (or buffer) ``node`` reads, through at most three casts or views (``.to(dtype)``;
    not ``w + 1``, a gain that a copy scale cannot scale)."""
    for _ in range(4):
        if node.op == "get_attr":
            name = plan.canonical(str(node.target))
            return name if name in plan.rules else None
        ins = _node_args(node)
        if node.op not in ("call_function", "call_method") or len(ins) != 1 \
                or _op_name(node) not in _CONSTANT_COPIES + _PASS_THROUGH:
            return None
        node = ins[0]
    return None


def _shifted_gain(plan: Plan, node: fx.Node, operands: list[fx.Node]) -> tuple[str, float, fx.Node] | None:
    """``(w, s, x)`` where ``node`` multiplies its two ``operands`` ``x`` and ``s + w`` (either order, only
    one of them such a gain), ``w`` a tensor of the model (through casts: Gemma's
    ``x * (1.0 + self.weight.float())``) and ``s`` a number; None otherwise."""
    def shifted(gain: fx.Node) -> tuple[str, float] | None:
        if gain.op not in ("call_function", "call_method") or _target(gain) not in _ADD \
                or len(gain.args) != 2 or gain.kwargs.get("alpha", 1) != 1:
            return None
        a, b = gain.args
        number, tensor = (a, b) if isinstance(a, (int, float)) else (b, a)
        if isinstance(number, bool) or not isinstance(number, (int, float)) \
                or not isinstance(tensor, fx.Node):
            return None
        name = _param_operand(plan, tensor)
        return (name, float(number)) if name is not None else None

    if _target(node) not in _MUL or len(operands) != 2:
        return None
    found = [(*g, data) for gain, data in (operands, operands[::-1]) if (g := shifted(gain)) is not None]
    return found[0] if len(found) == 1 else None


def _data_and_param(plan: Plan, tensor_args: list[fx.Node]) -> tuple[list[fx.Node], str | None]:
    """An op's tensor operands that are not parameters (its data path), and the parameter it combines
    with a single data operand (``x * w``, ``x + b``; None otherwise)."""
    params = [_param_operand(plan, a) for a in tensor_args]
    path = [a for a, p in zip(tensor_args, params) if p is None]
    param = next((p for p in params if p is not None), None) if len(path) == 1 and len(params) == 2 else None
    return path, param


def _ancestors(node: fx.Node, stop: set[str], limit: int = 32) -> set[str]:
    """Names of the nodes ``node`` is computed from (itself included), not looking past ``stop`` nodes
    (ops with parameters: a projection is where the query's own computation starts)."""
    seen: set[str] = set()
    todo = [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name not in stop:
            todo.extend(_node_args(n))
    return seen


def _query_projections(plan: Plan, sizes: Sizes, blocked: list[str] | None = None) -> list[QueryFold]:
    """For each live attention whose head_dim grows: the :data:`QueryFold` of each tensor that carries a
    further factor on the query, found by walking back from the attention's query operand: the query
    projection's output rows (those a split, unbind or slice of a fused projection keeps; biases added on
    the way, or assembled by a ``cat``), a tensor of the model that is the query itself, or, where a
    normalization lies on the way (a q-norm erases any factor before it), the normalization's gain (also
    one written as ``s + w``) and the biases after it. An attention whose factor no tensor can carry (a
    normalization without gain, a query the walk cannot follow) is described in ``blocked`` instead."""
    from graphscale.infer.values import SizeInfo, TensorInfo

    nodes = {n.name: n for n in plan.captured.gm.graph.nodes}
    # (attention, head_dim, where its query is: None for the first operand; the product's operand where
    # the op adds another term, ALiBi's baddbmm(bias, q, k))
    contractions: list[tuple[str, int, Any]] = [(a.node, a.dim, None) for a in plan.requests.scales]
    folded = _product_sums(plan, sizes)  # a sum of products with a tensor: folded whole, no attention
    contractions += [(m.node, m.dims[0], m.operand) for m in plan.requests.multipliers
                     if nodes[m.node].op != "call_module" and len(nodes[m.node].args) >= 2
                     and getattr(plan.node_rule(m.node), "kind", None) != "loss"  # a loss is no attention
                     and m.node not in folded and not _plain_sum(plan, nodes[m.node])]
    users_of_param = _params_by_node(plan)
    gain_users = _reads_per_tensor(plan)
    stop = set(users_of_param)
    out = []
    # an attention the output does not depend on (EncoderDecoder's encoder when the decoder has no
    # cross-attention) needs no factor: its tensors are left to the larger model
    live = live_nodes(plan.captured.gm)
    contractions = [c for c in contractions if nodes[c[0]] in live]
    attentions = {nodes[c[0]] for c in contractions}  # a query two attentions read is folded for both
    # every node some attention's query is computed from, back to its projection (a rotary's halves, each
    # time step of a recurrence that picks q[:, :, t]): a reader among them is no side reader, since its
    # attention folds the same. Not past an op with weights: before it lies the previous layer
    queries: set[str] = set()
    todo = [a for c in contractions for a in ([get_arg(nodes[c[0]], c[2])] if c[2] is not None
                                               else nodes[c[0]].all_input_nodes[:1])]
    while todo:
        x = todo.pop()
        if isinstance(x, fx.Node) and x.name not in queries:
            queries.add(x.name)
            if x.name not in stop:
                todo.extend(x.all_input_nodes)
    slices: dict[str, list[SliceBounds]] = {}  # the engine's wide bounds of each slice, by node
    for bound in plan.requests.slices:
        slices.setdefault(bound.node, []).append(bound)

    def rows(pnames: list[str], node: fx.Node, segment: tuple[int, int] | None, m: int,
             offset: float = 0.0) -> list[QueryFold]:
        info = plan.node_info[node.name]
        assert isinstance(info, TensorInfo)
        out_root = sizes.res.root(info.dims[-1])
        found = []
        for pname in pnames:
            pname = plan.canonical(pname)
            for ax, d in enumerate(plan.tensor_dims[pname]):
                if sizes.res.root(d) == out_root:
                    lo, hi = segment or (0, sizes.wide(d))
                    found.append((pname, ax, lo, hi, m, offset))
        return found

    for node_name, dim, query_at in contractions:
        m = sizes.mult(dim)
        if m == 1:
            continue
        if query_at is not None:
            node = get_arg(nodes[node_name], query_at)
        else:  # the first tensor operand: torch.einsum's first argument is its equation
            node = next((a for a in nodes[node_name].args if isinstance(a, fx.Node)), None)
        segment: tuple[int, int] | None = None
        picks: list[tuple[tuple, int]] = []  # (axis tree, position) of each unbind/select on the way
        cut: tuple | None = None  # (factors, wide start, stop) of a slice on the way, or (factors, why not)
        splits: list[tuple] = []  # (factors, wide start, stop) of each part of a split on the way
        # ("mul" | "add", tensor, node, s), attention side first; s: the constant of a gain written s + w
        affine: list[tuple[str, str, fx.Node, float]] = []
        normalized = False
        before, reasons = len(out), len(blocked) if blocked is not None else 0
        last = node
        walked: list[fx.Node] = []  # the query's way back, attention side first
        whole_from = 0  # walked[:whole_from + 1] hold only the query (before a pick, split or slice of it)
        for _ in range(64):
            if not isinstance(node, fx.Node):
                break
            walked.append(node)
            if getattr(plan.node_rule(node.name), "kind", None) in ("layer_norm", "group_norm"):
                # y = norm(x) * w + b: w and b carry the factor, as a projection's weight and bias do
                own = users_of_param.get(node.name, [])
                weight = _norm_weight(plan, node)
                affine += [("add", p, node, 0.0) for p in own if p != weight]
                affine += [("mul", weight, node, 0.0)] if weight in own else []
                normalized = True
                break
            own = users_of_param.get(node.name)
            if own is None and _op_name(node) in ("linear", "matmul", "mm", "bmm"):
                # a projection by one expert's slice of a stacked weight (JetMoE's weight[e]): the rows of
                # the stacked tensor along the output axis
                picked = [p for a in _node_args(node) if (p := _picked_tensor(plan, a)) is not None]
                own = picked[:1] or None
            if node.op == "get_attr":  # the query is a tensor of the model itself (a learned latent query)
                name = _param_operand(plan, node)
                if name is None or gain_users.get(name, 0) > 1:
                    if blocked is not None:
                        blocked.append(f"attention {node_name!r}: its query is {node.target!r}, which "
                                       + ("is read elsewhere too, where a factor would change the function"
                                          if name else "no copy scale describes"))
                    break
                own = [name]
            if own is not None:
                info = plan.node_info[node.name]
                # a position picked of an axis that is no factor of this output (a time step of a
                # recurrence, xLSTM's q[:, :, t]) picks no rows of it; the one nearest the projection counts
                relevant = [p for p in picks if isinstance(info, TensorInfo)
                            and _axis_has(plan, info.dims[-1], p[0])]
                pick = relevant[-1] if relevant else None
                if cut is not None and pick is None and segment is None and isinstance(info, TensorInfo) \
                        and tuple(plan.resolution.factors(info.dims[-1])) == cut[0]:
                    if isinstance(cut[1], str):  # the slice took part of this output, but not whole parts
                        if blocked is not None:
                            blocked.append(f"attention {node_name!r}: {cut[1]}")
                        break
                    segment = (cut[1], cut[2])  # rows of this output (Phi-3's qkv[..., :q_size])
                own_axis = tuple(plan.resolution.factors(info.dims[-1])) \
                    if isinstance(info, TensorInfo) else ()
                matching = [c[1:] for c in splits if c[0] == own_axis]
                if matching and segment is None:
                    segment = matching[-1]  # the part of a split of this very output (GPT-2's c_attn)
                blocks: list[tuple[int, int]] = []  # the query's rows, one block per head if strided
                if pick is not None:
                    picked_blocks = _picked_rows(plan, sizes, node, pick, segment)
                    if not picked_blocks:
                        if blocked is not None:
                            blocked.append(f"attention {node_name!r}: its query is position {pick[1]} of "
                                           f"an axis that is no fixed factor of {node.name!r}'s output, "
                                           "so no rows of it hold the query alone")
                        break
                    if len(picked_blocks) == 1:
                        segment = picked_blocks[0]
                    else:
                        blocks = picked_blocks
                if blocks:  # BLOOM's heads x (q | k | v) x head_dim: each head's query rows
                    out.extend(r for b in blocks for r in rows(own, node, b, m))
                    break
                # another reader of the query on its way (ConvBERT's key_conv * q, CoaT's q * conv(v))
                # gets the factor too: the weights producing its other operand carry the inverse
                found = len(walked) if not (picks or splits or cut or blocks or segment) else whole_from + 1
                side, why = _side_compensations(plan, sizes, queries, walked[:found], attentions, m, live,
                                                users_of_param)
                if why is not None:
                    if blocked is not None:
                        blocked.append(f"attention {node_name!r}: {why}")
                    break
                out.extend(rows(own, node, segment, m))
                assembled, why = _concatenated_bias_rows(plan, sizes, node, segment, m)
                if why is not None:
                    if blocked is not None:
                        blocked.append(f"attention {node_name!r}: {why}")
                    break
                out.extend(assembled)
                out.extend(r for a in affine if a[0] == "add" for r in rows([a[1]], a[2], None, m))
                out.extend(side)
                break
            picked = _pick(plan, node)
            if cut is None:
                cut = _slice_rows(plan, sizes, node, slices.get(node.name, []))
            if not (picks or splits or cut) and (picked is not None or node.target is operator.getitem):
                whole_from = len(walked) - 1  # this node selects the query: it and those before hold it alone
            if picked is not None:
                picks.append(picked)
            elif node.target is operator.getitem and isinstance(node.args[0], fx.Node):
                parts = plan.node_info.get(node.args[0].name)
                whole = _node_args(node.args[0])
                whole_info = plan.node_info.get(whole[0].name) if whole else None
                if isinstance(parts, tuple) and isinstance(node.args[1], int) \
                        and all(isinstance(p, TensorInfo) for p in parts) \
                        and isinstance(whole_info, TensorInfo):
                    k = node.args[1]
                    part_dims = [p.dims[-1] for p in parts]
                    lo = sum(sizes.wide(d) for d in part_dims[:k])
                    # rows of a projection only if the split axis is its output axis (a rotary's halves
                    # of head_dim are no rows of it): decided at the projection, as for a slice
                    splits.append((tuple(plan.resolution.factors(whole_info.dims[-1])), lo,
                                   lo + sizes.wide(part_dims[k])))
            if _op_name(node) in ("index_add", "index_add_") and len(node.args) >= 4 \
                    and isinstance(node.args[3], fx.Node) and isinstance(node.args[0], fx.Node) \
                    and _op_name(node.args[0]) in ("zeros", "new_zeros", "zeros_like"):
                last, node = node, node.args[3]  # rows scattered into zeros (a MoE's tokens): the source
                continue
            if _op_name(node) in _NONLINEAR:  # f(a x) != a f(x): no factor before it reaches the query
                if blocked is not None:
                    blocked.append(f"attention {node_name!r}: its query passes through {_op_name(node)} "
                                   f"at node {node.name!r}, which a factor in the weights before it does not "
                                   "pass")
                break
            target = _target(node)
            tensor_args = [a for a in node.args if isinstance(a, fx.Node)]
            if not tensor_args and node.args and isinstance(node.args[0], (list, tuple)):
                tensor_args = [a for a in node.args[0] if isinstance(a, fx.Node)]  # cat: a partial rotary
            # sizes (x.shape[0] as expand's argument under fx) are no operands the query flows through
            tensor_args = [a for a in tensor_args if not isinstance(plan.node_info.get(a.name), SizeInfo)]
            path, param = _data_and_param(plan, tensor_args)
            if len(path) == 2 and (target in _MUL or target in _DIV):
                a, b = path
                if a.name in _ancestors(b, stop) or b.name in _ancestors(a, stop):
                    normalized = True  # x * rsqrt(mean(x**2)), x / ||x||: the scale of x is erased
                    break
            if param is not None and (target in _MUL or target in _ADD):
                affine.append(("mul" if target in _MUL else "add", param, node, 0.0))
            elif (shifted := _shifted_gain(plan, node, path)) is not None:  # Gemma 3's q-norm: x * (1 + w)
                gain, offset, data = shifted
                affine.append(("mul", gain, node, offset))
                path = [data]
            if not path and len(tensor_args) == 1 and param is None \
                    and _param_operand(plan, tensor_args[0]) is not None:
                path = tensor_args  # views of a tensor of the model: the walk follows them to it
            last, node = node, (path[0] if path else None)
        if not normalized:
            if len(out) == before and blocked is not None and len(blocked) == reasons:
                # no tensor found, and no reason known: the query may still need a factor, so this is no
                # attention that can be skipped (a walk that took the wrong operand ends here too)
                where = node.name if isinstance(node, fx.Node) else \
                    last.name if isinstance(last, fx.Node) else node_name
                blocked.append(f"attention {node_name!r}: its query could not be followed back to a tensor "
                               f"of the model (the walk stopped at {where})")
            continue
        # a normalization: the factor goes into the gain nearest to it and every bias after it
        muls = [i for i, a in enumerate(affine) if a[0] == "mul"]
        where = f"attention {node_name!r}: its query is normalized at node {node.name!r}"
        if not muls:
            if blocked is not None:
                blocked.append(f"{where} with no gain after it to carry the factor")
            continue
        i = muls[-1]
        chosen = [affine[i]] + [a for a in affine[:i] if a[0] == "add"]
        shared = [a[1] for a in chosen if gain_users.get(a[1], 0) > 1]
        found = [r for a in chosen for r in rows([a[1]], a[2], None, m, a[3])]
        if shared or len(found) != len(chosen):
            if blocked is not None:
                why = f"{', '.join(shared)} is used elsewhere too" if shared else \
                    "its gain has no axis along head_dim"
                blocked.append(f"{where}, and {why}")
            continue
        out.extend(found)
    # a projection shared by several attentions (ALBERT applies one layer at every depth) is folded once
    unique: dict[tuple[str, int, int, int], tuple[int, float]] = {}
    for name, axis, lo, hi, m, offset in out:
        if unique.setdefault((name, axis, lo, hi), (m, offset)) != (m, offset):
            raise WidthConflictError(
                f"{name} (axis {axis}, {lo}:{hi}) is the query of attentions whose head_dim grows by "
                f"{unique[(name, axis, lo, hi)][0]} and by {m}: no one factor folded into it suits both; use "
                "graphscale.widen, which scales each attention in the graph")
    return [(*key, *value) for key, value in unique.items()]


def _side_compensations(plan: Plan, sizes: Sizes, into_query: set[str], way: list[fx.Node],
                        attentions: set[fx.Node], m: int, live: set[fx.Node],
                        users_of_param: dict[str, list[str]]) -> tuple[list[QueryFold], str | None]:
    """The folds that undo the query's factor where another reader of the query uses it: each reader of a
    node on ``way`` (the query's way back from the attention, as far as it holds only the query) that
    neither leads into a query (``into_query``: the nodes the attentions' queries are computed from) nor
    is an attention must be a product with a tensor that ops of the model produce (through views and the
    parts of a ``cat``), each read only there: their weights and biases carry the inverse factor, ``1/m``
    in place of ``m`` (``users_of_param``: :func:`_params_by_node`). Returns the folds, or why none can."""
    from graphscale.infer.values import SizeInfo, TensorInfo

    folds: list[QueryFold] = []
    for n in way:
        info = plan.node_info.get(n.name)
        if not isinstance(info, TensorInfo):  # parts of a split or unbind: the pick after them is on the way
            continue
        for user in n.users:
            value = plan.node_info.get(user.name)
            sizes_only = isinstance(value, SizeInfo) or (isinstance(value, tuple) and value
                                                         and all(isinstance(v, SizeInfo) for v in value))
            if user in attentions or user.name in into_query or user not in live or sizes_only:
                continue  # x.shape, x.size(): no value of the query
            head = plan.resolution.root(info.dims[-1])
            prev, mul = n, user  # through views and slices of other axes (CoaT's q[:, :, 1:]) to the product
            while _target(mul) not in _MUL:
                value = plan.node_info.get(mul.name)
                if not (_op_name(mul) in _PASS_THROUGH or mul.target is operator.getitem) \
                        or len(mul.users) != 1 or not isinstance(value, TensorInfo) \
                        or plan.resolution.root(value.dims[-1]) != head:
                    return [], (f"its query is also read by {user.name!r}, where its further factor would "
                                "change the function (no product with a tensor whose weights could undo it)")
                prev, mul = mul, next(iter(mul.users))
            others = [a for a in _node_args(mul) if a is not prev]
            if len(others) != 1:
                return [], f"its query is also read by {user.name!r}, a product of the query with itself"
            # the other factor's producers: through views to ops with weights, the parts of a cat each
            producers, todo = [], [others[0]]
            while todo:
                x = todo.pop()
                if x.name in users_of_param:
                    producers.append(x)
                elif "cat" in _op_name(x) and x.args and isinstance(x.args[0], (list, tuple)) \
                        and _readers(x) == 1:
                    todo.extend(a for a in x.args[0] if isinstance(a, fx.Node))
                elif _op_name(x) in _PASS_THROUGH and _readers(x) == 1 and _node_args(x):
                    todo.append(_node_args(x)[0])
                else:
                    return [], (f"its query is also read by {mul.name!r}, and the other factor there is not "
                                "the output of ops with weights of their own")
            tree = plan.resolution.tree(info.dims[-1])
            for producer in producers:
                # weights shared by several such readers (CoaT's one crpe per stage, called by each block)
                # get the same inverse from each; the filled model's output check judges any other use
                params = users_of_param[producer.name]
                if _readers(producer) != 1:
                    return [], (f"its query is also read by {mul.name!r}, and {producer.name!r}, whose "
                                "weights would undo its factor there, is read elsewhere too")
                for pname in params:
                    pname = plan.canonical(pname)
                    axes = [ax for ax, d in enumerate(plan.tensor_dims[pname]) if _axis_has(plan, d, tree)]
                    if len(axes) != 1:
                        return [], (f"its query is also read by {mul.name!r}, and {pname} has no one axis "
                                    "along the query's to undo its factor on")
                    wide = sizes.wide(plan.tensor_dims[pname][axes[0]])
                    folds.append((pname, axes[0], 0, wide, 1.0 / m, 0.0))
    return folds, None


def _concatenated_bias_rows(plan: Plan, sizes: Sizes, node: fx.Node, segment: tuple[int, int] | None,
                            m: int) -> tuple[list[QueryFold], str | None]:
    """The rows ``segment`` (None: all) of ``node``'s output that a bias assembled in the graph covers,
    as ``(tensor, axis, start, stop, m)``: timm's BEiT passes ``cat(q_bias, k_bias, v_bias)`` as its
    fused projection's bias, so the query's factor belongs in ``q_bias``, which the op does not read
    directly. The second value says why no tensor can carry the factor (a computed part), else None."""
    from graphscale.infer.values import TensorInfo

    info = plan.node_info[node.name]
    if not isinstance(info, TensorInfo):
        return [], None
    out_root = sizes.res.root(info.dims[-1])
    lo, hi = segment or (0, sizes.wide(info.dims[-1]))
    found = []
    for arg in _node_args(node):
        parts = arg.args[0] if "cat" in _op_name(arg) and arg.args else None
        cat_info = plan.node_info.get(arg.name)
        if not isinstance(parts, (list, tuple)) or not isinstance(cat_info, TensorInfo):
            continue
        dim = arg.args[1] if len(arg.args) > 1 else arg.kwargs.get("dim", 0)
        if not isinstance(dim, int) or dim % len(cat_info.dims) != len(cat_info.dims) - 1 \
                or sizes.res.root(cat_info.dims[-1]) != out_root:
            continue  # not a concatenation along the output axis
        start = 0
        for part in parts:
            part_info = plan.node_info.get(part.name) if isinstance(part, fx.Node) else None
            if not isinstance(part_info, TensorInfo):
                return [], f"{arg.name!r}, a concatenation added in {node.name!r}, has a part not a tensor"
            width = sizes.wide(part_info.dims[-1])
            a, b = max(lo, start), min(hi, start + width)
            if a < b:
                name = _param_operand(plan, part)
                if name is None:
                    return [], (f"rows {a}:{b} of {arg.name!r}, a concatenation added in {node.name!r}, are "
                                f"computed ({part.name!r}), not a tensor of the model that could carry the "
                                "query's factor")
                found.append((name, len(plan.tensor_dims[name]) - 1, a - start, b - start, m, 0.0))
            start += width
    return found, None


def _slice_rows(plan: Plan, sizes: Sizes, node: fx.Node, bounds: list[SliceBounds]
                ) -> tuple[tuple, int, int] | tuple[tuple, str] | None:
    """Where ``node`` slices one axis ``j`` of its input (Phi-3's ``qkv[..., :q_size]``, Falcon's
    ``qkv.view(b, t, heads + 2, d)[..., :-2, :]``): ``(factors, wide start, wide stop)``, the rows it
    keeps of the axis that flattens axes ``j..`` (``factors``: their resolution trees, outermost first),
    from the wide bounds the engine gave the slice (``bounds``: its :class:`SliceBounds`, which widen
    rewrites the slice to); ``(factors, why not)`` for a stepped slice; None where ``node`` is no slice of
    one axis. The caller uses it only for a projection whose output axis has exactly those factors: a
    slice of head_dim alone (a rotary's) says nothing about a projection's rows."""
    from graphscale.infer.values import TensorInfo

    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    info = plan.node_info.get(source.name) if source is not None else None
    out = plan.node_info.get(node.name)
    if len(bounds) != 1 or not isinstance(info, TensorInfo) or not isinstance(out, TensorInfo) \
            or len(info.dims) != len(out.dims):
        return None
    res = plan.resolution
    cut = [j for j, (a, b) in enumerate(zip(info.dims, out.dims)) if res.root(a) != res.root(b)]
    if len(cut) != 1:
        return None
    axis = cut[0]
    factors = tuple(f for d in info.dims[axis:] for f in res.factors(d))
    before, part = bounds[0].before, bounds[0].part
    if res.root(part) != res.root(out.dims[axis]):  # x[j::s] spans the axis: its rows are strided
        return factors, f"{node.name!r} slices its query with a step"
    lo = sizes.wide(before) if before is not None else 0
    rest = math.prod(sizes.wide(d) for d in info.dims[axis + 1:])
    return factors, lo * rest, (lo + sizes.wide(part)) * rest


def _pick(plan: Plan, node: fx.Node) -> tuple[tuple, int] | None:
    """``(tree of the axis, position)`` where ``node`` takes one position of an axis: a part of
    ``unbind`` (timm's ``q, k, v = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)``), a
    ``select``, or fx's index with one int (``qkv[0]``, ``fused[..., 0, :]``); None otherwise."""
    source, axis, index = None, None, None
    if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
        unbind = node.args[0]
        if "unbind" in str(_target(unbind)) and unbind.args and isinstance(unbind.args[0], fx.Node):
            source, index = unbind.args[0], node.args[1]
            axis = unbind.args[1] if len(unbind.args) > 1 else unbind.kwargs.get("dim", 0)
        elif type(node.args[1]) is int and hasattr(plan.node_info.get(node.args[0].name), "dims"):
            source, axis, index = node.args[0], 0, node.args[1]  # fx's qkv[0] of a tensor: its leading axis
        elif isinstance(node.args[1], tuple):  # fx's x[..., i, :]: one int, every other entry whole
            entries = node.args[1]
            ints = [i for i, e in enumerate(entries) if type(e) is int]
            whole = all(type(e) is int or e is Ellipsis or e == slice(None) for e in entries)
            ellipsis = [i for i, e in enumerate(entries) if e is Ellipsis]
            source_info = plan.node_info.get(node.args[0].name)
            if len(ints) == 1 and whole and len(ellipsis) <= 1 and hasattr(source_info, "dims"):
                at = ints[0]
                ndim = len(source_info.dims)  # type: ignore[union-attr]
                source, index = node.args[0], entries[at]
                axis = at if not ellipsis or ellipsis[0] > at else ndim - (len(entries) - at)
    elif "select" in str(_target(node)) and len(node.args) == 3 and isinstance(node.args[0], fx.Node):
        source, axis, index = node.args
    if source is None or not isinstance(axis, int) or not isinstance(index, int):
        return None
    info = plan.node_info.get(source.name)
    if not hasattr(info, "dims"):
        return None
    dims = info.dims  # type: ignore[union-attr]
    axis = axis % len(dims)
    index = index % plan.resolution.size(dims[axis])
    return plan.resolution.tree(dims[axis]), index


def _picked_rows(plan: Plan, sizes: Sizes, node: fx.Node, pick: tuple[tuple, int],
                 segment: tuple[int, int] | None) -> list[tuple[int, int]] | None:
    """The wide rows of ``node``'s output axis that position ``pick[1]`` of the picked axis covers, as
    blocks ``(start, stop)``: one block where that axis is the leading factor of the output axis (the
    ``3`` of a fused ``3 x heads x head_dim``), one per index of the factors before it where it is
    another (BLOOM's ``heads x 3 x head_dim``: the query's rows of each head). None where the picked axis
    grows or is no factor of the output, or a segment was already taken.

    The output axis may be resolved as a concatenation of equal parts that is also reshaped into
    ``n x rest`` (timm's BEiT adds ``cat(q_bias, k_bias, v_bias)`` to its fused projection): position
    ``p`` is then part ``p``, the ``p``-th of ``n`` equal blocks in the wide layout as in the narrow one."""
    from graphscale.infer.values import TensorInfo

    info = plan.node_info[node.name]
    if segment is not None or not isinstance(info, TensorInfo):
        return None
    res = plan.resolution
    outer = AxisReplication(sizes.record_tree(pick[0]))
    if outer.multiplier != 1:  # a picked axis that grows is no count of parts
        return None
    n, wide = outer.narrow_size, sizes.wide(info.dims[-1])
    factors = res.factors(info.dims[-1])
    leading = len(factors) >= 2 and factors[0] == pick[0]
    if not leading and factors[0][0] == "sum":
        # the engine knows the axis as both parts and a product: leading only if a product puts it first
        parts = factors[0][1]
        products = res.prods.get(res.root(info.dims[-1]), [])
        leading = (len(factors) == 1 and len(parts) == n
                   and len({sizes.record_tree(q) for q in parts}) == 1
                   and any(res.factors(f[0])[0] == pick[0] for f in products if f))
    if leading:
        return [(pick[1] * (wide // n), (pick[1] + 1) * (wide // n))] if not wide % n else None
    if pick[0] not in factors[1:]:
        return None
    j = list(factors).index(pick[0])
    before = math.prod(AxisReplication(sizes.record_tree(f)).wide_size for f in factors[:j])
    inner = math.prod(AxisReplication(sizes.record_tree(f)).wide_size for f in factors[j + 1:])
    if before * n * inner != wide:
        return None
    return [(o * n * inner + pick[1] * inner, o * n * inner + (pick[1] + 1) * inner) for o in range(before)]


def _in_tree(tree: tuple, within: tuple) -> bool:
    """Whether the resolution tree ``tree`` is ``within`` or one of its subtrees."""
    return tree == within or any(isinstance(t, tuple) and _in_tree(tree, t) for t in within)


def _axis_has(plan: Plan, dim: int, tree: tuple) -> bool:
    """Whether the axis with resolution ``tree`` is a factor (or part) of ``dim`` in any of the ways the
    engine knows ``dim`` (its tree, and every product it is: timm's BEiT qkv axis is both three bias parts
    and ``3 x heads x head_dim``). A position picked of an axis that is none (a time step of a recurrence,
    xLSTM's ``q[:, :, t]``) picks no rows of a projection's output."""
    res = plan.resolution
    return _in_tree(tree, res.tree(dim)) or any(
        _in_tree(tree, res.tree(f)) for fs in res.prods.get(res.root(dim), []) for f in fs)


def _norm_weight(plan: Plan, node: fx.Node) -> str | None:
    """The gain of a layer_norm/group_norm node (a module's ``weight``, or the ``weight`` argument)."""
    if node.op == "call_module":
        module = plan.captured.gm.get_submodule(str(node.target))
        has = getattr(module, "weight", None) is not None
        return plan.canonical(f"{node.target}.weight") if has else None
    arg = node.args[2] if len(node.args) > 2 else node.kwargs.get("weight")
    return _param_operand(plan, arg) if isinstance(arg, fx.Node) else None
