"""Input checks: one function per kind of check, one message style.

Each raises a ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong value or shape) whose
message starts with the argument's name and says what was expected and what came. Nothing here
syncs the host with a CUDA device except :func:`index_range` (an explicit range check of integer
tensors, skipped while torch.compile traces: the kernels give out-of-range rows a NaN loss).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional, Sequence

import torch
from torch import Tensor

from kdkernels._core.backends import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def float_tensor(name: str, x, dims: Optional[int] = None, what: str = "",
                 last: str = "a feature dimension [..., D]") -> None:
    """``x`` is a float32 / bfloat16 / float16 / float64 tensor (of ``what``: ``"logits"``), ``dims``-D
    when given, else at least 1-D (``last`` names its last dimension in the message)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64{' ' + what if what else ''}, "
                        f"got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    if dims is None and x.dim() == 0:
        raise ValueError(f"{name} must have {last}, got a 0-d tensor")


def logits(name: str, x) -> None:
    """``[..., V]`` float logits."""
    float_tensor(name, x, what="logits", last="a vocabulary dimension [..., V]")


def int_tensor(name: str, x, shape: Optional[Sequence[int]] = None) -> None:
    """An integer tensor (not bool), of ``shape`` when given."""
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {x.dtype}")
    if shape is not None and tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must be {list(shape)}, got {tuple(x.shape)}")


def one_element(name: str, x, what: str = "") -> None:
    """A one-element tensor (a learnable scalar such as a log-scale or a bias)."""
    if not isinstance(x, Tensor) or x.numel() != 1:
        raise TypeError(f"{name} must be a one-element tensor{' ' + what if what else ''}")


def scalar(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    """A real number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``), returned as a float."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")
    return v


def positive(name: str, value) -> float:
    """A finite real number > 0 (a temperature, a scale)."""
    return scalar(name, value, 0.0, math.inf, lo_open=True)


def integer(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return value


def choice(name: str, value, options) -> None:
    """``value`` is one of ``options`` (a tuple, or the keys of a dict)."""
    options = tuple(options)
    if value not in options:
        raise ValueError(f"{name} must be one of {options}, got {value!r}")


def reduction(value, options=("none", "sum", "mean", "batchmean")) -> None:
    choice("reduction", value, options)


def backend(value) -> None:
    choice("backend", value, BACKENDS)


def same_shape(names: str, a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def one_device(**tensors) -> None:
    """All the given tensors (None skipped) on one device."""
    devs = {name: x.device for name, x in tensors.items() if isinstance(x, Tensor)}
    if len(set(devs.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devs.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")


def index_range(name: str, x: Tensor, hi: int, allowed: Optional[int] = None) -> None:
    """The entries of the integer tensor ``x`` are in ``[0, hi)`` (or equal ``allowed``, an
    ignore_index). Eager mode only: skipped while torch.compile traces (the kernels give a row with
    an out-of-range index a NaN loss instead)."""
    if not x.numel() or torch.compiler.is_compiling():
        return
    bad = (x < 0) | (x >= hi)
    if allowed is not None:
        bad &= x != allowed
    if bool(bad.any()):
        first = x[bad].flatten()[0].item()
        extra = f" or equal ignore_index={allowed}" if allowed is not None else ""
        raise ValueError(f"{name} must be in [0, {hi}){extra}, got {first}")
