"""Rows of a ``[..., D]`` tensor read through their strides, so that a view such as the causal
shift ``logits[:, :-1]`` reaches a kernel without a copy.

Every kernel takes its per-row inputs as ``[B, L, D]`` tensors whose last dimension is contiguous
and whose two leading dimensions have arbitrary strides: row ``r`` (of ``N = B * L``) starts
``(r // L) * stride(0) + (r % L) * stride(1)`` elements into the tensor. :func:`rows3` turns any
``[..., D]`` tensor into that form with :meth:`torch.Tensor.view` (free, and free in backward) by
merging leading dimensions that are laid out one after the other; only a tensor whose leading
dimensions do not merge into two (a view sliced in two of them, say), or whose last dimension is
not contiguous, is copied.
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple

from torch import Tensor

__all__ = ["rows3", "row_count", "take_rows"]


def _groups(x: Tensor) -> List[Tuple[int, int]]:
    """(size, stride) of the leading dimensions of ``x`` with size-1 dimensions dropped and every
    run of dimensions that is one dimension in memory merged."""
    out: List[Tuple[int, int]] = []
    for size, stride in zip(x.shape[:-1], x.stride()[:-1]):
        if size == 1:
            continue
        if out and out[-1][1] == stride * size:
            out[-1] = (out[-1][0] * size, stride)
        else:
            out.append((size, stride))
    return out


def rows3(x: Tensor) -> Tensor:
    """``x`` (``[..., D]``) as ``[B, L, D]`` rows, a view of ``x`` whenever its layout allows (see
    the module docstring), else a contiguous copy. ``B * L`` is the number of rows."""
    D = x.shape[-1]
    if x.dim() == 0:
        raise ValueError("rows3 needs a tensor with a last dimension")
    if D > 1 and x.stride(-1) != 1:
        x = x.contiguous()
    n = math.prod(x.shape[:-1])
    if D == 0 or n == 0:
        return x.reshape(1, n, D)
    g = _groups(x)
    if len(g) <= 2:
        B, L = ([1, 1] + [s for s, _ in g])[-2:]
        return x.view(B, L, D)
    return x.reshape(1, n, D)


def row_count(x: Optional[Tensor]) -> int:
    """The number of rows of ``[N, D]`` or ``[B, L, D]`` rows (0 for None)."""
    return 0 if x is None else x.shape[0] if x.dim() == 2 else x.shape[0] * x.shape[1]


def take_rows(x: Optional[Tensor], rows: Tensor) -> Optional[Tensor]:
    """The ``[len(rows), D]`` rows ``rows`` (indices into the N rows) of ``[N, D]`` or ``[B, L, D]``
    rows, gathered straight from the strided tensor (no copy of the rows that are not taken)."""
    if x is None:
        return None
    if x.dim() == 2:
        return x.index_select(0, rows)
    L = max(1, x.shape[1])
    return x[rows // L, rows % L]
