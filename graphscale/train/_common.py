"""Shared plumbing of the train-time pieces: finding a module's record and matching it to tensors.

Every train-time piece reads only the :class:`~graphscale.record.WideningRecord`; these helpers find it
(``module.graphscale``, an explicit ``record=`` -- a record, or the path of one saved with
:func:`graphscale.save_record` -- or one computed against a smaller ``base``) and check that it describes
the module it is applied to, so that a stale or foreign record fails loudly instead of silently training
with the wrong factors.

Wrappers are seen through: ``torch.compile`` (``_orig_mod``), ``DistributedDataParallel`` and
``DataParallel`` (``module``), FSDP1 (``_fsdp_wrapped_module``) and activation checkpointing
(``_checkpoint_wrapped_module``) rename every parameter with a prefix. The record is looked up on the
innermost module, and the wrapper's parameter names are matched to the record's by tensor identity (the
wrapper's parameter *is* the inner module's), so the same param groups, clipping and state transfer
result as for the bare model. FSDP2's ``fully_shard`` keeps the names and swaps every parameter for a
sharded ``DTensor`` of the same global shape: the record matches as is, DTensor's own ops reduce
clipping's norms across shards, and state transfer shards the state it writes like its parameter
(:func:`like_parameter`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from graphscale.errors import GraphscaleError
from graphscale.laws import OptimizerFamilyError  # noqa: F401 - re-exported: the laws table raises it
from graphscale.record import ParamScaling, WideningRecord, load_record

#: What ``record=`` accepts: a record, or the path of a saved one (a directory with ``graphscale.json``,
#: a JSON file, or a safetensors file whose metadata carries it).
RecordLike = WideningRecord | str | os.PathLike

#: Attribute under which each known wrapper keeps the module it wraps, and the prefix that adds to names.
WRAPPER_ATTRS: tuple[str, ...] = ("_orig_mod", "module", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")


class RecordError(GraphscaleError, ValueError):
    """A module has no widening record, or its record does not describe the module's tensors."""


def _is_wrapper(module: nn.Module, attr: str) -> bool:
    inner = module._modules.get(attr)
    if not isinstance(inner, nn.Module) or inner is module:
        return False
    if attr == "module":
        # Only modules whose whole job is to wrap one module: DDP and DataParallel (and their subclasses).
        # A user's own module with a child called "module" is not a wrapper.
        wrappers: tuple[type, ...] = (nn.DataParallel,)
        try:
            from torch.nn.parallel import DistributedDataParallel
            wrappers += (DistributedDataParallel,)
        except ImportError:  # pragma: no cover - torch built without distributed
            pass
        return isinstance(module, wrappers)
    return True


def unwrap_module(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``, DDP, DataParallel, FSDP1 and checkpoint wrappers (any nesting).

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> unwrap_module(nn.DataParallel(lin)) is lin
        True
    """
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(getattr(model, "graphscale", None), WideningRecord):
            return model  # the record lives here: no need to look further in
        for attr in WRAPPER_ATTRS:
            if _is_wrapper(model, attr):
                model = model._modules[attr]
                break
        else:
            return model
    return model


def _wrapper_aliases(model: nn.Module, inner: nn.Module, record: WideningRecord) -> WideningRecord:
    """``record`` with the wrapper's names of ``inner``'s tensors added, matched by tensor identity."""
    if inner is model:
        return record
    inner_names: dict[int, list[str]] = {}
    def tensors(m: nn.Module) -> list[tuple[str, torch.Tensor]]:
        return [*m.named_parameters(remove_duplicate=False), *m.named_buffers(remove_duplicate=False)]

    for n, t in tensors(inner):
        inner_names.setdefault(id(t), []).append(n)
    params = dict(record.params)
    for n, t in tensors(model):
        if n in params:
            continue
        for inner_name in inner_names.get(id(t), ()):
            if inner_name in record.params:
                params[n] = record.params[inner_name]
                break
    return WideningRecord(params, record.multipliers, record.frontend, record.notes, record.info)


def resolve_record(
    model: nn.Module,
    record: RecordLike | None = None,
    *,
    base: nn.Module | Mapping[str, int] | None = None,
    example_inputs: Any = None,
) -> WideningRecord:
    """The record to use for ``model``: ``record`` if given, else from ``base``, else ``model.graphscale``.

    ``record`` may be a :class:`WideningRecord` or the path of a saved one (:func:`graphscale.load_record`
    reads it), so a model that is not a graphscale GraphModule -- the same architecture, with the wide
    weights loaded into it -- gets the widened model's factors, matched by parameter name and shape.
    ``base`` (a smaller instance of the same architecture, or a dict of width-class multipliers) asks
    :func:`graphscale.relative_record` to compare ``model`` against it; that function belongs to the
    engine and is imported only when this path is used. ``model`` may be wrapped (see the module doc):
    the returned record then also answers to the wrapper's parameter names.

    Example:
        >>> lin = nn.Linear(2, 2)
        >>> rec = WideningRecord({n: ParamScaling(n, n, tuple(p.shape), tuple(p.shape), (None,) * p.ndim,
        ...                                       1.0, 1, 1) for n, p in lin.named_parameters()}, {})
        >>> sorted(resolve_record(nn.DataParallel(lin), rec).params)
        ['bias', 'module.bias', 'module.weight', 'weight']
    """
    inner = unwrap_module(model)
    if record is not None:
        if base is not None:
            raise RecordError("pass either record= or base=, not both")
        if isinstance(record, (str, os.PathLike)):
            record = load_record(record)
        if not isinstance(record, WideningRecord):
            raise RecordError(f"record= must be a WideningRecord or the path of a saved one, got "
                              f"{type(record).__name__}")
        return _wrapper_aliases(model, inner, record)
    if base is not None:
        try:
            from graphscale import relative_record  # lazy: the engine is optional for hand-built records
        except ImportError as e:  # pragma: no cover - depends on the engine being installed
            raise RecordError(
                "base= needs graphscale.relative_record, which this installation does not provide"
            ) from e
        if example_inputs is None:
            raise RecordError("base= needs example_inputs to trace the model and compare it with the base")
        if not isinstance(example_inputs, tuple):
            example_inputs = (example_inputs,)
        return _wrapper_aliases(model, inner, relative_record(inner, example_inputs, base))
    found = getattr(inner, "graphscale", None)
    if not isinstance(found, WideningRecord):
        raise RecordError(
            f"{type(model).__name__} carries no widening record (module.graphscale): widen it with "
            "graphscale.widen, or pass record= (a record or the path graphscale.save_record wrote) or base="
        )
    return _wrapper_aliases(model, inner, found)


def scalings_for(
    named: Iterable[tuple[str, torch.Tensor]], record: WideningRecord, what: str = "parameters"
) -> dict[str, ParamScaling]:
    """Map each name to its :class:`ParamScaling`, checking presence and shape.

    Raises one :class:`RecordError` naming *every* missing or mis-shaped tensor, so a user fixes them in
    one go rather than one per run.
    """
    out: dict[str, ParamScaling] = {}
    missing: list[str] = []
    wrong: list[str] = []
    for name, t in named:
        s = record.params.get(name)
        if s is None:
            s = record.params.get(_strip_wrapper_prefixes(name))
        if s is None:
            missing.append(name)
        elif tuple(s.wide_shape) != tuple(t.shape):
            wrong.append(f"{name} (record says {tuple(s.wide_shape)}, tensor is {tuple(t.shape)})")
        else:
            out[name] = s
    if missing or wrong:
        parts = []
        if missing:
            parts.append(f"{what} not in the widening record: {', '.join(missing)}")
        if wrong:
            parts.append(f"{what} whose shape disagrees with the record: {', '.join(wrong)}")
        raise RecordError("; ".join(parts))
    return out


def _dtensor_class() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(t: torch.Tensor) -> bool:
    """Whether ``t`` is a ``DTensor`` (FSDP2's ``fully_shard`` parameters, their gradients and state).

    Example:
        >>> is_sharded(torch.zeros(2))
        False
    """
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole value of ``t``: a ``DTensor``'s shards gathered from every process, ``t`` otherwise.

    Example:
        >>> x = torch.ones(2)
        >>> whole(x) is x
        True
    """
    return t.full_tensor() if is_sharded(t) else t


def like_parameter(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor shaped like ``like``) placed as ``like`` is: sharded the same way when
    ``like`` is a ``DTensor`` (each process keeps its own shard of its own copy: no communication, which
    is right because every process computed the same ``value``), else moved to ``like``'s device.

    Example:
        >>> like_parameter(torch.ones(2), torch.zeros(2, dtype=torch.float64)).device.type
        'cpu'
    """
    if not is_sharded(like):
        return value.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    value = value.to(like.device_mesh.device_type)
    try:
        return distribute_tensor(value, like.device_mesh, like.placements, src_data_rank=None)
    except TypeError:  # pragma: no cover - torch < 2.6: no src_data_rank; rank 0's equal copy is scattered
        return distribute_tensor(value, like.device_mesh, like.placements)


class SliceFoldError(RecordError):
    """A tensor whose blocks need different ``(c, M)`` (a fold on part of it, or parts that grow by
    different multipliers) where a piece cannot treat the blocks as tensors of their own."""


def tensor_blocks(name: str, p: torch.Tensor, s: ParamScaling, what: str) -> list[tuple[torch.Tensor,
                                                                                        ParamScaling]]:
    """``[(p, s)]``, or for a tensor whose blocks differ in ``(c, M)`` each block as a view of ``p`` with
    its own scaling (:meth:`ParamScaling.block_scaling`): the pieces that act per tensor (noise, init)
    then act per block. A block no axis tree describes (a fold on per-head rows) is refused, naming it.

    Example:
        >>> from graphscale.record import AxisReplication
        >>> parts = AxisReplication(("sum", (("atom", 2, 2), ("atom", 3, 1))))
        >>> s = ParamScaling("x", "x", (5, 4), (7, 4), (parts, None), 1.0, 2, 1)
        >>> [(tuple(v.shape), b.total_mult) for v, b in tensor_blocks("x", torch.zeros(7, 4), s, "noise")]
        [((4, 4), 2), ((3, 4), 1)]
    """
    if not s.is_blockwise():
        return [(p, s)]
    out = []
    for b in s.blocks():
        own = s.block_scaling(b)
        if own is None:
            box = ", ".join(f"{i.start}:{i.stop}" for i in b.index)
            raise SliceFoldError(
                f"{what} cannot treat {name}[{box}] as a tensor of its own: that block "
                f"(c={b.copy_scale:.4g}, M={b.total_mult:g}) cuts through a part of a concatenation (a fold "
                f"on per-head rows), so its copies have no axis description. Apply {what} before folding "
                "(graphscale.widen keeps the factor in the graph), or use heads='grow', which folds nothing")
        out.append((p[b.index], own))
    return out


def _strip_wrapper_prefixes(name: str) -> str:
    """``name`` without leading wrapper segments (``_orig_mod.module.fc.weight`` -> ``fc.weight``); used only
    when the full name is not in the record, and the shape check still applies."""
    parts = name.split(".")
    while len(parts) > 1 and parts[0] in WRAPPER_ATTRS:
        parts = parts[1:]
    return ".".join(parts)


class SavedOptimizerState:
    """A narrow optimizer's saved ``state_dict()`` seen as ``{parameter: state}``, like ``optimizer.state``.

    A saved state dict names parameters by position, not by tensor. Positions are matched to ``small``'s
    parameters by the names in the state dict's param groups when it has them (an optimizer built over
    ``small.named_parameters()`` saves ``param_names``), or else by the order of ``small.parameters()``
    when the optimizer had one param group over all of them (``cls(small.parameters(), ...)``). Any other
    layout is refused, since a wrong guess would pair moments with the wrong tensors. Every tensor entry
    shaped like a parameter must match its parameter's shape.

    Example:
        >>> small = nn.Linear(2, 2)
        >>> opt = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9)
        >>> small(torch.ones(1, 2)).sum().backward(); opt.step()
        >>> saved = SavedOptimizerState(small, opt.state_dict())
        >>> buf = opt.state[small.weight]["momentum_buffer"]
        >>> torch.equal(saved.state[small.weight]["momentum_buffer"], buf)
        True
    """

    def __init__(self, small: nn.Module, state_dict: Mapping[str, Any]) -> None:
        if not (isinstance(state_dict, Mapping) and "state" in state_dict and "param_groups" in state_dict):
            raise RecordError("the narrow optimizer state must be an optimizer or its state_dict() (a dict "
                              "with 'state' and 'param_groups')")
        groups = list(state_dict["param_groups"])
        by_name: dict[str, torch.Tensor] = {}
        for module in (small, unwrap_module(small)):
            by_name.update(module.named_parameters(remove_duplicate=False))
        index_to_param: dict[Any, torch.Tensor] = {}
        if groups and all("param_names" in g for g in groups):
            unknown = []
            for g in groups:
                for idx, name in zip(g["params"], g["param_names"]):
                    p = by_name.get(name)
                    if p is None:
                        p = by_name.get(_strip_wrapper_prefixes(name))
                    if p is None:
                        unknown.append(name)
                    else:
                        index_to_param[idx] = p
            if unknown:
                raise RecordError(f"the saved optimizer state names parameters the small model lacks: "
                                  f"{', '.join(unknown)}")
        else:
            params = list(small.parameters())
            if len(groups) != 1 or len(groups[0]["params"]) != len(params):
                raise RecordError(
                    "cannot tell which saved optimizer entry belongs to which parameter: the state dict has "
                    f"{len(groups)} param group(s) with {sum(len(g['params']) for g in groups)} parameters "
                    f"and no param_names, the small model {len(params)} parameters. Build the narrow "
                    "optimizer over small.named_parameters() (torch then saves param_names), or pass the "
                    "live optimizer instead of its state dict"
                )
            index_to_param = dict(zip(groups[0]["params"], params))
        self.state: dict[torch.Tensor, dict[str, Any]] = {}
        wrong = []
        for idx, entry in state_dict["state"].items():
            p = index_to_param.get(idx)
            if p is None:
                raise RecordError(f"the saved optimizer state has an entry {idx!r} that no param group lists")
            for key, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and value.numel() > 1 \
                        and tuple(value.shape) != tuple(p.shape):
                    wrong.append(f"entry {idx} {key} {tuple(value.shape)} vs parameter {tuple(p.shape)}")
            self.state[p] = dict(entry)
        if wrong:
            raise RecordError("the saved optimizer state does not fit the small model's parameters (was it "
                              f"saved for another model or parameter order?): {'; '.join(wrong)}")


def source_optimizer(small: nn.Module, small_opt: Any) -> Any:
    """``small_opt`` itself if it is an optimizer, else a :class:`SavedOptimizerState` of its state dict."""
    if isinstance(small_opt, torch.optim.Optimizer):
        return small_opt
    return SavedOptimizerState(small, small_opt)
