"""Train-time pieces for widened models: μP optimizer, optimizer-state transfer, clipping, noise, init.

All of them read only the :class:`~graphscale.record.WideningRecord` that widening attaches as
``module.graphscale`` (docs/math.md §2), so they work on any widened model, whatever its architecture.
"""

from graphscale.train._common import SliceFoldError
from graphscale.train.clip import clip_grad_norm_
from graphscale.train.coord import CoordCheckResult, RMSRecorder, coord_check
from graphscale.train.init import mup_init_
from graphscale.train.noise import (
    GaussianNoise,
    NoiseScheme,
    NoNoise,
    SpectralNoise,
    SymmetricNoise,
    gaussian,
    gaussian_relative,
    noise_from_spec,
    none,
    spectral,
    symmetric,
    symmetric_relative,
)
from graphscale.train.optim import mup_optimizer, mup_param_groups, optimizer_family, scaling_factors
from graphscale.train.schedule import MupScheduler, SchedulerError, mup_scheduler, transfer_scheduler_state
from graphscale.train.state import transfer_optimizer_state

__all__ = [
    "CoordCheckResult",
    "GaussianNoise",
    "MupScheduler",
    "NoNoise",
    "NoiseScheme",
    "RMSRecorder",
    "SchedulerError",
    "SliceFoldError",
    "SpectralNoise",
    "SymmetricNoise",
    "clip_grad_norm_",
    "coord_check",
    "gaussian",
    "gaussian_relative",
    "mup_init_",
    "noise_from_spec",
    "none",
    "spectral",
    "symmetric",
    "symmetric_relative",
    "mup_optimizer",
    "mup_param_groups",
    "mup_scheduler",
    "optimizer_family",
    "scaling_factors",
    "transfer_optimizer_state",
    "transfer_scheduler_state",
]
