"""Exceptions raised by graphscale.

Every error graphscale raises on purpose derives from :class:`GraphscaleError`, so callers (and the CLI,
which prints them as one line and exits with status 2) can tell a refused model from a bug.

Example:
    >>> try:
    ...     raise MultiplierError("multiplier must be a positive integer, got 1.5")
    ... except GraphscaleError as e:
    ...     print(e)
    multiplier must be a positive integer, got 1.5
"""

from __future__ import annotations


class GraphscaleError(Exception):
    """Base class of all errors graphscale raises deliberately."""


class UnsupportedOpError(GraphscaleError):
    """The graph contains an op that no rule covers, or one that cannot be widened exactly."""


class TraceError(GraphscaleError):
    """The model could not be captured as a graph by the chosen frontend (fx or torch.export)."""


class WidthConflictError(GraphscaleError):
    """Width inference found contradictory relations (e.g. a width axis tied to a fixed one)."""


class MultiplierError(GraphscaleError):
    """A multiplier is invalid (not a positive integer) or names an unknown width class."""


class ModelSpecError(GraphscaleError):
    """A model spec (built-in name, ``file.py:callable`` or ``module:callable``) could not be loaded."""


class RuleError(GraphscaleError):
    """A rule file is wrong: an unknown key, a wrong type, a malformed pattern, a target that resolves to
    nothing. The message names the file, the rule and the key."""


class UnsavedBufferWarning(UserWarning):
    """``widen_into`` filled a buffer registered with ``persistent=False`` with a value other than the one
    the larger model's class computes: the filled model is exact, but no checkpoint carries that buffer,
    so the model saved and rebuilt from its config is not."""


class SliceFoldWarning(UserWarning):
    """A widened model is exact, but a factor was folded onto part of a tensor (a fused q|k|v projection's
    query rows): ``mup_optimizer`` trains it block by block, but an optimizer with one lr per tensor would
    not train it like the narrow model."""
