"""Contrastive and relational losses over the global batch of a data-parallel job.

Each rank holds its local rows; the loss must be over the global batch (every other rank's rows
are negatives). The embeddings, ``[n_rank, D]`` each, are all-gathered with gradients
(``torch.distributed.nn.functional.all_gather``: its backward sums each piece's gradient over the
ranks), and each rank computes the loss rows of its own anchors against the gathered batch with
the tiled single-process kernels: no rank ever holds an ``N x N`` matrix, only ``N x D``
embeddings.

Each rank returns the mean (or sum, or rows) over its own anchors. With DistributedDataParallel,
which averages gradients over the ranks, the parameters get the gradient of the global-batch
loss; the value to log is the mean of the ranks' values (with equal local batches). Every rank
must call with the same embedding dimension; local batch sizes may differ.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from kdkernels.contrastive import info_nce as _info_nce
from kdkernels.relational import similarity_kd_masked


def _require_group(op: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"kdkernels.distributed.{op} needs an initialized torch.distributed process group")


def _gather(x: Tensor, group, sizes) -> Tensor:
    """All ranks' rows, concatenated in rank order; gradients flow back to their owners."""
    from torch.distributed.nn.functional import all_gather

    if len(set(sizes)) == 1:
        return torch.cat(all_gather(x.contiguous(), group=group), 0)
    # unequal local batches: pad to the largest, gather, cut
    m = max(sizes)
    pad = torch.cat([x, x.new_zeros(m - x.shape[0], *x.shape[1:])], 0) if x.shape[0] < m else x
    parts = all_gather(pad.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], 0)


def _sizes(n: int, device, group) -> Tuple[list, int]:
    """Every rank's local rows and this rank's offset in the gathered batch."""
    world = dist.get_world_size(group)
    t = torch.tensor([n], dtype=torch.int64, device=device)
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t, group=group)
    sizes = [int(x) for x in out]
    rank = dist.get_rank(group)
    return sizes, sum(sizes[:rank])


def _reduce(rows: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def info_nce(a: Tensor, b: Tensor, *, temperature: Optional[float] = None, logit_scale: Optional[Tensor] = None,
             logit_bias: Optional[Tensor] = None, symmetric: bool = True, variant: str = "softmax",
             reduction: str = "mean", backend: str = "auto", group=None) -> Tensor:
    """:func:`kdkernels.info_nce` over the global batch: row i of this rank's ``a`` matches row i
    of its ``b``; every other row of ``b`` on every rank is a negative. Returns the reduction over
    this rank's rows (``symmetric``: each pair's row and column cross-entropies averaged)."""
    _require_group("info_nce")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"a and b must hold the same local pairs, got {tuple(a.shape)} and {tuple(b.shape)}")
    sizes, offset = _sizes(a.shape[0], a.device, group)
    a_all, b_all = _gather(a, group, sizes), _gather(b, group, sizes)
    labels = torch.arange(a.shape[0], device=a.device) + offset
    kw = dict(temperature=temperature, logit_scale=logit_scale, logit_bias=logit_bias, variant=variant,
              reduction="none", backend=backend)
    rows = _info_nce(a, b_all, labels=labels, symmetric=False, **kw)
    if variant == "softmax" and symmetric:
        rows = 0.5 * (rows + _info_nce(b, a_all, labels=labels, symmetric=False, **kw))
    return _reduce(rows, reduction)


def similarity_kd(student_a: Tensor, teacher_a: Tensor, student_b: Optional[Tensor] = None,
                  teacher_b: Optional[Tensor] = None, *, temperature: float = 1.0,
                  student_temperature: Optional[float] = None, divergence: str = "forward", beta: float = 0.5,
                  normalize: bool = True, symmetric: bool = True, reduction: str = "mean", backend: str = "auto",
                  group=None) -> Tensor:
    """:func:`kdkernels.similarity_kd` over the global batch: this rank's rows of the similarity
    matrices span every rank's embeddings (self-similarity leaves out each row's own entry; with
    ``b`` given and ``symmetric``, this rank's columns are its own rows of ``b`` against the
    gathered ``a``). Returns the reduction over this rank's rows."""
    _require_group("similarity_kd")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if normalize:  # before the gather, so that each rank normalizes its own rows once
        norm = lambda x: None if x is None else torch.nn.functional.normalize(x, dim=-1)  # noqa: E731
        student_a, student_b = norm(student_a), norm(student_b)
        with torch.no_grad():
            teacher_a, teacher_b = norm(teacher_a), norm(teacher_b)
    sizes, offset = _sizes(student_a.shape[0], student_a.device, group)
    kw = dict(temperature=temperature, student_temperature=student_temperature, divergence=divergence, beta=beta,
              normalize=False, symmetric=False, reduction="none", backend=backend)
    with torch.no_grad():
        ta_all = _gather(teacher_a.detach(), group, sizes)
        tb_all = None if teacher_b is None else _gather(teacher_b.detach(), group, sizes)
    sa_all = _gather(student_a, group, sizes)
    if student_b is None:
        rows = similarity_kd_masked(student_a, teacher_a, sa_all, ta_all, mask_offset=offset, **kw)
    else:
        sb_all = _gather(student_b, group, sizes)
        rows = similarity_kd_masked(student_a, teacher_a, sb_all, tb_all, **kw)
        if symmetric:
            rows = 0.5 * (rows + similarity_kd_masked(student_b, teacher_b, sa_all, ta_all, **kw))
    return _reduce(rows, reduction)
