"""Vocab-parallel softmax-KL: every rank holds one slice of the vocabulary for all rows.

Per row, the statistics that make the full-row loss are sums and maxima over the vocabulary, so
each is reduced across ranks with one all-reduce (a = s/T, b = t/T on the local slice):

    m_a, m_b   = all_reduce(MAX) of the local maxima
    z_a, z_b   = all_reduce(SUM) of sum exp(a - m_a), sum exp(b - m_b)        -> lse_a, lse_b
    forward:   D = all_reduce(SUM) of sum p_t (b - a)  - lse_b + lse_a
    reverse:   D = all_reduce(SUM) of sum p_s (a - b)  - lse_a + lse_b
    jsd:       Ks, Kt = all_reduce(SUM) of the local terms; D = beta Kt + (1 - beta) Ks

The maxima and sums of exponentials travel in one all-reduce each (rows stacked), then one more
for the divergence terms: three all-reduces of O(rows) values per call, never a logits slice.
The local gradients are the formulas of :mod:`kdkernels.triton.softmax_kl` with the global
normalizers, computed in the forward pass; backward scales them by ``grad_output``. The local
work runs in PyTorch operations on the rank's slice (float32 accumulation).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kdkernels import functional as KF


def _safe(m: Tensor) -> Tensor:
    return torch.where(m == -math.inf, torch.zeros_like(m), m)


def _plogr(p: Tensor, diff: Tensor) -> Tensor:
    return torch.where(p > 0, p * diff, torch.zeros_like(p))


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, valid, temperature, kind, beta, group, grad_scale, want_s, want_t):
        acc = torch.float64 if torch.float64 in (s.dtype, t.dtype) else torch.float32
        a, b = s.to(acc) / temperature, t.to(acc) / temperature
        m = torch.stack([a.max(-1).values, b.max(-1).values])
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        ma, mb = _safe(m[0]), _safe(m[1])
        ea, eb = torch.exp(a - ma[:, None]), torch.exp(b - mb[:, None])
        z = torch.stack([ea.sum(-1), eb.sum(-1)])
        dist.all_reduce(z, group=group)
        lse_a, lse_b = ma + z[0].log(), mb + z[1].log()
        lps, lpt = a - lse_a[:, None], b - lse_b[:, None]
        ps, pt = lps.exp(), lpt.exp()
        if kind == 0:
            part = _plogr(pt, lpt - lps).sum(-1, keepdim=True)
        elif kind == 1:
            part = _plogr(ps, lps - lpt).sum(-1, keepdim=True)
        else:
            lm = torch.where(lps == lpt, lps, torch.logaddexp(lpt + math.log(beta), lps + math.log1p(-beta)))
            part = torch.stack([_plogr(ps, lps - lm).sum(-1), _plogr(pt, lpt - lm).sum(-1)], -1)
        dist.all_reduce(part, group=group)
        if kind == 2:
            Ks, Kt = part[:, 0], part[:, 1]
            D = beta * Kt + (1.0 - beta) * Ks
        else:
            D = part[:, 0]
        D = torch.where(valid, D, torch.zeros_like(D))
        gs = gt = None
        g = grad_scale.to(acc) / temperature * valid.to(acc)
        if want_s or want_t:
            if kind == 0:
                ds, dt = ps - pt, _plogr(pt, lpt - lps - D[:, None])
            elif kind == 1:
                ds, dt = _plogr(ps, lps - lpt - D[:, None]), pt - ps
            else:
                ds = (1.0 - beta) * _plogr(ps, lps - lm - Ks[:, None])
                dt = beta * _plogr(pt, lpt - lm - Kt[:, None])
            gs = (ds * g[:, None]).to(s.dtype) if want_s else None
            gt = (dt * g[:, None]).to(t.dtype) if want_t else None
        ctx.save_for_backward(gs, gt)
        return D

    @staticmethod
    def backward(ctx, grad_rows):
        gs, gt = ctx.saved_tensors
        out_s = None if gs is None else gs * grad_rows[:, None].to(gs.dtype)
        out_t = None if gt is None else gt * grad_rows[:, None].to(gt.dtype)
        return out_s, out_t, None, None, None, None, None, None, None, None


def vocab_parallel_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                      kind: str = "forward", beta: float = 0.5, labels: Optional[Tensor] = None,
                      ignore_index: int = -100, reduction: str = "mean", group=None) -> Tensor:
    """:func:`kdkernels.softmax_kl` for logits whose vocabulary is split across the ranks of
    ``group``: each rank passes its ``[..., V_rank]`` slices (any split, the same rows on every
    rank) and gets the full-row loss, the same on every rank, with gradients for its slices.

    ``labels`` (the leading shape, identical on every rank) only mask rows: ``ignore_index`` rows
    contribute 0 and get zero gradients. Reductions as in :func:`kdkernels.softmax_kl`.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_kl needs an initialized torch.distributed process group")
    # labels only mask rows here (their range is the global vocabulary, which no rank sees whole)
    temperature, beta, _ = KF._validate(student_logits, teacher_logits, None, temperature, kind, beta,
                                        ignore_index, reduction, "auto")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor or None")
        if labels.shape != student_logits.shape[:-1] or labels.device != student_logits.device:
            raise ValueError(f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])} and "
                             f"device, got {tuple(labels.shape)} on {labels.device}")
    kind_id = KF._kind_id(kind, beta)
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    N = s.shape[0]
    valid = torch.ones(N, dtype=torch.bool, device=s.device) if labels is None \
        else labels.reshape(-1) != ignore_index
    red = "mean" if reduction == "batchmean" else reduction
    count = valid.sum().clamp_min(1) if labels is not None else torch.tensor(max(N, 1), device=s.device)
    scale = (1.0 / count.double()) if red == "mean" else torch.ones((), dtype=torch.float64, device=s.device)
    grad_on = torch.is_grad_enabled()
    rows = _VocabParallelKL.apply(s, t, valid, temperature, kind_id, beta, group,
                                  torch.ones((), device=s.device), grad_on and student_logits.requires_grad,
                                  grad_on and teacher_logits.requires_grad)
    rows = rows.to(torch.float64 if rows.dtype == torch.float64 else torch.float32)
    if red == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total if red == "sum" else total * scale.to(total.dtype)
