r"""Top-k teacher KL: forward ``KL(p_t || p_s)`` against a teacher stored as its top-k entries per row
(values and indices), as distillation pipelines store it offline.

The teacher distribution at temperature T (``b_k`` its k values over T):

    topk_format="logprobs", tail="ignore"   p_t ∝ exp(b_k) on the k entries (the top-k renormalized)
    topk_format="logprobs", tail="uniform"  the missing mass r = 1 − Σ exp(values) spread evenly over
                                             the other V − k entries, every probability raised to 1/T
    topk_format="logits"                    p_t = softmax(b_k) over the k entries

Per row ``D = Σ p_t (log p_t − log p_s)`` with ``p_s = softmax(s / T)`` and
``dD/ds = (p_s − p_t) / T``, computed in the forward pass with one more read of the row.

    topk_format="logprobs", tail="bucket"   k + 1 bins on both sides: the k entries and the mass
                                             outside them, r for the teacher (its bin b_tail = log r / T
                                             among the k values at T), ps_tail = 1 − Σ_k p_s,k for the
                                             student; D = Σ_k pt_k log(pt_k/ps_k) + pt_tail log(pt_tail/ps_tail)
    (bucket) dD/ds_j = (p_s,j − pt_j) / T on the top-k and p_s,j (1 − pt_tail/ps_tail) / T off it: with
             dD/dp_j = −pt_j/p_s,j (top-k) or −pt_tail/ps_tail (off), Σ_j p_s,j dD/dp_j = −1.

Backends: ``"cpu"`` (csrc/cpu/topk_kl.cpp), ``"triton"`` (kdkernels/triton/topk_kl.py) and
``"torch"`` (row chunks of PyTorch operations in float64 below: a uniform tail over a large V loses
float32 digits; memory beyond the gradient O(chunk)).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kdkernels._core import backends, checks, ext as _ext
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.logit_options import IDENTITY, num_items, shared_vocab, transform, transform_grad, transforms
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, batch_size, grad_scale, p_times
from kdkernels._core.rows import rows3
from kdkernels.softmax_divergence import validate as validate_logits

__all__ = ["topk_kl", "validate_topk", "TOPK_FORMATS", "TAILS"]

TOPK_FORMATS = ("logprobs", "logits")
TAILS = ("ignore", "uniform", "bucket")
CHUNK_ELEMENTS = 1 << 19  # rows * V per float64 chunk of the PyTorch path

backends.register("topk_kl", cpu=True, triton=True, cuda=False)


def validate_topk(stand_in, teacher_topk_values, teacher_topk_indices, topk_format, tail, temperature, labels,
                  ignore_index, reduction, backend, vocab_size=None):
    """The checks of :func:`topk_kl` on the student logits (or a ``[..., V]`` stand-in with their
    shape); returns the temperature as a float. With ``vocab_size`` the student's first
    ``vocab_size`` entries are the vocabulary, and every index must lie below it."""
    checks.logits("teacher_topk_values", teacher_topk_values)
    checks.int_tensor("teacher_topk_indices", teacher_topk_indices)
    lead, V = stand_in.shape[:-1], stand_in.shape[-1]
    if V == 0:
        raise ValueError("the student has an empty vocabulary: V = 0")
    if vocab_size is not None:
        V = shared_vocab("the student's vocabulary and vocab_size", V, V, vocab_size)
        stand_in = stand_in[..., :V]
    if teacher_topk_values.shape[:-1] != lead or teacher_topk_indices.shape != teacher_topk_values.shape:
        raise ValueError(f"teacher_topk_values and teacher_topk_indices must both be [..., k] with the student's "
                         f"leading shape {tuple(lead)}, got {tuple(teacher_topk_values.shape)} and "
                         f"{tuple(teacher_topk_indices.shape)}")
    k = teacher_topk_values.shape[-1]
    if k == 0 or k > V:
        raise ValueError(f"k (the last dimension of the top-k tensors) must be in [1, V = {V}], got {k}")
    checks.choice("topk_format", topk_format, TOPK_FORMATS)
    checks.choice("tail", tail, TAILS)
    if tail in ("uniform", "bucket") and topk_format == "logits":
        raise ValueError(f"tail={tail!r} needs topk_format='logprobs': logits do not say how much mass the top-k miss")
    checks.one_device(student=stand_in, teacher_topk_values=teacher_topk_values,
                      teacher_topk_indices=teacher_topk_indices)
    checks.index_range("teacher_topk_indices" if vocab_size is None else
                       f"teacher_topk_indices (below vocab_size={vocab_size})", teacher_topk_indices, V)
    temperature, _, _ = validate_logits(stand_in, stand_in, labels, temperature, "forward", 0.5, ignore_index,
                                        reduction, backend)
    return temperature


# ------------------------------------------------------------------------------ the PyTorch path

def teacher_log_probs(values: Tensor, indices: Tensor, V: int, *, logits: bool, uniform_tail: bool,
                      temperature: float) -> Tensor:
    """The ``[R, V]`` teacher log-distribution (module docstring) of a chunk of rows, in float64;
    a row with an index outside ``[0, V)`` is NaN."""
    raw = values.double()
    b = raw / temperature
    R, k = raw.shape
    full = torch.full((R, V), -math.inf, dtype=torch.float64, device=values.device)
    if uniform_tail and not logits and k < V:
        mass = (1.0 - raw.exp().sum(-1, keepdim=True)).clamp_min(0.0)
        full[...] = (torch.log(mass) - math.log(V - k)) / temperature
    inside = (indices >= 0) & (indices < V)
    full.scatter_(1, torch.where(inside, indices, torch.zeros_like(indices)), b)
    out = torch.log_softmax(full, dim=-1)
    return torch.where(inside.all(1, keepdim=True), out, torch.full_like(out, math.nan))


def _bucket_rows(lps: Tensor, values: Tensor, indices: Tensor, temperature: float, need: bool):
    """``tail="bucket"`` on a float64 chunk: (D [R], T dD/da [R, V] or None) with the k + 1 bins of
    the module docstring."""
    inside = (indices >= 0) & (indices < lps.shape[1])
    idx = torch.where(inside, indices, torch.zeros_like(indices))
    ps = lps.exp()
    ps_k = ps.gather(1, idx)
    ps_tail = (1.0 - ps_k.sum(1)).clamp_min(0.0)
    raw = values.double()
    mass = 1.0 - raw.exp().sum(1)
    if raw.shape[1] == lps.shape[1]:  # k = V: no tail, whatever the rounding left
        mass = torch.zeros_like(mass)
    b_tail = torch.where(mass > 0, torch.log(mass.clamp_min(0.0)), torch.full_like(mass, -math.inf)) / temperature
    lpt = torch.log_softmax(torch.cat([raw / temperature, b_tail[:, None]], 1), 1)
    pt_k, pt_tail = lpt[:, :-1].exp(), lpt[:, -1].exp()
    d = p_times(pt_k, lpt[:, :-1] - lps.gather(1, idx)).sum(1)
    d = d + p_times(pt_tail, lpt[:, -1] - torch.log(ps_tail))
    d = torch.where(inside.all(1), d, torch.full_like(d, math.nan))
    if not need:
        return d, None
    keep = torch.where(pt_tail > 0, 1.0 - pt_tail / ps_tail, torch.ones_like(pt_tail))
    dz = ps * keep[:, None]  # off the top-k: the tail bin's share
    dz.scatter_(1, idx, ps_k - pt_k)  # on it: ps - pt
    return d, torch.where(inside.all(1, keepdim=True), dz, torch.full_like(dz, math.nan))


def _torch_rows(student, values, indices, labels, scale, *, logits, uniform_tail, temperature, ignore_index, need,
                s_tf=IDENTITY, bucket=False):
    B, L, V = student.shape
    dev = student.device
    out_acc = acc_dtype(student)
    rows = torch.zeros(B * L, dtype=out_acc, device=dev)
    grad = torch.empty((B * L, V), dtype=student.dtype, device=dev) if need else None
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    g = scale.double().reshape(()) / temperature
    for b in range(B):
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            r = slice(b * L + l0, b * L + l1)
            u = transform(student[b, l0:l1].double(), *s_tf)
            lps = torch.log_softmax(u / temperature, dim=-1)
            if bucket:
                d, dz = _bucket_rows(lps, values[r], indices[r], temperature, need)
                dz = None if dz is None else dz * g
            else:
                lpt = teacher_log_probs(values[r], indices[r], V, logits=logits, uniform_tail=uniform_tail,
                                        temperature=temperature)
                pt = lpt.exp()
                d = p_times(pt, lpt - lps).sum(1)
                dz = (lps.exp() - pt) * g if need else None
            if dz is not None and s_tf != IDENTITY:
                dz = dz * transform_grad(u, *s_tf)
            if labels is not None:
                keep = labels[r] != ignore_index
                d = torch.where(keep, d, torch.zeros_like(d))
                dz = None if dz is None else torch.where(keep[:, None], dz, torch.zeros_like(dz))
            rows[r] = d
            if dz is not None:
                grad[r] = dz
    return rows, grad


def _kernel(backend, inputs, extras, scale, need, *, logits, uniform_tail, temperature, ignore_index, s_scale, s_cap,
            bucket):
    (student,) = inputs
    values, indices, labels = extras
    if backend == "cpu":
        return _ext.require("topk_kl(backend='cpu')").topk_kl_forward_cpu(
            student, values, indices, labels, scale, logits, uniform_tail, temperature, ignore_index, need[0],
            s_scale, s_cap, bucket)
    if backend == "triton":
        from kdkernels.triton.topk_kl import topk_kl_forward

        return topk_kl_forward(student, values, indices, labels, scale, values_are_logits=logits,
                               uniform_tail=uniform_tail, temperature=temperature, ignore_index=ignore_index,
                               need_grad=need[0], s_scale=s_scale, s_cap=s_cap, bucket_tail=bucket)
    return _torch_rows(student, values, indices, labels, scale, logits=logits, uniform_tail=uniform_tail,
                       temperature=temperature, ignore_index=ignore_index, need=need[0], s_tf=(s_scale, s_cap),
                       bucket=bucket)


topk_kl_op = FusedOp("kdkernels::topk_kl", inputs=("student",), extras=("values", "indices", "labels"),
                     params=dict(logits=bool, uniform_tail=bool, temperature=float, ignore_index=int, s_scale=float,
                                 s_cap=float, bucket=bool),
                     kernel=_kernel, none="scale_rows")


def topk_kl(student_logits: Tensor, teacher_topk_values: Tensor, teacher_topk_indices: Tensor, *,
            topk_format: str = "logprobs", tail: str = "ignore", temperature: float = 1.0,
            labels: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
            backend: str = "auto", vocab_size: Optional[int] = None, num_items_in_batch=None,
            student_softcap: Optional[float] = None, student_logit_scale: float = 1.0) -> Tensor:
    r"""Forward ``KL(p_t || p_s)`` against a teacher stored as its top-k entries per row.

    Args:
        student_logits: ``[..., V]`` float logits.
        teacher_topk_values: ``[..., k]``: log-probabilities over the full vocabulary
            (``topk_format="logprobs"``, temperature 1, as ``log_softmax(teacher).topk(k)`` stores
            them) or logits (``topk_format="logits"``). ``-inf`` entries (padding) are legal.
        teacher_topk_indices: ``[..., k]`` integer vocabulary indices, distinct within a row.
        tail: what the probability mass outside the top-k means: ``"ignore"`` drops it (the top-k
            renormalized), ``"uniform"`` spreads it evenly over the other ``V - k`` entries,
            ``"bucket"`` makes it one more bin for both teacher (``1 - sum exp(values)``) and student
            (``1 - sum p_s`` at the indices): a KL over ``k + 1`` bins, whose gradient off the top-k
            is ``p_s (1 - pt_tail / ps_tail) / T`` (the last two need log-probabilities, whose
            missing mass is ``1 - sum exp(values)``). The student's tail bin is ``1 - sum`` in the
            accumulation dtype: in float32 a top-k that holds all but ~1e-6 of the student's mass
            leaves that bin with few correct digits.
        temperature: ``T``: the student's softmax of ``s / T``; the teacher's probabilities are raised
            to ``1/T`` and renormalized (for logits: their softmax at ``T``). No ``T**2`` factor.
        labels, ignore_index, reduction, backend: as in :func:`kdkernels.softmax_kl`: ``"cpu"`` (the
            C++ kernel), ``"triton"`` (CUDA tensors, or the interpreter), ``"torch"`` (row chunks of
            PyTorch operations in float64).
        vocab_size: the student's first ``vocab_size`` entries are the vocabulary (a student whose
            embedding is padded past the teacher's); every index must lie below it.
        num_items_in_batch, student_softcap, student_logit_scale: as in :func:`kdkernels.softmax_kl`
            (the teacher's top-k values are stored after its own transforms).

    The gradient flows to the student only, ``(p_s - p_t) / T`` with ``p_t`` the sparse (plus
    uniform tail) teacher; it is computed in the forward pass in one more read of the row.
    """
    checks.logits("student_logits", student_logits)
    temperature = validate_topk(student_logits, teacher_topk_values, teacher_topk_indices, topk_format, tail,
                                temperature, labels, ignore_index, reduction, backend, vocab_size)
    (s_scale, s_cap), _ = transforms(student_softcap, None, student_logit_scale)
    backend = backends.resolve(backend, student_logits.device, "topk_kl")
    items = num_items(num_items_in_batch, reduction, student_logits.device)
    if vocab_size is not None:
        student_logits = student_logits[..., :vocab_size]
    k = teacher_topk_values.shape[-1]
    lead = student_logits.shape[:-1]
    s3 = rows3(student_logits)  # rows through their strides: a causal-shift view is not copied
    vals = teacher_topk_values.reshape(-1, k)
    idx = teacher_topk_indices.reshape(-1, k).to(torch.int64)
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    N = s3.shape[0] * s3.shape[1]
    scale = grad_scale(N, lab, ignore_index, reduction, acc_dtype(s3), s3.device, batch_size(student_logits.shape),
                       items)
    params = dict(logits=topk_format == "logits", uniform_tail=tail == "uniform", temperature=temperature,
                  ignore_index=ignore_index, s_scale=s_scale, s_cap=s_cap, bucket=tail == "bucket")
    loss = topk_kl_op((s3,), (vals, idx, lab), scale, params, REDUCTION_IDS[reduction], backend)
    return loss.reshape(lead) if reduction == "none" else loss
