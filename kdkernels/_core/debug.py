"""Debugging aids for kernel development and the test suite."""

from __future__ import annotations

import contextlib

import torch

from kdkernels._core import ext as _ext

_poison = False


def new_output(shape, *, dtype, device) -> torch.Tensor:
    """``torch.empty``, or a NaN-filled tensor inside :func:`poison_outputs`."""
    if _poison:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


@contextlib.contextmanager
def poison_outputs():
    """Make every kernel allocate its outputs filled with NaN instead of uninitialized memory,
    so that an output element a kernel forgets to write shows up as NaN."""
    global _poison
    prev = _poison
    _poison = True
    if _ext.available():
        _ext._C.set_poison_outputs(True)
    try:
        yield
    finally:
        _poison = prev
        if _ext.available():
            _ext._C.set_poison_outputs(prev)
