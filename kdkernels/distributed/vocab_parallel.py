"""Vocab-parallel softmax-KL: every rank holds one slice of the vocabulary for all rows.

Per row, the statistics that make the full-row loss are sums and maxima over the vocabulary, so
each is reduced across ranks with one all-reduce (a = s/T, b = t/T on the local slice):

    m_a, m_b   = all_reduce(MAX) of the local maxima
    z_a, z_b   = all_reduce(SUM) of sum exp(a - m_a), sum exp(b - m_b)        -> lse_a, lse_b
    forward:   D = all_reduce(SUM) of sum p_t (b - a)  - lse_b + lse_a
    reverse:   D = all_reduce(SUM) of sum p_s (a - b)  - lse_a + lse_b
    jsd:       Ks, Kt = all_reduce(SUM) of the local terms; D = beta Kt + (1 - beta) Ks
    skew KL, tvd: the two row sums K1, K2 of kdkernels._core.divergences, one all_reduce(SUM)

The maxima and sums of exponentials travel in one all-reduce each (rows stacked), then one more
for the divergence terms: three all-reduces of O(rows) values per call, never a logits slice.
The local gradients are the formulas of :mod:`kdkernels.triton.softmax_kl` with the global
normalizers, computed in the forward pass; backward scales them by ``grad_output``. The local
work runs in PyTorch operations on the rank's slice (float32 accumulation).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from kdkernels._core.autocast import autocast_operands, without_autocast
from kdkernels._core.divergences import pair_grads, pair_sums, value
from kdkernels._core.logit_options import IDENTITY, num_items, transform, transform_grad, transforms
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, batch_size, grad_scale, p_times, safe_max
from kdkernels.fused_linear import tiled_forward, validate_fused_linear
from kdkernels.softmax_divergence import kernel_divergence, validate


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, t, valid, temperature, kind, beta, group, grad_scale, want_s, want_t, s_tf, t_tf):
        acc = acc_dtype(s, t)
        us, ut = transform(s.to(acc), *s_tf), transform(t.to(acc), *t_tf)  # the logit transforms, local
        a, b = us / temperature, ut / temperature
        m = torch.stack([a.max(-1).values, b.max(-1).values])
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        ma, mb = safe_max(m[0]), safe_max(m[1])
        ea, eb = torch.exp(a - ma[:, None]), torch.exp(b - mb[:, None])
        z = torch.stack([ea.sum(-1), eb.sum(-1)])
        dist.all_reduce(z, group=group)
        lse_a, lse_b = ma + z[0].log(), mb + z[1].log()
        lps, lpt = a - lse_a[:, None], b - lse_b[:, None]
        ps, pt = lps.exp(), lpt.exp()
        if kind == 0:
            part = p_times(pt, lpt - lps).sum(-1, keepdim=True)
        elif kind == 1:
            part = p_times(ps, lps - lpt).sum(-1, keepdim=True)
        else:  # JSD, skew KL, TVD: the two row sums (kdkernels._core.divergences), one all-reduce
            part = torch.stack(pair_sums(lps, lpt, kind, beta), -1)
        dist.all_reduce(part, group=group)
        if kind >= 2:
            K1, K2 = part[:, 0], part[:, 1]
            D = value(K1, K2, kind, beta)
        else:
            D = part[:, 0]
        D = torch.where(valid, D, torch.zeros_like(D))
        gs = gt = None
        g = grad_scale.to(acc) / temperature * valid.to(acc)
        if want_s or want_t:
            if kind == 0:
                ds, dt = ps - pt, p_times(pt, lpt - lps - D[:, None])
            elif kind == 1:
                ds, dt = p_times(ps, lps - lpt - D[:, None]), pt - ps
            else:
                ds, dt = pair_grads(lps, lpt, K1, K2, kind, beta)
            if s_tf != IDENTITY:
                ds = ds * transform_grad(us, *s_tf)
            if t_tf != IDENTITY:
                dt = dt * transform_grad(ut, *t_tf)
            gs = (ds * g[:, None]).to(s.dtype) if want_s else None
            gt = (dt * g[:, None]).to(t.dtype) if want_t else None
        ctx.save_for_backward(gs, gt)
        return D

    @staticmethod
    def backward(ctx, grad_rows):
        gs, gt = ctx.saved_tensors
        out_s = None if gs is None else gs * grad_rows[:, None].to(gs.dtype)
        out_t = None if gt is None else gt * grad_rows[:, None].to(gt.dtype)
        return out_s, out_t, None, None, None, None, None, None, None, None, None, None


def vocab_parallel_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
                      divergence: str = "forward", beta: float = 0.5, labels: Optional[Tensor] = None,
                      ignore_index: int = -100, reduction: str = "mean", group=None, skew: float = 0.1,
                      num_items_in_batch=None,
                      student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                      student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0) -> Tensor:
    """:func:`kdkernels.softmax_kl` for logits whose vocabulary is split across the ranks of
    ``group``: each rank passes its ``[..., V_rank]`` slices (any split, the same rows on every
    rank) and gets the full-row loss, the same on every rank, with gradients for its slices.

    ``labels`` (the leading shape, identical on every rank) only mask rows: ``ignore_index`` rows
    contribute 0 and get zero gradients. Divergences (``skew``), reductions, ``num_items_in_batch``
    and the logit transforms (element-wise, so applied to each rank's slice) as in
    :func:`kdkernels.softmax_kl`. Three all-reduces of ``[2, rows]`` (maxima, sums of exponentials)
    and ``[rows]`` (forward / reverse KL) or ``[rows, 2]`` (JSD, skew KL, TVD: their two row sums)
    values, whatever the divergence.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_kl needs an initialized torch.distributed process group")
    # labels only mask rows here (their range is the global vocabulary, which no rank sees whole)
    temperature, beta, _ = validate(student_logits, teacher_logits, None, temperature, divergence, beta,
                                    ignore_index, reduction, "auto", skew=skew)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor or None")
        if labels.shape != student_logits.shape[:-1] or labels.device != student_logits.device:
            raise ValueError(f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])} and "
                             f"device, got {tuple(labels.shape)} on {labels.device}")
    kind_id, beta = kernel_divergence(divergence, beta, skew)
    lead, V = student_logits.shape[:-1], student_logits.shape[-1]
    s = student_logits.reshape(-1, V)
    t = teacher_logits.reshape(-1, V)
    N = s.shape[0]
    valid = torch.ones(N, dtype=torch.bool, device=s.device) if labels is None \
        else labels.reshape(-1) != ignore_index
    red = reduction
    lab = None if labels is None else labels.reshape(-1)
    s_tf, t_tf = transforms(student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale)
    scale = grad_scale(N, lab, ignore_index, red, torch.float64, s.device, batch_size(student_logits.shape),
                       num_items(num_items_in_batch, red, s.device))
    grad_on = torch.is_grad_enabled()
    rows = _VocabParallelKL.apply(s, t, valid, temperature, kind_id, beta, group,
                                  torch.ones((), device=s.device), grad_on and student_logits.requires_grad,
                                  grad_on and teacher_logits.requires_grad, s_tf, t_tf)
    rows = rows.to(acc_dtype(rows))
    if red == "none":
        return rows.reshape(lead)
    total = rows.sum()
    return total if red == "sum" else total * scale.to(total.dtype)


# ------------------------------------------------------------------------------ from hidden states and weight shards

class _AllReduceStats:
    """The ``merge`` of :func:`kdkernels.fused_linear.tiled_forward` across ``group``: the
    online statistics of every rank's slice rescaled to the global maxima and summed."""

    def __init__(self, group):
        self.group = group

    def stats(self, kind, ma, za, mb, zb, w):
        m = torch.stack([ma, mb])
        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=self.group)
        f = torch.exp(m - safe_max(gm))  # 0 where this slice saw nothing (m = -inf)
        w = w * f[1] if kind == 0 else (w * f[0] if kind == 1 else w)
        z = torch.stack([za * f[0], zb * f[1], w])
        dist.all_reduce(z, group=self.group)
        return gm[0], z[0], gm[1], z[1], z[2]

    def sums(self, *xs):
        t = torch.stack(xs)
        dist.all_reduce(t, group=self.group)
        return t.unbind(0)


class _VocabParallelFusedLinearKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, kw, reduction, need, group):
        ctx.kw, ctx.reduction, ctx.need, ctx.group = kw, reduction, need, group
        outs = _run(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, kw, need if reduction else (False,) * 7,
                    group)
        if reduction == 0:
            ctx.save_for_backward(hs, Ws, bs, ht, Wt, bt, t_logits, labels)
            return outs[0]
        ctx.save_for_backward(*outs[1:])
        return outs[0].sum() * grad_scale.to(outs[0].dtype)  # the gradients already carry grad_scale

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == 0:
            hs, Ws, bs, ht, Wt, bt, t_logits, labels = ctx.saved_tensors
            grads = _run(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_loss, ctx.kw, ctx.need, ctx.group)[1:]
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None)


@without_autocast
def _run(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, kw, need, group):
    """The tile loop on this rank's slice with the statistics merged across ranks; the hidden
    states' gradients summed across ranks (each rank's slice contributes to them)."""
    outs = tiled_forward(hs, Ws, bs, ht, Wt, bt, t_logits, labels, grad_scale, need=need,
                         merge=_AllReduceStats(group), **kw)
    for i in (1, 4):  # d student_hidden, d teacher_hidden
        if outs[i] is not None:
            dist.all_reduce(outs[i], group=group)
    return outs


def vocab_parallel_fused_linear_kl(student_hidden: Tensor, student_weight: Tensor,
                                   teacher_hidden: Optional[Tensor] = None, teacher_weight: Optional[Tensor] = None,
                                   *, teacher_logits: Optional[Tensor] = None, student_bias: Optional[Tensor] = None,
                                   teacher_bias: Optional[Tensor] = None, temperature: float = 1.0,
                                   divergence: str = "forward", beta: float = 0.5, labels: Optional[Tensor] = None,
                                   ignore_index: int = -100, reduction: str = "mean", group=None,
                                   skew: float = 0.1, num_items_in_batch=None, student_softcap: Optional[float] = None,
                                   teacher_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
                                   teacher_logit_scale: float = 1.0) -> Tensor:
    """:func:`kdkernels.fused_linear_kl` for an lm_head whose vocabulary is split across the ranks
    of ``group`` (column-parallel): each rank passes the full hidden states (the same on every
    rank) and its ``[V_rank, H]`` weight slices (and ``[V_rank]`` bias slices, or ``[..., V_rank]``
    teacher logits), and gets the full-vocabulary loss, the same on every rank.

    No logits tile leaves a rank: per row, pass 1's statistics are combined with two all-reduces
    (maxima, then the rescaled sums), JSD, the skew KL and TVD add one (their two row sums).
    Gradients: each rank gets those of its own weight and bias slices; the hidden states' gradients
    are summed over the ranks (an all-reduce), so every rank holds the full gradient of its
    replicated hidden states. ``labels`` only mask
    rows (no cross-entropy term: a label's logit lives on one rank). ``num_items_in_batch`` and the
    logit transforms (applied inside each rank's tiles) as in :func:`kdkernels.fused_linear_kl`. The
    local work is the tiled PyTorch loop of ``backend="torch"``.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("vocab_parallel_fused_linear_kl needs an initialized torch.distributed process group")
    temperature, beta, _ = validate_fused_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias, teacher_bias,
        None, temperature, divergence, beta, 0.0, ignore_index, reduction, "torch", allow_empty_vocab=True,
        skew=skew)
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor or None")
        if labels.shape != student_hidden.shape[:-1]:
            raise ValueError(f"labels must have the hidden states' leading shape {tuple(student_hidden.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")
    lead = student_hidden.shape[:-1]
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = autocast_operands(
        student_hidden.device, student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight,
        teacher_bias)
    flat = lambda x: None if x is None else x.reshape(-1, x.shape[-1])  # noqa: E731
    hs, ht, tl = flat(student_hidden), flat(teacher_hidden), flat(teacher_logits)
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    red = reduction
    scale = grad_scale(hs.shape[0], lab, ignore_index, red, acc_dtype(hs, student_weight, ht, teacher_weight, tl),
                       hs.device, batch_size((*lead, student_weight.shape[0])),
                       num_items(num_items_in_batch, red, hs.device))
    s_tf, t_tf = transforms(student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale)
    grad_on = torch.is_grad_enabled()
    srcs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
    need = tuple(bool(grad_on and x is not None and x.requires_grad) for x in srcs)
    kind, beta_k = kernel_divergence(divergence, beta, skew)
    kw = dict(temperature=temperature, kind=kind, beta=beta_k, ignore_index=ignore_index,
              ce_weight=0.0, kd_weight=temperature * temperature, s_tf=s_tf, t_tf=t_tf)
    loss = _VocabParallelFusedLinearKL.apply(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, tl,
                                             lab, scale, kw, REDUCTION_IDS[red], need, group)
    return loss.reshape(lead) if red == "none" else loss
