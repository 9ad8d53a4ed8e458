"""graphscale: widen (μpscale) trained PyTorch models exactly, with μP scaling rules derived per parameter.

Pipeline, one module per stage: :mod:`~graphscale.capture` (model -> fx graph, one module per frontend)
-> :mod:`~graphscale.infer` (rules -> width classes and graph edits) -> :mod:`~graphscale.derive` (sympy
scaling laws) -> :mod:`~graphscale.widen` (wide GraphModule + weights; applies the :mod:`~graphscale.edits`)
-> :mod:`~graphscale.train` (μP optimizer, state transfer, noise, clipping) -> :mod:`~graphscale.verify`
(equivalence checks) -> :mod:`~graphscale.cli`.

Example:
    >>> import graphscale, torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    >>> wide = graphscale.widen(model, (torch.randn(3, 4),), multiplier=2)
    >>> wide.get_submodule("0").out_features
    16
"""

from graphscale import hf as hf
from graphscale.cli.widened import load_widened
from graphscale.errors import (
    GraphscaleError,
    ModelSpecError,
    MultiplierError,
    TraceError,
    UnsupportedOpError,
    WidthConflictError,
)
from graphscale.fill import widen_into
from graphscale.plan import Plan, analyze
from graphscale.record import (
    AxisReplication,
    ParamScaling,
    RecordFileError,
    WideningRecord,
    load_record,
    record_metadata,
    save_record,
)
from graphscale.train import (
    SchedulerError,
    clip_grad_norm_,
    coord_check,
    mup_init_,
    mup_optimizer,
    mup_scheduler,
    transfer_optimizer_state,
    transfer_scheduler_state,
)
from graphscale.train import noise as noise
from graphscale.verify import VerifyReport, verify
from graphscale.widen import relative_record, widen

__all__ = [
    "AxisReplication", "GraphscaleError", "ModelSpecError", "MultiplierError", "ParamScaling", "Plan",
    "RecordFileError", "SchedulerError", "TraceError", "UnsupportedOpError", "VerifyReport", "WideningRecord",
    "WidthConflictError", "analyze", "hf", "clip_grad_norm_", "coord_check", "load_record", "load_widened",
    "mup_init_", "mup_optimizer", "mup_scheduler", "noise", "record_metadata", "relative_record",
    "save_record", "transfer_optimizer_state", "transfer_scheduler_state", "verify", "widen", "widen_into",
]
