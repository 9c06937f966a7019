"""Calls whose weights are DTensors (tensor parallelism; FSDP2 parameters outside their module's
forward): the fused-linear losses hand them to a handler that :mod:`kdkernels.distributed`
registers here when it is imported (``import kdkernels`` imports it), so that the family modules
stay below the distributed layer.

No DTensor exists unless ``torch.distributed.tensor`` was imported (it imports sympy): the test
looks its type up in ``sys.modules`` and never imports it.
"""

from __future__ import annotations

import sys
from typing import Callable, Dict

__all__ = ["any_dtensor", "register", "handler"]

_HANDLERS: Dict[str, Callable] = {}


def any_dtensor(*xs) -> bool:
    """Whether any of ``xs`` is a DTensor."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    return dtensor is not None and any(isinstance(x, dtensor) for x in xs)


def register(op: str, fn: Callable) -> None:
    _HANDLERS[op] = fn


def handler(op: str) -> Callable:
    if op not in _HANDLERS:
        raise RuntimeError(f"{op} got DTensor arguments: import kdkernels.distributed, which handles them")
    return _HANDLERS[op]
