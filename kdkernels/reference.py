"""Plain-PyTorch reference for every kdkernels loss.

This module is the test oracle (call it on float64 inputs); no loss calls it (``backend="torch"``
is each family's memory-bounded PyTorch path). It is written for clarity, not for memory: it
materializes the softmaxes that the fused kernels never do. Autograd supplies its gradients.

Conventions shared with the kernels (see :mod:`kdkernels.softmax_divergence`):

* ``p = softmax(logits / T)`` for student (``p_s``) and teacher (``p_t``);
* ``divergence="forward"``: ``KL(p_t || p_s)``; ``"reverse"``: ``KL(p_s || p_t)``;
  ``"jsd"``: ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with
  ``m = beta * p_t + (1 - beta) * p_s``; at ``beta == 0`` and ``beta == 1``, where that
  expression is identically zero, ``"jsd"`` is forward and reverse KL respectively;
* terms with ``p == 0`` contribute nothing (``0 * log 0 = 0``), so ``-inf`` logits are legal;
* the hard-label cross-entropy of ``distill_loss`` uses temperature 1; a label outside ``[0, V)``
  that is not ``ignore_index`` makes its row NaN (as in the kernels), and so does a top-k index
  outside ``[0, V)``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["kl_rows", "logit_transform", "softmax_kl_rows", "softmax_kl", "distill_loss", "reduce_rows", "kl_div",
           "linear_logits",
           "fused_linear_kl", "topk_teacher_log_probs", "topk_kl", "fused_linear_topk_kl", "info_nce", "similarity_kd",
           "clip_distill", "projected_feature_loss"]

DIVERGENCES = ("forward", "reverse", "jsd", "skew_forward", "skew_reverse", "tvd")


def _plogp_ratio(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """sum_j p_j (log p_j - log q_j) with 0 log 0 = 0; NaN-safe in backward too."""
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return (p * diff).sum(-1)


def _log_of(m: torch.Tensor) -> torch.Tensor:
    pos = m > 0  # where m = 0 the terms vanish; keep log's backward away from 1/0
    return torch.where(pos, torch.where(pos, m, torch.ones_like(m)).log(), torch.full_like(m, -math.inf))


def kl_rows(log_ps: torch.Tensor, log_pt: torch.Tensor, divergence: str, beta: float,
            skew: float = 0.1) -> torch.Tensor:
    """The per-row divergence between two log-distributions ``[..., V]``: also DistiLLM's skew KL
    (``"skew_forward"``: ``KL(p_t || skew p_t + (1 - skew) p_s)``, ``"skew_reverse"``:
    ``KL(p_s || skew p_s + (1 - skew) p_t)``) and the total variation ``"tvd"``
    (``sum |p_t - p_s| / 2``)."""
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "skew_forward":
        return _plogp_ratio(pt, log_pt, _log_of(skew * pt + (1.0 - skew) * ps))
    if divergence == "skew_reverse":
        return _plogp_ratio(ps, log_ps, _log_of(skew * ps + (1.0 - skew) * pt))
    if divergence == "tvd":
        return 0.5 * (pt - ps).abs().sum(-1)
    if divergence == "jsd" and beta == 0.0:
        divergence = "forward"
    elif divergence == "jsd" and beta == 1.0:
        divergence = "reverse"
    if divergence == "forward":
        return _plogp_ratio(pt, log_pt, log_ps)
    if divergence == "reverse":
        return _plogp_ratio(ps, log_ps, log_pt)
    if divergence == "jsd":
        log_m = _log_of(beta * pt + (1.0 - beta) * ps)
        return beta * _plogp_ratio(pt, log_pt, log_m) + (1.0 - beta) * _plogp_ratio(ps, log_ps, log_m)
    raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")


def logit_transform(z: torch.Tensor, logit_scale: float = 1.0, softcap: Optional[float] = None) -> torch.Tensor:
    """``softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` without a soft-cap): the
    final-logit scale (Cohere) and soft-cap (Gemma 2/3), in that order, before any temperature."""
    z = z * logit_scale
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def softmax_kl_rows(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    divergence: str = "forward",
    beta: float = 0.5,
    skew: float = 0.1,
    ignore_index: int = -100,
    ce_weight: float = 0.0,
    kd_weight: float = 1.0,
    vocab_size: Optional[int] = None,
    student_softcap: Optional[float] = None,
    teacher_softcap: Optional[float] = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
) -> torch.Tensor:
    """Per-row ``ce_weight * CE(student, labels) + kd_weight * D(teacher, student)``.

    Inputs are ``[..., V]`` (``[..., Vs]`` and ``[..., Vt]`` with ``vocab_size``: both cut to their
    first ``vocab_size`` entries); the logits go through :func:`logit_transform` first. The result
    has the leading shape and the promoted float dtype (at least float32). Rows whose label is
    ``ignore_index`` give 0.
    """
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    s = student_logits.to(dtype)
    t = teacher_logits.to(dtype)
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    s = logit_transform(s, student_logit_scale, student_softcap)
    t = logit_transform(t, teacher_logit_scale, teacher_softcap)
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    rows = kd_weight * kl_rows(log_ps, log_pt, divergence, beta, skew) if kd_weight != 0.0 \
        else s.new_zeros(s.shape[:-1])
    if labels is not None:
        valid = labels != ignore_index
        if ce_weight != 0.0:
            inside = (labels >= 0) & (labels < s.shape[-1])
            safe = torch.where(valid & inside, labels, torch.zeros_like(labels))
            log_p1 = torch.log_softmax(s, dim=-1)
            ce = -log_p1.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
            # a label out of range: a NaN loss and (through the product) a NaN gradient for its row
            ce = ce * torch.where(valid & ~inside, torch.full_like(ce, math.nan), torch.ones_like(ce))
            rows = rows + ce_weight * ce
        rows = torch.where(valid, rows, torch.zeros_like(rows))
    elif ce_weight != 0.0:
        raise ValueError("ce_weight > 0 needs labels")
    return rows


def reduce_rows(rows: torch.Tensor, labels: Optional[torch.Tensor], ignore_index: int, reduction: str,
                batch: Optional[int] = None, num_items_in_batch=None) -> torch.Tensor:
    """``"none"`` keeps rows; ``"sum"`` adds them; ``"mean"`` divides the sum by the number of
    non-ignored rows (an all-ignored batch gives 0); ``"batchmean"`` divides it by ``batch``, the
    logits' ``size(0)`` (``F.kl_div``'s meaning: ``[B, L, V]`` logits divide by B, a single ``[V]``
    row by V; an empty batch gives NaN). ``num_items_in_batch`` (Hugging Face's): the sum divided
    by it, whatever the rows."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if num_items_in_batch is not None:
        return total / float(num_items_in_batch)
    if reduction == "sum":
        return total
    if reduction == "batchmean":
        if batch is None:
            raise ValueError("reduction='batchmean' needs batch, the logits' size(0)")
        return total / batch if batch else total * math.nan
    if labels is None:
        n = rows.numel()
    else:
        n = int((labels != ignore_index).sum())
    return total / max(n, 1)


def softmax_kl(student_logits, teacher_logits, *, temperature=1.0, divergence="forward", beta=0.5,
               labels=None, ignore_index=-100, reduction="mean", num_items_in_batch=None, **logit_options):
    """Reference for :func:`kdkernels.softmax_kl` (``logit_options``: those of :func:`softmax_kl_rows`)."""
    rows = softmax_kl_rows(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence,
                           beta=beta, ignore_index=ignore_index, **logit_options)
    return reduce_rows(rows, labels, ignore_index, reduction, batch=student_logits.shape[0],
                       num_items_in_batch=num_items_in_batch)


def distill_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, alpha=0.0,
                 divergence="forward", beta=0.5, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                 **logit_options):
    """Reference for :func:`kdkernels.distill_loss`:
    ``alpha * CE(student, labels) + (1 - alpha) * T**2 * D(teacher, student)``."""
    rows = softmax_kl_rows(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence,
                           beta=beta, ignore_index=ignore_index, ce_weight=alpha,
                           kd_weight=(1.0 - alpha) * temperature * temperature, **logit_options)
    return reduce_rows(rows, labels, ignore_index, reduction, batch=student_logits.shape[0],
                       num_items_in_batch=num_items_in_batch)


def kl_div(input, target, reduction="mean", log_target=False):
    """Reference for :class:`kdkernels.nn.KLDivLoss` (the semantics of ``torch.nn.functional.kl_div``)."""
    return F.kl_div(input, target, reduction=reduction, log_target=log_target)


def linear_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``hidden @ weight.T + bias``: ``[..., H] x [V, H] -> [..., V]``, in the promoted dtype."""
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    out = hidden.to(dtype) @ weight.to(dtype).t()
    return out if bias is None else out + bias.to(dtype)


def fused_linear_kl(student_hidden, student_weight, teacher_hidden=None, teacher_weight=None, *,
                    teacher_logits=None, student_bias=None, teacher_bias=None, temperature=1.0, divergence="forward",
                    beta=0.5, alpha=0.0, labels=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
                    **logit_options):
    """Reference for :func:`kdkernels.fused_linear_kl`: materializes both ``[N, V]`` logits, then
    ``alpha * CE(student, labels) + (1 - alpha) * T**2 * D(teacher, student)`` as in :func:`distill_loss`."""
    s = linear_logits(student_hidden, student_weight, student_bias)
    t = teacher_logits if teacher_logits is not None else linear_logits(teacher_hidden, teacher_weight, teacher_bias)
    return distill_loss(s, t, labels, temperature=temperature, alpha=alpha, divergence=divergence, beta=beta,
                        ignore_index=ignore_index, reduction=reduction, num_items_in_batch=num_items_in_batch,
                        **logit_options)


def topk_teacher_log_probs(values: torch.Tensor, indices: torch.Tensor, V: int, *, topk_format: str = "logprobs",
                           tail: str = "ignore", temperature: float = 1.0) -> torch.Tensor:
    """The full ``[..., V]`` teacher log-distribution at ``temperature`` that a top-k teacher stands for.

    ``topk_format="logprobs"``: ``values`` are log p over the full vocabulary (temperature 1) at
    ``indices``; the missing mass ``r = 1 - sum exp(values)`` is dropped (``tail="ignore"``: the
    top-k renormalized) or spread evenly over the other ``V - k`` entries (``"uniform"``). At
    temperature T every probability is raised to ``1/T`` and renormalized.
    ``topk_format="logits"``: ``values`` are logits; the distribution is their softmax at T over
    the top-k (``tail`` must be ``"ignore"``: the logits say nothing about the missing mass).
    """
    dtype = torch.promote_types(values.dtype, torch.float32)
    b = values.to(dtype) / temperature
    full = torch.full((*values.shape[:-1], V), -math.inf, dtype=dtype, device=values.device)
    k = values.shape[-1]
    if tail == "uniform" and k < V:
        mass = (1.0 - values.to(dtype).exp().sum(-1, keepdim=True)).clamp_min(0.0)
        full = full.clone()
        full[...] = (torch.log(mass) - math.log(V - k)) / temperature
    inside = (indices >= 0) & (indices < V)
    full = full.scatter(-1, torch.where(inside, indices.long(), torch.zeros_like(indices.long())), b)
    out = torch.log_softmax(full, dim=-1)
    bad = ~inside.all(-1, keepdim=True)  # an index out of range: a NaN row
    return torch.where(bad, torch.full_like(out, math.nan), out)


def _topk_bucket_rows(student_logits, values, indices, temperature, logit_scale, softcap):
    """``tail="bucket"``: KL over k + 1 bins, the top-k entries and the mass outside them, for both:
    the teacher's ``softmax([values, log(1 - Σ exp(values))] / T)``, the student's ``p_s`` at the
    indices and ``1 - Σ`` of those."""
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    s = logit_transform(student_logits.to(dtype), logit_scale, softcap)
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    V = s.shape[-1]
    inside = (indices >= 0) & (indices < V)
    safe = torch.where(inside, indices.long(), torch.zeros_like(indices.long()))
    ps_k = log_ps.gather(-1, safe).exp()
    ps_tail = (1.0 - ps_k.sum(-1, keepdim=True)).clamp_min(0.0)
    v = values.to(dtype)
    mass = (1.0 - v.exp().sum(-1, keepdim=True)).clamp_min(0.0)
    if values.shape[-1] == V:  # the top-k is the whole vocabulary: no tail, whatever the rounding left
        mass = torch.zeros_like(mass)
    log_pt = torch.log_softmax(torch.cat([v, _log_of(mass)], -1) / temperature, dim=-1)
    q = torch.cat([ps_k, ps_tail], -1)  # the student's k + 1 bins
    rows = _plogp_ratio(log_pt.exp(), log_pt, _log_of(q))
    bad = ~inside.all(-1)  # an index out of range: a NaN row
    return torch.where(bad, torch.full_like(rows, math.nan), rows)


def topk_kl(student_logits, teacher_topk_values, teacher_topk_indices, *, topk_format="logprobs", tail="ignore",
            temperature=1.0, labels=None, ignore_index=-100, reduction="mean", num_items_in_batch=None,
            vocab_size=None, student_softcap=None, student_logit_scale=1.0):
    """Reference for :func:`kdkernels.topk_kl`: forward ``KL(p_t || p_s)`` with the teacher
    distribution of :func:`topk_teacher_log_probs` (materialized) over the student's first
    ``vocab_size`` entries (all of them by default), the student's logits transformed first."""
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    V = student_logits.shape[-1]
    if tail == "bucket":
        rows = _topk_bucket_rows(student_logits, teacher_topk_values, teacher_topk_indices, temperature,
                                 student_logit_scale, student_softcap)
        if labels is not None:
            rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
        return reduce_rows(rows, labels, ignore_index, reduction, batch=student_logits.shape[0],
                           num_items_in_batch=num_items_in_batch)
    log_pt = topk_teacher_log_probs(teacher_topk_values, teacher_topk_indices, V, topk_format=topk_format, tail=tail,
                                    temperature=temperature)
    dtype = torch.promote_types(student_logits.dtype, log_pt.dtype)
    s = logit_transform(student_logits.to(dtype), student_logit_scale, student_softcap)
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    rows = kl_rows(log_ps, log_pt.to(dtype), "forward", 0.5)
    if labels is not None:
        rows = torch.where(labels != ignore_index, rows, torch.zeros_like(rows))
    return reduce_rows(rows, labels, ignore_index, reduction, batch=student_logits.shape[0],
                       num_items_in_batch=num_items_in_batch)


def fused_linear_topk_kl(student_hidden, student_weight, teacher_topk_values, teacher_topk_indices, *,
                         student_bias=None, topk_format="logprobs", tail="ignore", temperature=1.0, labels=None,
                         ignore_index=-100, reduction="mean", **options):
    """Reference for :func:`kdkernels.fused_linear_topk_kl`: :func:`topk_kl` on the materialized logits."""
    return topk_kl(linear_logits(student_hidden, student_weight, student_bias), teacher_topk_values,
                   teacher_topk_indices, topk_format=topk_format, tail=tail, temperature=temperature, labels=labels,
                   ignore_index=ignore_index, reduction=reduction, **options)


# ------------------------------------------------------------------------------ similarity losses

def similarity_scale(temperature=None, logit_scale=None):
    """The multiplier of ``a·bᵀ``: ``exp(logit_scale)`` (CLIP stores the log of its scale, a
    learnable scalar) or ``1 / temperature``."""
    if logit_scale is not None:
        return logit_scale.exp()
    return 1.0 / temperature


def info_nce(a, b, *, temperature=None, logit_scale=None, logit_bias=None, labels=None, symmetric=True,
             variant="softmax", reduction="mean"):
    """Reference for :func:`kdkernels.info_nce`, on the materialized ``S = scale a bᵀ (+ bias)``.

    ``variant="softmax"``: row i of ``a`` matches row ``labels[i]`` of ``b`` (default i); its loss is
    the cross-entropy of row i of S with target ``labels[i]``, averaged with (``symmetric``) the
    cross-entropy of column ``labels[i]`` with target i (CLIP's image→text and text→image losses).
    ``variant="sigmoid"`` (SigLIP): ``sum_j -log σ(z_ij S_ij)`` with ``z_ij = +1`` for the matching
    pair and ``-1`` otherwise. Per-row values ``[N_a]``, then ``reduction`` over rows.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    scale = similarity_scale(temperature, logit_scale)
    if isinstance(scale, torch.Tensor):
        scale = scale.to(dtype)
    S = (a.to(dtype) @ b.to(dtype).t()) * scale
    n = a.shape[0]
    lab = torch.arange(n, device=a.device) if labels is None else labels.long()
    rows_idx = torch.arange(n, device=a.device)
    if variant == "sigmoid":
        if logit_bias is not None:
            S = S + logit_bias.to(dtype)
        z = -torch.ones_like(S)
        z[rows_idx, lab] = 1.0
        rows = -F.logsigmoid(z * S).sum(1)
    else:
        pos = S[rows_idx, lab]
        rows = torch.logsumexp(S, 1) - pos
        if symmetric:
            rows = 0.5 * (rows + torch.logsumexp(S, 0)[lab] - pos)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def similarity_kd(student_a, teacher_a, student_b=None, teacher_b=None, *, temperature=1.0, student_temperature=None,
                  divergence="forward", beta=0.5, normalize=True, symmetric=True, reduction="mean"):
    """Reference for :func:`kdkernels.similarity_kd`: the teacher's and the student's similarity
    matrices (``a aᵀ`` without its diagonal when ``*_b`` is None, else ``a bᵀ``), rows turned into
    distributions by softmaxes at their temperatures, ``D(teacher row, student row)`` per row;
    with ``b`` given and ``symmetric``, averaged with the same over columns. Embeddings are
    L2-normalized first when ``normalize``."""
    dtype = torch.promote_types(torch.promote_types(student_a.dtype, teacher_a.dtype), torch.float32)
    Ts = temperature if student_temperature is None else student_temperature
    prep = (lambda x: F.normalize(x.to(dtype), dim=-1)) if normalize else (lambda x: x.to(dtype))
    sa, ta = prep(student_a), prep(teacher_a)
    self_sim = student_b is None
    sb, tb = (sa, ta) if self_sim else (prep(student_b), prep(teacher_b))
    Ss, St = (sa @ sb.t()) / Ts, (ta @ tb.t()) / temperature
    n = Ss.shape[0]
    if self_sim:
        if n < 2:
            rows = Ss.new_zeros(n) + 0.0 * Ss.sum()
            return rows if reduction == "none" else rows.sum()
        eye = torch.eye(n, dtype=torch.bool, device=Ss.device)
        Ss, St = Ss.masked_fill(eye, -math.inf), St.masked_fill(eye, -math.inf)
    rows = kl_rows(torch.log_softmax(Ss, 1), torch.log_softmax(St, 1), divergence, beta)
    if symmetric and not self_sim:
        cols = kl_rows(torch.log_softmax(Ss, 0).t(), torch.log_softmax(St, 0).t(), divergence, beta)
        rows = 0.5 * (rows + cols)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def clip_distill(image, text, t_image, t_text, log_scale, t_scale):
    """Reference for open_clip's ``DistillClipLoss`` (``kdkernels.compat.open_clip``): (CLIP's
    symmetric InfoNCE on ``S = exp(log_scale) image textᵀ``, the soft cross-entropy of the rows and
    of the columns of S against those of the teacher's ``T = t_scale t_image t_textᵀ``, averaged)."""
    dtype = torch.promote_types(torch.promote_types(image.dtype, t_image.dtype), torch.float32)
    contrastive = info_nce(image.to(dtype), text.to(dtype), logit_scale=log_scale.to(dtype))
    S = log_scale.to(dtype).exp() * image.to(dtype) @ text.to(dtype).t()
    T = t_scale * t_image.to(dtype) @ t_text.to(dtype).t()
    xent = lambda t, s: -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()  # noqa: E731
    return contrastive, 0.5 * (xent(T, S) + xent(T.t(), S.t()))


def projected_feature_loss(student_feat, weight, teacher_feat, *, bias=None, metric="mse", beta=1.0, mask=None,
                           reduction="mean"):
    """Reference for :func:`kdkernels.projected_feature_loss`: the projection ``P = student_feat
    weightᵀ + bias`` materialized, per-row ``mean_j`` of the element-wise loss (or ``1 - cos``),
    masked rows zero, then ``reduction`` over the kept rows."""
    dtype = torch.promote_types(torch.promote_types(student_feat.dtype, teacher_feat.dtype), torch.float32)
    dtype = torch.promote_types(dtype, weight.dtype)
    P = F.linear(student_feat.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    T = teacher_feat.to(dtype)
    if metric == "mse":
        rows = F.mse_loss(P, T, reduction="none").mean(-1)
    elif metric == "l1":
        rows = F.l1_loss(P, T, reduction="none").mean(-1)
    elif metric == "smooth_l1":
        rows = F.smooth_l1_loss(P, T, reduction="none", beta=beta).mean(-1)
    elif metric == "cosine":
        rows = 1.0 - F.cosine_similarity(P, T, dim=-1, eps=1e-8)
    else:
        raise ValueError(f"unknown metric {metric!r}")
    if mask is not None:
        keep = mask != 0
        rows = torch.where(keep, rows, torch.zeros_like(rows))
        count = keep.sum()
    else:
        count = rows.numel()
    if reduction == "none":
        return rows
    total = rows.sum()
    return total if reduction == "sum" else total / max(int(count), 1)
