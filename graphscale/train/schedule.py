"""Learning-rate schedules that keep μP's per-group learning-rate ratios.

:func:`~graphscale.train.mup_optimizer` gives each param group ``lr = f_g * lr_narrow``, with ``f_g`` the
group's recorded factor (``group["graphscale"]["lr"]``). Dynamic equivalence needs that ratio at every
step: ``lr_g(t) = f_g * lr_narrow(t)``. Plain torch schedulers break it in three common ways:

- ``OneCycleLR(max_lr=<float>)`` and ``CyclicLR(base_lr=<float>, max_lr=<float>)`` give every group the
  same absolute learning rates, erasing the factors;
- ``CosineAnnealingLR(eta_min > 0)`` and ``CosineAnnealingWarmRestarts(eta_min > 0)`` anneal every group
  towards the same absolute floor (torch takes one ``eta_min`` for all groups), and
  ``ReduceLROnPlateau``'s ``min_lr`` and ``eps`` are absolute too;
- ``wide_sched.load_state_dict(narrow_sched.state_dict())`` copies the narrow optimizer's ``base_lrs``
  (one per *narrow* group) into a scheduler of the wide optimizer's differently scaled groups.

:func:`mup_scheduler` avoids all of them by construction: it runs the user's scheduler class, with the
user's own arguments, on a shadow optimizer that holds each wide group's learning rate *in narrow units*
(``lr_g / f_g``). The schedule is therefore exactly the one the narrow model sees -- whatever its
arguments, including absolute ones (``max_lr``, ``eta_min``, ``min_lr``, ``eps``) and lambdas -- and after
every step each wide group gets ``f_g`` times its shadow group's learning rate. Momentum values that
schedulers cycle (``momentum``, ``betas``) are width-independent and copied unchanged. A scheduler that
changes any other hyperparameter of a group is refused, since graphscale does not know how it scales.

Its ``state_dict()`` is in narrow units, so carrying a narrow scheduler's state into the wide one is a
matter of pairing groups: :func:`transfer_scheduler_state`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from graphscale.errors import GraphscaleError
from graphscale.train.optim import FACTORS_KEY

#: Group entries that hold learning rates: scaled by the group's lr factor between narrow and wide units.
LR_KEYS: tuple[str, ...] = ("lr", "initial_lr", "max_lr", "min_lr")
#: Group entries schedulers may cycle that do not depend on width: copied unchanged.
WIDTH_FREE_KEYS: tuple[str, ...] = ("momentum", "betas", "base_momentum", "max_momentum")
#: Scheduler state entries that hold one value per param group (remapped by :func:`transfer_scheduler_state`).
PER_GROUP_STATE: frozenset[str] = frozenset(
    {"base_lrs", "_last_lr", "min_lrs", "max_lrs", "lr_lambdas", "base_momentums", "max_momentums"})
#: Scheduler state entries that are lists but not per param group.
NOT_PER_GROUP_STATE: frozenset[str] = frozenset({"_milestones", "milestones", "_schedule_phases"})
STATE_FORMAT = "graphscale-mup-scheduler"


class SchedulerError(GraphscaleError, ValueError):
    """A learning-rate schedule that graphscale cannot keep exact for a widened model's param groups."""


class _NarrowUnits(torch.optim.Optimizer):
    """The shadow optimizer a wrapped scheduler drives: one group per wide group, learning rates in narrow
    units, one empty tensor per group. It never updates anything."""

    def __init__(self, groups: list[dict[str, Any]], defaults: dict[str, Any]) -> None:
        super().__init__(groups, defaults)

    def step(self, closure: Callable[[], float] | None = None) -> None:  # type: ignore[override]
        return None


class MupScheduler:
    """A learning-rate scheduler of a μP optimizer that keeps every group's learning-rate factor.

    Built by :func:`mup_scheduler`; use it as the scheduler it wraps: ``step()`` (with the metric for
    ``ReduceLROnPlateau``), ``get_last_lr()`` (wide units), ``state_dict()``/``load_state_dict()`` (its own
    state, in narrow units). ``scheduler`` is the wrapped torch scheduler, driving ``shadow``, the
    narrow-unit optimizer; ``optimizer`` is the wide one. Learning rates set on the wide optimizer by other
    code between steps (a manual warm-up, a loaded optimizer state) are taken over, divided by the factor.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, factory: Callable[..., Any], kwargs: dict[str, Any]):
        self.optimizer = optimizer
        self.lr_factors = _lr_factors(optimizer)
        groups = []
        for group, f in zip(optimizer.param_groups, self.lr_factors):
            shadow = {k: v for k, v in group.items() if k != "params"}
            for key in LR_KEYS:
                if key in shadow:
                    shadow[key] = shadow[key] / f
            shadow["params"] = [torch.zeros(0)]
            groups.append(shadow)
        self.shadow = _NarrowUnits(groups, dict(optimizer.defaults))
        self._seen = self._snapshot()
        self.scheduler = factory(self.shadow, **kwargs)
        if getattr(self.scheduler, "optimizer", self.shadow) is not self.shadow:
            raise SchedulerError(
                f"{type(self.scheduler).__name__} was built on another optimizer than the one mup_scheduler "
                "passed it; when composing schedulers (SequentialLR, ChainedScheduler), build all of them "
                "inside one factory: mup_scheduler(opt, lambda o: SequentialLR(o, [LinearLR(o, ...), ...], "
                "milestones=[...]))")
        self._written: list[dict[str, Any]] = [{} for _ in self.lr_factors]
        self._push()

    # -- the wrapped scheduler's interface ---------------------------------------------------------------
    def step(self, *args: Any, **kwargs: Any) -> None:
        """Advance the schedule (arguments as the wrapped scheduler's ``step``) and update the wide groups."""
        self._pull()
        # The shadow optimizer is never stepped; tell torch's order check that the real one was.
        self.shadow._opt_called = True  # type: ignore[attr-defined]
        self.scheduler.step(*args, **kwargs)
        self._push()

    def get_last_lr(self) -> list[float]:
        """The learning rates the last step set, one per wide param group (wide units)."""
        return [lr * f for lr, f in zip(self.scheduler.get_last_lr(), self.lr_factors)]

    @property
    def last_epoch(self) -> int:
        return self.scheduler.last_epoch

    def state_dict(self) -> dict[str, Any]:
        """The wrapped scheduler's state (narrow units) with the groups' learning-rate factors."""
        return {"format": STATE_FORMAT, "lr_factors": list(self.lr_factors),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state saved by :meth:`state_dict` of a scheduler over the same param groups.

        A plain torch scheduler's state (the narrow model's, say) is refused: its per-group lists belong
        to other groups. Carry it with :func:`transfer_scheduler_state`.
        """
        if not isinstance(state_dict, Mapping) or state_dict.get("format") != STATE_FORMAT:
            raise SchedulerError(
                "this is not a mup_scheduler state (a plain torch scheduler's, e.g. the narrow model's?); "
                "its per-group learning rates would land on the wrong groups. Carry a narrow scheduler's "
                "state with graphscale.transfer_scheduler_state(narrow_sched, wide_sched)")
        if [float(f) for f in state_dict["lr_factors"]] != [float(f) for f in self.lr_factors]:
            raise SchedulerError(
                f"the saved scheduler state is for param groups with lr factors {state_dict['lr_factors']}, "
                f"this optimizer's are {self.lr_factors}: build the optimizer as it was built when saving")
        self._pull()  # an optimizer state loaded before this keeps its learning rates and momenta
        self.scheduler.load_state_dict(state_dict["scheduler"])
        self._push()

    def __repr__(self) -> str:
        return f"MupScheduler({type(self.scheduler).__name__}, lr_factors={self.lr_factors})"

    # -- keeping the shadow and the wide groups in step -------------------------------------------------
    def _snapshot(self) -> list[dict[str, Any]]:
        return [{k: copy.copy(v) for k, v in g.items() if k != "params"} for g in self.shadow.param_groups]

    def _push(self) -> None:
        """Write the shadow groups' new values into the wide groups; refuse changes of unknown entries."""
        now = self._snapshot()
        for i, (before, after) in enumerate(zip(self._seen, now)):
            changed = [k for k in after if k not in before or not _same(before[k], after[k])]
            unknown = [k for k in changed if k not in LR_KEYS and k not in WIDTH_FREE_KEYS]
            if unknown:
                raise SchedulerError(
                    f"{type(self.scheduler).__name__} changed {unknown} of param group {i}; graphscale knows "
                    f"how learning rates {LR_KEYS} and momenta {WIDTH_FREE_KEYS} scale with width, not these")
        for wide, shadow, f, written in zip(self.optimizer.param_groups, self.shadow.param_groups,
                                            self.lr_factors, self._written):
            for key in (*LR_KEYS, *WIDTH_FREE_KEYS):
                if key not in shadow or (key in written and _same(written[key], shadow[key])):
                    continue  # unchanged: leave the wide value exactly as it is
                value = shadow[key] * f if key in LR_KEYS else shadow[key]
                if isinstance(wide.get(key), torch.Tensor) and key in LR_KEYS:
                    wide[key].fill_(value)  # a tensor lr (capturable/fused optimizers) stays a tensor
                else:
                    wide[key] = value
                written[key] = copy.copy(shadow[key])
        self._seen = now

    def _pull(self) -> None:
        """Take over values that other code set on the wide groups since the last write (a manual warm-up,
        ``optimizer.load_state_dict``): the shadow gets them in narrow units.

        ``_seen`` mirrors the shadow groups since the last :meth:`_push` (only the wrapped scheduler and
        this class write them), so only the entries taken over here are updated in it: a full snapshot
        on every step would copy every group twice."""
        for wide, shadow, f, written, seen in zip(self.optimizer.param_groups, self.shadow.param_groups,
                                                  self.lr_factors, self._written, self._seen):
            for key in (*LR_KEYS, *WIDTH_FREE_KEYS):
                if key not in written or key not in wide:
                    continue
                expected = written[key] * f if key in LR_KEYS else written[key]
                if not _same(wide[key], expected):
                    shadow[key] = wide[key] / f if key in LR_KEYS else copy.copy(wide[key])
                    written[key] = copy.copy(shadow[key])
                    seen[key] = copy.copy(shadow[key])


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return bool(torch.equal(torch.as_tensor(a), torch.as_tensor(b)))
    return a == b


def _lr_factors(optimizer: torch.optim.Optimizer) -> list[float]:
    factors = []
    for i, group in enumerate(optimizer.param_groups):
        recorded = group.get(FACTORS_KEY)
        if not isinstance(recorded, Mapping) or "lr" not in recorded:
            raise SchedulerError(
                f"param group {i} carries no μP learning-rate factor (group[{FACTORS_KEY!r}]['lr']): build "
                "the optimizer with graphscale.mup_optimizer")
        factors.append(float(recorded["lr"]))
    return factors


def mup_scheduler(
    optimizer: torch.optim.Optimizer, scheduler_cls: Callable[..., Any], **kwargs: Any
) -> MupScheduler:
    """``scheduler_cls(optimizer, **kwargs)`` with every param group's μP learning-rate factor kept.

    ``kwargs`` are the arguments tuned for the narrow model, unchanged: ``max_lr``, ``eta_min``,
    ``base_lr``, ``min_lr``, ``eps``, lambdas... The schedule runs in narrow units (see the module doc)
    and each wide group gets its factor times the narrow schedule, so with zero noise the widened model
    trains exactly like the narrow one under ``scheduler_cls(narrow_opt, **kwargs)``. ``scheduler_cls``
    is any torch scheduler class, or a function of the optimizer that builds one (for SequentialLR and
    ChainedScheduler, whose parts must share the optimizer). ``optimizer`` must come from
    :func:`graphscale.train.mup_optimizer`, whose groups record their factors.

    Example:
        >>> lin = torch.nn.Linear(2, 2)
        >>> opt = torch.optim.SGD([{"params": [lin.weight], "lr": 0.5, "graphscale": {"lr": 0.5}},
        ...                        {"params": [lin.bias], "lr": 1.0, "graphscale": {"lr": 1.0}}])
        >>> sched = mup_scheduler(opt, torch.optim.lr_scheduler.OneCycleLR, max_lr=2.0, total_steps=10)
        >>> [g["max_lr"] for g in opt.param_groups]   # one max_lr per group, each times its factor
        [1.0, 2.0]
        >>> opt.step(); sched.step()
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise SchedulerError(f"mup_scheduler needs a torch optimizer, got {type(optimizer).__name__}")
    return MupScheduler(optimizer, scheduler_cls, kwargs)


def transfer_scheduler_state(
    narrow: Any,
    wide: MupScheduler,
    *,
    narrow_param_groups: Sequence[Mapping[str, Any]] | None = None,
    group_map: Sequence[int] | None = None,
) -> None:
    """Continue the narrow model's schedule in ``wide`` (a :func:`mup_scheduler`), keeping every factor.

    ``narrow`` is the narrow model's torch scheduler, or its ``state_dict()`` together with
    ``narrow_param_groups`` (the narrow optimizer's ``param_groups``, live or from its saved
    ``state_dict()``), since schedulers read the current learning rate from the optimizer. Each wide
    group continues the narrow group it was split from: ``group_map[i]`` names it for wide group ``i``;
    it may be omitted when the narrow optimizer has one group. ``wide`` must wrap the same scheduler class
    built with the same arguments. ``narrow`` is not modified.

    Example:
        >>> sched = mup_scheduler(wide_opt, CosineAnnealingLR, T_max=1000, eta_min=1e-5)  # doctest: +SKIP
        >>> transfer_scheduler_state(narrow_sched, sched)                            # doctest: +SKIP
    """
    if not isinstance(wide, MupScheduler):
        raise SchedulerError("the wide scheduler must be built with graphscale.mup_scheduler; a plain torch "
                             "scheduler cannot hold one learning-rate factor per group")
    if isinstance(narrow, Mapping):
        state = dict(narrow)
        if narrow_param_groups is None:
            raise SchedulerError("a saved narrow scheduler state needs narrow_param_groups= (the narrow "
                                 "optimizer's param_groups or state_dict()['param_groups'])")
        groups = list(narrow_param_groups)
    else:
        if type(narrow) is not type(wide.scheduler):
            raise SchedulerError(f"the narrow scheduler is a {type(narrow).__name__}, the wide one wraps a "
                                 f"{type(wide.scheduler).__name__}: build the wide one with the same class")
        state = narrow.state_dict()
        live = narrow.optimizer.param_groups
        groups = list(narrow_param_groups if narrow_param_groups is not None else live)
    n_wide = len(wide.lr_factors)
    if group_map is None:
        if len(groups) != 1:
            raise SchedulerError(
                f"the narrow optimizer has {len(groups)} param groups: pass group_map= (for each of the "
                f"{n_wide} wide groups, the index of the narrow group its parameters came from)")
        group_map = [0] * n_wide
    group_map = [int(j) for j in group_map]
    if len(group_map) != n_wide or any(not 0 <= j < len(groups) for j in group_map):
        raise SchedulerError(f"group_map must give, for each of the {n_wide} wide groups, a narrow group "
                             f"index in 0..{len(groups) - 1}; got {group_map}")
    remapped = _remap_state(state, len(groups), group_map, type(wide.scheduler).__name__)
    for shadow, j in zip(wide.shadow.param_groups, group_map):
        for key in (*LR_KEYS, *WIDTH_FREE_KEYS):
            if key in groups[j]:
                shadow[key] = copy.deepcopy(groups[j][key])  # narrow units: the shadow's own units
    wide._seen = wide._snapshot()
    wide.scheduler.load_state_dict(remapped)
    wide._push()


def _remap_state(state: Mapping[str, Any], n_narrow: int, group_map: list[int], where: str) -> dict[str, Any]:
    """A copy of a scheduler state with every per-group list re-indexed for the wide groups."""
    identity = group_map == list(range(n_narrow))
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "_schedulers" and isinstance(value, list):  # SequentialLR, ChainedScheduler: their parts
            out[key] = [_remap_state(s, n_narrow, group_map, where) if isinstance(s, Mapping) else s
                        for s in value]
        elif key in PER_GROUP_STATE and value is not None:
            if not isinstance(value, list) or len(value) != n_narrow:
                raise SchedulerError(f"{where} state entry {key!r} should hold one value per narrow param "
                                     f"group ({n_narrow}), holds {value!r}")
            out[key] = [copy.deepcopy(value[j]) for j in group_map]
        elif isinstance(value, list) and len(value) == n_narrow and key not in NOT_PER_GROUP_STATE \
                and not identity:
            raise SchedulerError(
                f"{where} state entry {key!r} is a list with one item per narrow param group, and graphscale "
                "does not know whether it is per group; it cannot carry this scheduler's state")
        else:
            out[key] = copy.deepcopy(value)
    return out
