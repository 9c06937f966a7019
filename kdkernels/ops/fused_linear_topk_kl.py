"""Fused-linear top-k KL: :func:`kdkernels.topk_kl` on the student logits ``h Wᵀ + b`` without
forming them, tiled over the vocabulary as :mod:`kdkernels.ops.fused_linear_kl` is.

Per kept row (``a = z_s / T``; teacher ``b_k``, ``pt_k``, ``pt_tail`` from its top-k values as in
csrc/cpu/topk_kl.cpp):

    pass 1  per vocabulary tile: z_s tile [R, Vt] (fp32 matmul accumulation), online lse(a), and
            the a_k of the teacher's columns that fall in the tile; for the uniform tail
            sum_j a_j = (h . sum_j W_j + sum_j b_j) / T.
    loss    D = sum_k pt_k (b_k - lse_b - a_k + lse_a)
                + pt_tail ((V - k)(b_tail - lse_b + lse_a) - (sum_j a_j - sum_k a_k))
    pass 2  per tile: dZ = c (softmax(a) - pt_tail), c = g / T, overwritten with c (softmax(a) - pt_k)
            at the teacher's columns in the tile, then into dh, dW, db as in the fused-linear loss.

Memory beyond the gradients: O(rows · k) statistics and tiles of at most TILE_ELEMENTS values;
nothing grows with V. The matmuls are ATen's (any device), so this one implementation serves
every backend.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kdkernels._backend import without_autocast

from kdkernels.ops import fused_linear_kl as FL
from kdkernels.ops.rows import row_count, take_rows


def _teacher(values: Tensor, V: int, acc, *, uniform_tail: bool, temperature: float):
    """(b [n, k], lse_b [n], b_tail [n], pt_tail [n]) of the teacher at T; b_tail is -inf without a tail."""
    raw = values.to(acc)
    b = raw / temperature
    n, k = raw.shape
    tail_n = V - k
    b_tail = torch.full((n,), -math.inf, dtype=acc, device=raw.device)
    if uniform_tail and tail_n > 0:
        mass = 1.0 - raw.exp().sum(1)
        b_tail = torch.where(mass > 0, (torch.log(mass.clamp_min(0)) - math.log(tail_n)) / temperature, b_tail)
    with_tail = torch.cat([b, (b_tail + math.log(tail_n) if tail_n > 0 else b_tail)[:, None]], 1)
    lse_b = torch.logsumexp(with_tail, 1)
    pt_tail = torch.where(b_tail == -math.inf, torch.zeros_like(b_tail), torch.exp(b_tail - lse_b))
    return b, lse_b, b_tail, pt_tail


def _topk_in_tile(idx: Tensor, v0: int, v1: int):
    """(rows, k positions, tile columns) of the top-k indices of a row block that lie in [v0, v1)."""
    r, j = ((idx >= v0) & (idx < v1)).nonzero(as_tuple=True)
    return r, j, idx[r, j] - v0


@without_autocast
def tiled_forward(hs: Tensor, Ws: Tensor, bs: Optional[Tensor], values: Tensor, indices: Tensor,
                  labels: Optional[Tensor], grad_scale: Tensor, *, uniform_tail: bool, temperature: float,
                  ignore_index: int, need: tuple):
    """[loss rows, d hs, d Ws, d bs] (None where not needed; gradients pre-multiplied by
    ``grad_scale``, a scalar or one value per row). ``need`` = which of (hs, Ws, bs) get one.
    ``values`` are log-probabilities or logits: both enter as ``b_k = values / T``; only the
    uniform tail (log-probabilities) reads them as probabilities."""
    acc = FL._acc_dtype(hs, Ws)
    N, V = row_count(hs), Ws.shape[0]  # hs: [N, H] or [B, L, H] rows (kdkernels.ops.rows)
    k = values.shape[1]
    dev = hs.device
    loss = torch.zeros(N, dtype=acc, device=dev)
    sources = (hs, Ws, bs)
    shapes = ((N, hs.shape[-1]), Ws.shape, None if bs is None else bs.shape)
    acc_grads = [torch.zeros(shapes[i], dtype=acc, device=dev) if (x is not None and need[i]) else None
                 for i, x in enumerate(sources)]
    keep = (labels != ignore_index).nonzero().squeeze(1) if labels is not None else torch.arange(N, device=dev)
    n = keep.numel()
    outs = [loss, None, None, None]
    if n == 0:
        return FL.shaped(FL._finish(outs, acc_grads, sources), sources)
    h = take_rows(hs, keep).to(acc)
    idx = indices.index_select(0, keep).long()
    inv_t = 1.0 / temperature
    b_acc = None if bs is None else bs.to(acc)
    rows_per_block = max(1, min(n, FL.TILE_ELEMENTS // FL.V_TILE))
    blocks = [slice(r, min(n, r + rows_per_block)) for r in range(0, n, rows_per_block)]
    tiles = [(v0, min(V, v0 + FL.V_TILE)) for v0 in range(0, V, FL.V_TILE)]

    def logits(rb, v0, v1, w):
        zs = h[rb] @ w.t()
        return zs + b_acc[v0:v1] if b_acc is not None else zs

    # ---- pass 1: lse(a) online over vocabulary tiles, and the a_k of the teacher's columns
    m = torch.full((n,), -math.inf, dtype=acc, device=dev)
    z = torch.zeros(n, dtype=acc, device=dev)
    a_k = torch.zeros((n, k), dtype=acc, device=dev)
    col_sum = torch.zeros(hs.shape[-1], dtype=acc, device=dev)  # sum_j W_j, for the uniform tail
    for v0, v1 in tiles:
        w = Ws[v0:v1].to(acc)
        if uniform_tail:
            col_sum += w.sum(0)
        for rb in blocks:
            a = logits(rb, v0, v1, w) * inv_t
            m_new = torch.maximum(m[rb], a.max(1).values)
            z[rb] = z[rb] * torch.exp(m[rb] - FL._safe(m_new)) + torch.exp(a - FL._safe(m_new)[:, None]).sum(1)
            m[rb] = m_new
            r, j, col = _topk_in_tile(idx[rb], v0, v1)
            a_k[rb][r, j] = a[r, col]
    lse_a = FL._safe(m) + torch.log(z)

    # ---- the teacher, the loss
    b, lse_b, b_tail, pt_tail = _teacher(values.index_select(0, keep), V, acc, uniform_tail=uniform_tail,
                                         temperature=temperature)
    lpt = b - lse_b[:, None]
    pt = lpt.exp()
    D = torch.where(pt == 0, torch.zeros_like(pt), pt * (lpt - a_k + lse_a[:, None])).sum(1)
    if uniform_tail and V > k:
        sum_a = (h @ col_sum + (b_acc.sum() if b_acc is not None else 0.0)) * inv_t
        tail = pt_tail * ((V - k) * (b_tail - lse_b + lse_a) - (sum_a - a_k.sum(1)))
        D = D + torch.where(pt_tail == 0, torch.zeros_like(tail), tail)
    # a row with an index outside [0, V) (unchecked under torch.compile): NaN loss, NaN gradients
    bad = ((idx < 0) | (idx >= V)).any(1)
    D = torch.where(bad, torch.full_like(D, math.nan), D)
    loss.index_copy_(0, keep, D)

    # ---- pass 2: the gradients
    if any(need):
        g = grad_scale.to(acc).reshape(-1)
        c = (g.expand(N) if g.numel() == 1 else g).index_select(0, keep) * inv_t  # [n]
        c = torch.where(bad, torch.full_like(c, math.nan), c)
        for v0, v1 in tiles:
            w = Ws[v0:v1].to(acc)
            for rb in blocks:
                ps = torch.exp(logits(rb, v0, v1, w) * inv_t - lse_a[rb, None])
                dz = (ps - pt_tail[rb, None]) * c[rb, None]
                r, j, col = _topk_in_tile(idx[rb], v0, v1)
                dz[r, col] = (ps[r, col] - pt[rb][r, j]) * c[rb][r]
                FL._accumulate(acc_grads, dz, keep[rb], h[rb], w, v0, v1)
    return FL.shaped(FL._finish(outs, acc_grads, sources), sources)


class FusedLinearTopkKL(torch.autograd.Function):
    """Loss and gradients in the forward pass (backward scales them); ``reduction="none"``
    recomputes in backward with each row's grad_output."""

    @staticmethod
    def forward(ctx, hs, Ws, bs, values, indices, labels, grad_scale, uniform_tail, temperature, ignore_index,
                reduction, need):
        kw = dict(uniform_tail=uniform_tail, temperature=temperature, ignore_index=ignore_index)
        ctx.kw, ctx.reduction, ctx.need = kw, reduction, need
        outs = tiled_forward(hs, Ws, bs, values, indices, labels, grad_scale, need=need if reduction else (False,) * 3,
                             **kw)
        rows = outs[0]
        if reduction == 0:
            ctx.save_for_backward(hs, Ws, bs, values, indices, labels)
            return rows
        ctx.save_for_backward(*outs[1:])
        return rows.sum() * grad_scale.to(rows.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        from kdkernels.ops.softmax_kl import _is_one

        tail = (None,) * 9
        if ctx.reduction == 0:
            hs, Ws, bs, values, indices, labels = ctx.saved_tensors
            outs = tiled_forward(hs, Ws, bs, values, indices, labels, grad_loss, need=ctx.need, **ctx.kw)
            return (*outs[1:], *tail)
        one = _is_one(grad_loss)  # the usual loss.backward(): hand over the gradients, no copy
        return (*[None if g is None else (g if one else g * grad_loss.to(g.dtype)) for g in ctx.saved_tensors],
                *tail)
