"""Run a module whose tensors do not all fit in memory at once: each is made only while an op reads it.

:class:`OnUse` replaces chosen parameters of a module by placeholders of one element (their shape, dtype
and device, one NaN seen at every index). Inside ``with on_use:`` a torch function mode watches every
torch op: when one is called on such a parameter, the parameter is made (by the function given for it)
just before the op runs, and the parameters that an earlier op made are dropped. A forward pass then holds
at most the made parameters of one op (a linear layer's weight and bias) besides the rest of the module,
whatever its size: the streamed upscale (:mod:`graphscale.hf_stream`) runs its one-layer wide proxy this
way, so that its memory is bounded by a few wide tensors, not by a wide layer.

A parameter is seen by any torch call that takes it (``F.linear(x, self.weight)``, ``self.weight * x``,
``self.weight.t()``, ``self.weight.data``); a view of a made parameter keeps its memory until the view is
freed. What asks only for metadata (shape, dtype) gets it without a make. Outside ``with`` the
placeholders stay: a read gives NaN, which any output check refuses, and a write is refused by torch (its
indices share one element), so a use that escapes the mode is never silently wrong.
:meth:`OnUse.value` makes one parameter's value on its own.

Example:
    >>> lin = torch.nn.Linear(3, 2)
    >>> w, b = lin.weight.detach().clone(), lin.bias.detach().clone()
    >>> on_use = OnUse()
    >>> on_use.add(lin.weight, lambda: w.clone())
    >>> on_use.add(lin.bias, lambda: b.clone())
    >>> lin.weight.shape, lin.weight.untyped_storage().nbytes()
    (torch.Size([2, 3]), 4)
    >>> x = torch.randn(4, 3)
    >>> with on_use, torch.no_grad():
    ...     y = lin(x)
    >>> torch.equal(y, torch.nn.functional.linear(x, w, b)), on_use.made, on_use.peak_bytes
    (True, 2, 32)
    >>> lin.weight.isnan().all().item()  # dropped again
    True
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch.overrides import TorchFunctionMode

__all__ = ["OnUse"]

# what an op can ask of a placeholder without its values: the same answer as the made parameter's
_METADATA = {torch.Tensor.shape.__get__, torch.Tensor.dtype.__get__, torch.Tensor.ndim.__get__,
             torch.Tensor.requires_grad.__get__, torch.Tensor.size, torch.Tensor.dim, torch.Tensor.numel,
             torch.Tensor.is_floating_point, torch.Tensor.is_complex, torch.Tensor.element_size}


class OnUse(TorchFunctionMode):
    """Parameters made when an op reads them and dropped when the next op reads others (module doc).

    ``made`` counts the parameters made so far; ``peak_bytes`` is the most bytes of made parameters held
    at once (inside ``with``), ``largest_bytes`` the largest single parameter's: a forward pass holds
    ``peak_bytes`` besides the module's other tensors. ``release`` is called after parameters are dropped
    (e.g. to hand freed memory back to the system).
    """

    def __init__(self, release: Callable[[], None] | None = None) -> None:
        super().__init__()
        self._make: dict[int, tuple[torch.nn.Parameter, Callable[[], torch.Tensor]]] = {}
        self._held: dict[int, int] = {}  # id of a made parameter -> its bytes
        self._placeholder: dict[int, torch.Tensor] = {}
        self._release = release
        self.made = 0
        self.peak_bytes = 0
        self.largest_bytes = 0

    def add(self, param: torch.nn.Parameter, make: Callable[[], torch.Tensor]) -> None:
        """From now on ``param`` holds no memory: ``make()`` (a tensor of its shape and dtype) gives its
        value when an op reads it inside ``with``. Its current memory is freed once nothing else holds it.
        """
        if not isinstance(param, torch.nn.Parameter) or not param.is_floating_point():
            raise TypeError(f"OnUse makes floating-point parameters, got {type(param).__name__} of "
                            f"{param.dtype}")
        # one NaN seen at every index: the shape, dtype and device stay; a read outside an op gives NaN
        # (an output check fails on it), a write is refused (its indices share one element)
        placeholder = torch.full((), float("nan"), dtype=param.dtype, device=param.device).expand(param.shape)
        self._make[id(param)] = (param, make)
        self._placeholder[id(param)] = placeholder
        self.largest_bytes = max(self.largest_bytes, param.numel() * param.element_size())
        param.data = placeholder

    def __contains__(self, tensor: object) -> bool:
        return id(tensor) in self._make

    def value(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s value, made now as a new tensor (not held: freed with the returned tensor)."""
        p, make = self._make[id(param)]
        with torch.no_grad():
            out = make()
        if tuple(out.shape) != tuple(p.shape) or out.dtype != p.dtype:
            raise ValueError(f"OnUse: a parameter of shape {tuple(p.shape)} and dtype {p.dtype} was made "
                             f"with shape {tuple(out.shape)} and dtype {out.dtype}")
        self.made += 1
        return out

    def drop(self) -> None:
        """Drop every made parameter (back to its placeholder), then call ``release``."""
        self._drop(list(self._held))

    def _drop(self, ids: list[int]) -> None:
        for i in ids:
            self._make[i][0].data = self._placeholder[i]
            del self._held[i]
        if ids and self._release is not None:
            self._release()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func not in _METADATA:
            wanted = [i for a in pytree.tree_leaves((args, kwargs)) if (i := id(a)) in self._make]
            if wanted and not all(i in self._held for i in wanted):
                self._drop([i for i in self._held if i not in wanted])
                for i in wanted:
                    if i not in self._held:
                        p = self._make[i][0]
                        value = self.value(p)
                        p.data = value
                        self._held[i] = value.numel() * value.element_size()
                self.peak_bytes = max(self.peak_bytes, sum(self._held.values()))
        return func(*args, **kwargs)

    def __exit__(self, *exc: Any) -> None:
        try:
            self.drop()
        finally:
            super().__exit__(*exc)
