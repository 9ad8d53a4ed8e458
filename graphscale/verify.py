"""Verify: property-based checks that a widened model computes exactly what the narrow one does.

:func:`verify` analyses a model once, then lets Hypothesis draw per-class multipliers, input batches
(other batch sizes and, where the graph allows, other sequence lengths; random values) and dtypes. Each
draw widens the model and compares every intermediate activation of the wide graph with the narrow one
replicated along its width axes (``E(h)``), and the outputs. The report gives the worst error per graph
node and, on failure, Hypothesis's shrunk failing example. The same pieces are exported as strategies in
:mod:`graphscale.testing` for users' own test suites.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    >>> report = verify(model, (torch.randn(3, 4),), max_examples=5)
    >>> report.ok
    True
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from graphscale.capture import get_frontend, preserved_buffers
from graphscale.infer.values import TensorInfo
from graphscale.mupcompat import deepcopy_keeping_tensor_attributes
from graphscale.plan import Plan, Sizes, analyze
from graphscale.widen import widen

DEFAULT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@dataclass
class NodeError:
    """The worst error seen at one graph node, relative to ``1 + max |narrow activation|``."""

    node: str
    error: float
    scale: float

    @property
    def relative(self) -> float:
        return self.error / (1.0 + self.scale)


@dataclass
class VerifyReport:
    """What :func:`verify` found: per-node worst errors, the output error and any failing example."""

    ok: bool
    examples: int
    output_error: float = 0.0
    nodes: dict[str, NodeError] = field(default_factory=dict)
    failure: str | None = None
    failing_example: dict[str, Any] | None = None
    training: list[float] = field(default_factory=list)  # worst relative output divergence per step

    def worst(self, n: int = 5) -> list[NodeError]:
        return sorted(self.nodes.values(), key=lambda e: e.relative, reverse=True)[:n]

    def __str__(self) -> str:
        status = "OK" if self.ok else "FAILED"
        lines = [f"graphscale verify: {status} after {self.examples} drawn examples; "
                 f"max relative output error {self.output_error:.3g}"]
        lines.append("worst nodes (error / (1 + max|activation|)):")
        for e in self.worst():
            lines.append(f"  {e.node:<40} {e.relative:.3g}")
        if self.training:
            lines.append(f"training ({len(self.training)} steps, zero noise, μP optimizer vs plain): worst "
                         f"relative divergence {max(self.training):.3g} (step {_argmax(self.training) + 1})")
        if self.failure:
            lines.append(f"failure: {self.failure}")
        if self.failing_example:
            lines.append(f"shrunk failing example: {self.failing_example}")
        return "\n".join(lines)


class _Recorder(fx.Interpreter):
    """Runs a graph and keeps every tensor a node produces (like torch's ShapeProp, but the values)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)
        self.acts: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.acts[n.name] = out.detach()
        return out


def run_recording(gm: fx.GraphModule, flat_inputs: list[Any]) -> tuple[Any, dict[str, torch.Tensor]]:
    """Run ``gm`` on flat inputs (one per placeholder) and return (output, activations by node)."""
    rec = _Recorder(gm)
    with torch.no_grad(), preserved_buffers(gm):
        out = rec.run(*flat_inputs, enable_io_processing=False)
    return out, rec.acts


def compare_activations(plan: Plan, multipliers: dict[str, int], narrow: dict[str, torch.Tensor],
                        wide: dict[str, torch.Tensor]) -> dict[str, NodeError]:
    """Each wide activation against the narrow one repeated along its width axes; errors by node."""
    sizes = Sizes(plan, multipliers)
    skip = {m.node for m in plan.requests.multipliers}
    # Parameters are not activations: a wide parameter is c * E(P), not E(P).
    skip |= {n.name for n in plan.captured.gm.graph.nodes if n.op == "get_attr"}
    out: dict[str, NodeError] = {}
    for name, a in narrow.items():
        info = plan.node_info.get(name)
        if name in skip or name not in wide or not isinstance(info, TensorInfo) or not a.is_floating_point():
            continue
        expected = a
        for dim, d in enumerate(info.dims):
            ax = sizes.axis(d)
            if not ax.is_identity():
                expected = expected.index_select(dim, ax.index(a.device))
        got = wide[name]
        if got.shape != expected.shape:
            out[name] = NodeError(name, float("inf"), 0.0)
            continue
        err, scale = _max_error(got, expected)
        out[name] = NodeError(name, err, scale)
    return out


def _max_error(got: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """Max abs difference (equal infinities and NaN in both count as equal; any other NaN is an infinite
    error) and max finite |expected|."""
    if not got.numel():
        return 0.0, 0.0
    g, e = got.double(), expected.double()
    same = (g == e) | (torch.isnan(g) & torch.isnan(e))
    diff = torch.where(same, torch.zeros_like(g), (g - e).abs())
    diff = torch.nan_to_num(diff, nan=float("inf"))
    finite = e[torch.isfinite(e)]
    return diff.max().item(), finite.abs().max().item() if finite.numel() else 0.0


def flat_variant(plan: Plan, values: list[Any]) -> list[Any]:
    """Flat inputs for the captured graph with tensor leaves replaced by ``values`` in order."""
    it = iter(values)
    return [next(it) if isinstance(x, torch.Tensor) else x for x in plan.captured.flat_inputs]


def input_strategy(plan: Plan, vary_batch: bool, vary_seq: bool) -> st.SearchStrategy[list[torch.Tensor]]:
    """Random tensors shaped like the example inputs; batch (dim 0) and sequence (dim 1 of integer
    inputs) sizes drawn up to the example's when the graph allows it."""
    examples = [x for x in plan.captured.flat_inputs if isinstance(x, torch.Tensor)]

    @st.composite
    def inputs(draw: Any) -> list[torch.Tensor]:
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        batch = draw(st.integers(1, max(1, examples[0].shape[0]))) \
            if vary_batch and examples and examples[0].dim() > 0 else None
        seq = draw(st.integers(1, max(1, examples[0].shape[1]))) \
            if vary_seq and examples and examples[0].dim() > 1 else None
        out = []
        for x in examples:
            shape = list(x.shape)
            if batch is not None and shape:
                shape[0] = batch
            if seq is not None and len(shape) > 1 and not x.is_floating_point():
                shape[1] = seq
            if x.is_floating_point():
                out.append(torch.randn(shape, generator=gen, dtype=x.dtype))
            elif x.dtype == torch.bool:
                out.append(torch.ones(shape, dtype=torch.bool))
            else:
                lo, hi = int(x.min()), int(x.max())
                out.append(torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype))
        return out

    return inputs()


def multiplier_strategy(plan: Plan, choices: tuple[int, ...] = (1, 2, 3, 4)) -> st.SearchStrategy[dict]:
    """Per-class multipliers, each drawn from ``choices`` (classes named as in ``plan``)."""
    return st.fixed_dictionaries({c.name: st.sampled_from(choices) for c in plan.width_classes})


def _runs(gm: fx.GraphModule, flat: list[Any]) -> bool:
    try:
        with torch.no_grad(), preserved_buffers(gm):
            fx.Interpreter(gm).run(*flat, enable_io_processing=False)
        return True
    except Exception:
        return False


def verify(model: torch.nn.Module, example_inputs: Any, *, multiplier: int | dict[str, int] | None = None,
           max_examples: int = 20, dtypes: tuple[torch.dtype, ...] = (torch.float64, torch.float32),
           choices: tuple[int, ...] = (1, 2, 3, 4), tolerance: dict[torch.dtype, float] | None = None,
           tracer: str = "auto", rules: Any = None, heads: str = "fixed", outputs: str = "fixed",
           seed: int = 0, plan: Plan | None = None, steps: int = 0,
           optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
           hparams: dict[str, Any] | None = None) -> VerifyReport:
    """Check with Hypothesis that widening ``model`` is exact (see module doc).

    Never raises on a mismatch or on a failure to widen or run the wide model: those give a report with
    ``ok=False`` and the reason in ``failure``. A model that analysis refuses (an op with no rule, ...)
    raises that :class:`~graphscale.errors.GraphscaleError`, as :func:`graphscale.analyze` does.

    ``multiplier`` fixes the multipliers instead of drawing them. ``tolerance`` maps a dtype to the allowed
    max error relative to ``1 + max |activation|`` (defaults: 1e-10 for float64, 1e-5 for float32).
    ``steps > 0`` also trains the narrow model and its zero-noise widening side by side for that many
    steps with ``optimizer`` (plain vs :func:`graphscale.mup_optimizer`, float64) and reports the worst
    divergence per step (:func:`verify_training`); it must stay within the float64 tolerance.

    Example:
        >>> verify(torch.nn.Linear(3, 2), (torch.randn(2, 3),), max_examples=2).examples
        2
    """
    tol = {**DEFAULT_TOLERANCE, **(tolerance or {})}  # dtype keys: dict(..., **tolerance) would need str keys
    base_plan = plan or analyze(model, example_inputs, tracer=tracer, rules=rules, heads=heads,  # type: ignore[arg-type]
                                outputs=outputs)  # type: ignore[arg-type]
    report = VerifyReport(ok=True, examples=0)
    plans: dict[torch.dtype, Plan] = {}

    def plan_for(dtype: torch.dtype) -> Plan:
        if dtype not in plans:
            plans[dtype] = base_plan if _float_dtype(base_plan) == dtype else analyze(
                deepcopy_keeping_tensor_attributes(model).to(dtype), _cast(example_inputs, dtype),
                tracer=tracer, rules=rules, heads=heads, outputs=outputs)  # type: ignore[arg-type]
        return plans[dtype]

    probe = [x for x in base_plan.captured.flat_inputs if isinstance(x, torch.Tensor)]
    small = [x[:1] if x.dim() > 0 else x for x in probe]
    vary_batch = get_frontend(base_plan.frontend).shapes_generalize and \
        _runs(base_plan.captured.gm, flat_variant(base_plan, small))
    mult_st = st.just(base_plan.multipliers(multiplier)) if multiplier is not None else \
        multiplier_strategy(base_plan, choices)
    last_failure: dict[str, Any] = {}

    @settings(max_examples=max_examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(mults=mult_st, inputs=input_strategy(base_plan, vary_batch, vary_seq=vary_batch),
           dtype=st.sampled_from(dtypes))
    def check(mults: dict[str, int], inputs: list[torch.Tensor], dtype: torch.dtype) -> None:
        inputs = [x.to(dtype) if x.is_floating_point() else x for x in inputs]
        try:
            p = plan_for(dtype)
            wide = widen(p.captured.gm, None, mults, plan=p)
            # each run gets its own inputs: a forward that writes into its input must not feed the other
            n_out, n_acts = run_recording(p.captured.gm, flat_variant(p, [x.clone() for x in inputs]))
            _, w_acts = run_recording(wide, flat_variant(p, [x.clone() for x in inputs]))
        except Exception as e:  # a failure to widen or run is a failed check, reported like a mismatch
            last_failure.clear()
            last_failure.update(multipliers=mults, dtype=str(dtype), shapes=[tuple(x.shape) for x in inputs],
                                error=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300])
            raise AssertionError(f"widening or running failed in {dtype}: {last_failure['error']}") from e
        errors = compare_activations(p, mults, n_acts, w_acts)
        report.examples += 1
        worst_rel = 0.0
        for name, e in errors.items():
            prev = report.nodes.get(name)
            if prev is None or e.relative > prev.relative:
                report.nodes[name] = e
            worst_rel = max(worst_rel, e.relative)
        out_nodes = _output_nodes(p.captured.gm)
        out_rel = max((errors[n].relative for n in out_nodes if n in errors), default=0.0)
        report.output_error = max(report.output_error, out_rel)
        if worst_rel > tol[dtype]:
            bad = max(errors.values(), key=lambda e: e.relative)
            last_failure.clear()
            last_failure.update(multipliers=mults, dtype=str(dtype), shapes=[tuple(x.shape) for x in inputs],
                                node=bad.node, error=bad.relative)
            raise AssertionError(f"node {bad.node!r} differs by {bad.relative:.3g} (relative) in {dtype}, "
                                 f"tolerance {tol[dtype]:.1g}")

    try:
        check()
    except Exception as e:  # AssertionError, and Hypothesis's Flaky when a failure does not replay
        report.ok = False
        report.failure = _first_line(e)
        report.failing_example = dict(last_failure)
    if steps > 0:
        try:
            report.training = verify_training(
                model, example_inputs, steps=steps, optimizer=optimizer, hparams=hparams,
                multiplier=multiplier or 2, tracer=tracer, rules=rules, heads=heads, outputs=outputs)
        except Exception as e:
            report.ok = False
            report.failure = report.failure or f"training check failed: {_first_line(e)}"
            return report
        worst = max(report.training)
        if worst > tol[torch.float64] * 10:  # 200 steps of float64 rounding, amplified by training
            report.ok = False
            report.failure = report.failure or (
                f"training diverged: worst relative output divergence {worst:.3g} at step "
                f"{_argmax(report.training) + 1} of {steps}")
    return report


def _first_line(e: BaseException) -> str:
    """The report's reason: the check's own AssertionError as it is; anything else (a bug in the check
    itself, a Hypothesis error) prefixed with its type, so that it is not mistaken for a mismatch."""
    text = str(e).strip()
    if isinstance(e, BaseExceptionGroup) and e.exceptions:  # Hypothesis's FlakyFailure wraps the cause
        text = f"{text}: {_first_line(e.exceptions[0])}"
    line = text.splitlines()[0] if text else ""
    if not isinstance(e, AssertionError):
        line = f"{type(e).__name__}: {line}" if line else type(e).__name__
    return (line or type(e).__name__)[:500]


def _argmax(xs: list[float]) -> int:
    return max(range(len(xs)), key=xs.__getitem__)


def verify_training(model: torch.nn.Module, example_inputs: Any, *, steps: int = 10,
                    optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW,
                    hparams: dict[str, Any] | None = None, multiplier: int | dict[str, int] = 2,
                    dtype: torch.dtype = torch.float64, seed: int = 0, **analyze_kw: Any) -> list[float]:
    """Train the narrow model (plain ``optimizer``) and its zero-noise widening (``mup_optimizer``) side by
    side on the same random batches; return the worst relative output divergence after each step.

    The loss is a mean squared error against a fixed random target shaped like the output, so any model
    with floating outputs can be checked. Dynamic equivalence (docs/math.md §2) says the list stays at
    rounding level; a plain optimizer on the wide model does not.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        >>> max(verify_training(net, (torch.randn(4, 3),), steps=3)) < 1e-12
        True
    """
    from graphscale.capture import normalize_inputs
    from graphscale.train import mup_optimizer

    hparams = dict(hparams or {"lr": 1e-2})
    narrow = deepcopy_keeping_tensor_attributes(model).to(dtype)
    args, kwargs = normalize_inputs(_cast(example_inputs, dtype))
    wide = widen(narrow, (args, kwargs), multiplier, **analyze_kw)
    n_opt = optimizer(narrow.parameters(), **hparams)
    w_opt = mup_optimizer(wide, optimizer, **hparams)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = narrow(*args, **kwargs)
    target = torch.randn(out.shape, generator=gen, dtype=dtype)
    divergence = []
    for _ in range(steps):
        batch = [torch.randn(a.shape, generator=gen, dtype=a.dtype) if isinstance(a, torch.Tensor)
                 and a.is_floating_point() else a for a in args]
        n_out, w_out = narrow(*batch, **kwargs), wide(*batch, **kwargs)
        for opt, y in ((n_opt, n_out), (w_opt, w_out)):
            opt.zero_grad()
            ((y - target) ** 2).mean().backward()
            opt.step()
        with torch.no_grad():
            n_out, w_out = narrow(*batch, **kwargs), wide(*batch, **kwargs)
            divergence.append(((w_out - n_out).abs().max() / (1 + n_out.abs().max())).item())
    return divergence


def _output_nodes(gm: fx.GraphModule) -> list[str]:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    names: list[str] = []
    fx.node.map_arg(out.args, lambda n: names.append(n.name))
    return names


def _float_dtype(plan: Plan) -> torch.dtype | None:
    for p in plan.captured.gm.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def _cast(example_inputs: Any, dtype: torch.dtype) -> Any:
    import torch.utils._pytree as pytree

    return pytree.tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point()
                           else x, example_inputs)
