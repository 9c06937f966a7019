"""Fused-linear top-k KL: :func:`kdkernels.topk_kl` on the student logits ``h Wᵀ + b`` without
forming them, tiled over the vocabulary as :mod:`kdkernels.fused_linear` is.

Per kept row (``a = z_s / T``; teacher ``b_k``, ``pt_k``, ``pt_tail`` from its top-k values as in
csrc/cpu/topk_kl.cpp):

    pass 1  per vocabulary tile: z_s tile [R, Vt] (fp32 matmul accumulation), online lse(a), and
            the a_k of the teacher's columns that fall in the tile; for the uniform tail
            sum_j a_j = (h . sum_j W_j + sum_j b_j) / T.
    loss    D = sum_k pt_k (b_k - lse_b - a_k + lse_a)
                + pt_tail ((V - k)(b_tail - lse_b + lse_a) - (sum_j a_j - sum_k a_k))
    bucket  D += pt_tail (log pt_tail - log ps_tail), ps_tail = 1 - sum_k exp(a_k - lse_a)
    pass 2  per tile: dZ = c (softmax(a) - pt_tail), c = g / T (bucket: c softmax(a) (1 - pt_tail /
            ps_tail)), overwritten with c (softmax(a) - pt_k)
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

from kdkernels._core import backends, checks
from kdkernels._core.autocast import autocast_operands, without_autocast
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.logit_options import IDENTITY, num_items, transform, transform_grad, transforms
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, batch_size, grad_scale, kept_rows, safe_max
from kdkernels._core.rows import row_count, rows3, take_rows
from kdkernels._core.sharded import any_dtensor, handler as sharded_handler
from kdkernels.fused_linear import TILE_ELEMENTS, V_TILE, accumulate, check_bias, check_student_linear, finish
from kdkernels.topk_teacher import validate_topk

__all__ = ["fused_linear_topk_kl", "tiled_forward"]

backends.register("fused_linear_topk_kl", cpu=False, triton=False, cuda=False)


def _teacher(values: Tensor, V: int, acc, *, uniform_tail: bool, temperature: float, bucket: bool = False):
    """(b [n, k], lse_b [n], b_tail [n], pt_tail [n]) of the teacher at T; b_tail is -inf without a
    tail. The uniform tail is V - k entries of b_tail each, the bucket one bin."""
    raw = values.to(acc)
    b = raw / temperature
    n, k = raw.shape
    tail_n = V - k
    b_tail = torch.full((n,), -math.inf, dtype=acc, device=raw.device)
    if (uniform_tail or bucket) and tail_n > 0:
        mass = 1.0 - raw.exp().sum(1)
        if bucket:
            tail_n = 1
        b_tail = torch.where(mass > 0, (torch.log(mass.clamp_min(0)) - math.log(tail_n)) / temperature, b_tail)
    with_tail = torch.cat([b, (b_tail + math.log(tail_n) if tail_n > 0 else b_tail)[:, None]], 1)
    lse_b = torch.logsumexp(with_tail, 1)
    pt_tail = torch.where(b_tail == -math.inf, torch.zeros_like(b_tail), torch.exp(b_tail - lse_b))
    return b, lse_b, b_tail, pt_tail


def _topk_in_tile(idx: Tensor, v0: int, v1: int):
    """(mask, tile columns) of the top-k indices ``[R, k]`` of a row block against the tile
    ``[v0, v1)``: which lie in it, and their columns there (clamped into the tile where they do not,
    so that a gather stays in bounds; no host sync)."""
    inside = (idx >= v0) & (idx < v1)
    return inside, (idx - v0).clamp(0, v1 - v0 - 1)

@without_autocast
def tiled_forward(hs: Tensor, Ws: Tensor, bs: Optional[Tensor], values: Tensor, indices: Tensor,
                  labels: Optional[Tensor], grad_scale: Tensor, *, uniform_tail: bool, temperature: float,
                  ignore_index: int, need: tuple, s_tf=IDENTITY, bucket: bool = False):
    """[loss rows, d hs, d Ws, d bs] (None where not needed; gradients pre-multiplied by
    ``grad_scale``, a scalar or one value per row). ``need`` = which of (hs, Ws, bs) get one.
    ``values`` are log-probabilities or logits: both enter as ``b_k = values / T``; only the
    uniform tail (log-probabilities) reads them as probabilities. ``s_tf``: the student's logit
    transform (:mod:`kdkernels._core.logit_options`), applied to each tile."""
    acc = acc_dtype(hs, Ws)
    N, V = row_count(hs), Ws.shape[0]  # hs: [N, H] or [B, L, H] rows (kdkernels._core.rows)
    k = values.shape[1]
    dev = hs.device
    loss = torch.zeros(N, dtype=acc, device=dev)
    sources = (hs, Ws, bs)
    shapes = ((N, hs.shape[-1]), Ws.shape, None if bs is None else bs.shape)
    acc_grads = [torch.zeros(shapes[i], dtype=acc, device=dev) if (x is not None and need[i]) else None
                 for i, x in enumerate(sources)]
    keep, valid = kept_rows(labels, ignore_index, N, dev)  # ignored rows: dropped, or masked (no sync)
    n = keep.numel()
    outs = [loss, None, None, None]
    if n == 0:
        return finish(outs, acc_grads, sources)
    h = take_rows(hs, keep).to(acc)
    idx = indices.index_select(0, keep).long()
    inv_t = 1.0 / temperature
    b_acc = None if bs is None else bs.to(acc)
    rows_per_block = max(1, min(n, TILE_ELEMENTS // V_TILE))
    blocks = [slice(r, min(n, r + rows_per_block)) for r in range(0, n, rows_per_block)]
    tiles = [(v0, min(V, v0 + V_TILE)) for v0 in range(0, V, V_TILE)]

    def logits(rb, v0, v1, w):
        zs = h[rb] @ w.t()
        return transform(zs + b_acc[v0:v1] if b_acc is not None else zs, *s_tf)

    # ---- pass 1: lse(a) online over vocabulary tiles, and the a_k of the teacher's columns
    m = torch.full((n,), -math.inf, dtype=acc, device=dev)
    z = torch.zeros(n, dtype=acc, device=dev)
    a_k = torch.zeros((n, k), dtype=acc, device=dev)
    sum_a = torch.zeros(n, dtype=acc, device=dev)  # sum_j a_j, for the uniform tail
    for v0, v1 in tiles:
        w = Ws[v0:v1].to(acc)
        for rb in blocks:
            a = logits(rb, v0, v1, w) * inv_t
            if uniform_tail:
                sum_a[rb] += a.sum(1)
            m_new = torch.maximum(m[rb], a.max(1).values)
            z[rb] = z[rb] * torch.exp(m[rb] - safe_max(m_new)) + torch.exp(a - safe_max(m_new)[:, None]).sum(1)
            m[rb] = m_new
            inside, col = _topk_in_tile(idx[rb], v0, v1)
            a_k[rb] = torch.where(inside, a.gather(1, col), a_k[rb])
    lse_a = safe_max(m) + torch.log(z)

    # ---- the teacher, the loss
    b, lse_b, b_tail, pt_tail = _teacher(values.index_select(0, keep), V, acc, uniform_tail=uniform_tail,
                                         temperature=temperature, bucket=bucket)
    lpt = b - lse_b[:, None]
    pt = lpt.exp()
    D = torch.where(pt == 0, torch.zeros_like(pt), pt * (lpt - a_k + lse_a[:, None])).sum(1)
    keep_tail, off = torch.ones_like(pt_tail), pt_tail  # off the top-k, dD/da = keep_tail ps - off
    if bucket:  # the student's tail bin, 1 - its top-k mass (topk_teacher's docstring)
        ps_tail = (1.0 - torch.exp(a_k - lse_a[:, None]).sum(1)).clamp_min(0.0)
        D = D + torch.where(pt_tail == 0, 0.0, pt_tail * ((b_tail - lse_b) - torch.log(ps_tail)))
        keep_tail = torch.where(pt_tail == 0, 1.0, 1.0 - pt_tail / ps_tail)
        off = torch.zeros_like(pt_tail)
    if uniform_tail and V > k:
        tail = pt_tail * ((V - k) * (b_tail - lse_b + lse_a) - (sum_a - a_k.sum(1)))
        D = D + torch.where(pt_tail == 0, torch.zeros_like(tail), tail)
    # a row with an index outside [0, V) (unchecked under torch.compile): NaN loss, NaN gradients
    bad = ((idx < 0) | (idx >= V)).any(1)
    D = torch.where(bad, torch.full_like(D, math.nan), D)
    if valid is not None:
        D = torch.where(valid, D, 0.0)
    loss.index_copy_(0, keep, D)

    # ---- pass 2: the gradients
    if any(need):
        g = grad_scale.to(acc).reshape(-1)
        c = (g.expand(N) if g.numel() == 1 else g).index_select(0, keep) * inv_t  # [n]
        c = torch.where(bad, torch.full_like(c, math.nan), c)
        if valid is not None:
            c = torch.where(valid, c, 0.0)
        for v0, v1 in tiles:
            w = Ws[v0:v1].to(acc)
            for rb in blocks:
                u = logits(rb, v0, v1, w)
                ps = torch.exp(u * inv_t - lse_a[rb, None])
                dz = (ps * keep_tail[rb, None] - off[rb, None]) * c[rb, None]
                inside, col = _topk_in_tile(idx[rb], v0, v1)
                # at the teacher's columns c (ps - pt_k) instead of c (keep ps - off): the indices of
                # a row are distinct, so adding the difference (0 outside the tile) is exact
                fix = (ps.gather(1, col) * (1.0 - keep_tail[rb, None]) + off[rb, None] - pt[rb]) * c[rb, None]
                dz.scatter_add_(1, col, torch.where(inside, fix, 0.0))
                if s_tf != IDENTITY:
                    dz = dz * transform_grad(u, *s_tf)
                if valid is not None:  # masked rows: exactly zero, whatever their logits
                    dz = torch.where(valid[rb, None], dz, 0.0)
                accumulate(acc_grads, dz, keep[rb], h[rb], w, v0, v1)
    return finish(outs, acc_grads, sources)


def _kernel(backend, inputs, extras, scale, need, *, uniform_tail, temperature, ignore_index, s_scale, s_cap,
            bucket):
    hs, Ws, bs = inputs
    values, indices, labels = extras
    return tiled_forward(hs, Ws, bs, values, indices, labels, scale, uniform_tail=uniform_tail,
                         temperature=temperature, ignore_index=ignore_index, need=need, s_tf=(s_scale, s_cap),
                         bucket=bucket)


fused_linear_topk_kl_op = FusedOp("kdkernels::fused_linear_topk_kl", inputs=("hs", "Ws", "bs"),
                                  extras=("values", "indices", "labels"),
                                  params=dict(uniform_tail=bool, temperature=float, ignore_index=int, s_scale=float,
                                              s_cap=float, bucket=bool),
                                  kernel=_kernel, none="recompute")


def fused_linear_topk_kl(student_hidden: Tensor, student_weight: Tensor, teacher_topk_values: Tensor,
                         teacher_topk_indices: Tensor, *, student_bias: Optional[Tensor] = None,
                         topk_format: str = "logprobs", tail: str = "ignore", temperature: float = 1.0,
                         labels: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         backend: str = "auto", vocab_size: Optional[int] = None, num_items_in_batch=None,
                         student_softcap: Optional[float] = None, student_logit_scale: float = 1.0) -> Tensor:
    r""":func:`topk_kl` on the student logits ``student_hidden @ student_weight.T + student_bias``,
    without forming them: the vocabulary is processed in tiles as in :func:`fused_linear_kl`, and
    the k teacher columns of each row are gathered from the weight.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``; student_bias: ``[V]`` or None.
        teacher_topk_values, teacher_topk_indices: ``[..., k]`` with student_hidden's leading shape.
        topk_format, tail, temperature, labels, ignore_index, reduction: as in :func:`topk_kl`.
        backend: ``"auto"`` or ``"torch"``: tiles of ATen matmuls on any device (the matmuls are the
            whole cost; the per-row work is O(k)).
        vocab_size: the weight's first ``vocab_size`` rows are the vocabulary (a padded embedding);
            the other rows get a zero gradient.
        num_items_in_batch, student_softcap, student_logit_scale: as in :func:`kdkernels.softmax_kl`,
            the transforms applied inside the tiles.

    A DTensor weight is gathered for the call, its gradient returned with its placement
    (:mod:`kdkernels.distributed.sharded`). Gradients go to the hidden states, the weight and the
    bias. Peak extra memory: the gradients, O(rows · k) statistics and tiles of a fixed size,
    independent of V.
    """
    if any_dtensor(student_hidden, student_weight, student_bias):  # kdkernels.distributed.sharded: gathered
        return sharded_handler("fused_linear_topk_kl")(fused_linear_topk_kl, dict(locals()))
    lead, V = check_student_linear(student_hidden, student_weight)
    check_bias("student_bias", student_bias, V)
    checks.one_device(student_hidden=student_hidden, student_weight=student_weight, student_bias=student_bias)
    checks.backend(backend)
    stand_in = student_hidden.new_zeros(()).expand(*lead, V)
    temperature = validate_topk(stand_in, teacher_topk_values, teacher_topk_indices, topk_format, tail, temperature,
                                labels, ignore_index, reduction, "torch", vocab_size)
    (s_scale, s_cap), _ = transforms(student_softcap, None, student_logit_scale)
    backend = backends.resolve(backend, student_hidden.device, "fused_linear_topk_kl")
    items = num_items(num_items_in_batch, reduction, student_hidden.device)
    if vocab_size is not None:  # leading rows: a view, whose gradient autograd pads with zeros
        student_weight = student_weight[:vocab_size]
        student_bias = None if student_bias is None else student_bias[:vocab_size]
        V = vocab_size
    student_hidden, student_weight, student_bias = autocast_operands(student_hidden.device, student_hidden,
                                                                     student_weight, student_bias)
    k = teacher_topk_values.shape[-1]
    hs = rows3(student_hidden)  # [B, L, H] rows through their strides (no copy of a shifted view)
    vals = teacher_topk_values.reshape(-1, k)
    idx = teacher_topk_indices.reshape(-1, k).to(torch.int64)
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    scale = grad_scale(hs.shape[0] * hs.shape[1], lab, ignore_index, reduction,
                       acc_dtype(student_hidden, student_weight), hs.device, batch_size((*lead, V)), items)
    params = dict(uniform_tail=tail == "uniform", temperature=temperature, ignore_index=ignore_index, s_scale=s_scale,
                  s_cap=s_cap, bucket=tail == "bucket")
    loss = fused_linear_topk_kl_op((hs, student_weight, student_bias), (vals, idx, lab), scale, params,
                                   REDUCTION_IDS[reduction], backend)
    return loss.reshape(lead) if reduction == "none" else loss
