r"""Softmax-KL: the divergence between the softmaxes of teacher and student logits, and Hinton's
distillation loss, fused with their gradients.

Per row (``a = s / T``, ``b = t / T``, ``p_s = softmax(a)``, ``p_t = softmax(b)``, ``D`` the
divergence, ``g`` the row's gradient scale):

    forward  D = Σ p_t (log p_t − log p_s)      dD/da = p_s − p_t          dD/db = p_t (log p_t/p_s − D)
    reverse  D = Σ p_s (log p_s − log p_t)      dD/da = p_s (log p_s/p_t − D)   dD/db = p_t − p_s
    jsd      m = β p_t + (1 − β) p_s,  K_s = Σ p_s log(p_s/m),  K_t = Σ p_t log(p_t/m)
             D = β K_t + (1 − β) K_s            dD/da = (1 − β) p_s (log p_s/m − K_s)
                                                dD/db = β p_t (log p_t/m − K_t)

(at β = 0 and β = 1, where the JSD vanishes, ``"jsd"`` is forward and reverse KL, as in TRL and
Liger-Kernel). The skew KL (``"skew_forward"``, ``"skew_reverse"``) and total variation (``"tvd"``)
take, like the JSD, two row sums before their gradient: :mod:`kdkernels._core.divergences` derives
them. :func:`distill_loss` adds ``ce_weight · CE(s, label)`` at temperature 1, whose
gradient is ``softmax(s) − onehot(label)``; the row loss is ``ce_weight CE + kd_weight D`` and the
logit gradients are ``g (kd_weight / T) dD/da + g ce_weight (softmax(s) − onehot)``.

Backends (:mod:`kdkernels._core.backends`): ``"cpu"`` (csrc/cpu/softmax_kl.cpp, one sweep of a row
held in cache), ``"triton"`` (kdkernels/triton/softmax_kl.py), ``"cuda"`` (csrc/cuda/softmax_kl.cu)
and ``"torch"`` (row chunks of PyTorch operations below, any device: memory beyond the gradients
is a few ``[rows, V]`` float32 chunks of at most ``CHUNK_ELEMENTS`` values). Every backend writes
the gradients in the forward pass; backward only scales them (:mod:`kdkernels._core.fused_op`).
"""

from __future__ import annotations

import os
from typing import Optional

import torch
from torch import Tensor

from kdkernels._core import backends, checks, ext as _ext
from kdkernels._core.divergences import mixture_weight, pair_grads, pair_sums, value
from kdkernels._core.fused_op import FusedOp
from kdkernels._core.logit_options import IDENTITY, num_items, shared_vocab, transform, transform_grad, transforms
from kdkernels._core.numerics import REDUCTION_IDS, acc_dtype, batch_size, grad_scale, p_times
from kdkernels._core.rows import rows3

__all__ = ["softmax_kl", "distill_loss", "DIVERGENCES", "validate", "divergence_id"]

DIVERGENCES = {"forward": 0, "reverse": 1, "jsd": 2, "skew_forward": 3, "skew_reverse": 4, "tvd": 5}
KL_AND_JSD = ("forward", "reverse", "jsd")  # the divergences of the losses that have no others (similarity_kd)
CHUNK_ELEMENTS = 1 << 20  # rows * V per chunk of the PyTorch path

backends.register("softmax_kl", cpu=True, triton=True, cuda=True)
backends.register("distill_loss", cpu=True, triton=True, cuda=True)


def validate(student_logits, teacher_logits, labels, temperature, divergence, beta, ignore_index, reduction,
             backend, alpha=0.0, vocab_size=None, what="student_logits and teacher_logits", skew=0.1):
    """The checks of :func:`softmax_kl` / :func:`distill_loss` (also run by the other logit losses on
    ``[..., V]`` stand-ins); returns (temperature, beta, alpha) as floats. The vocabularies may
    differ when ``vocab_size`` (:func:`kdkernels._core.logit_options.shared_vocab`) says how many
    entries they share; labels are checked against that."""
    checks.logits("student_logits", student_logits)
    checks.logits("teacher_logits", teacher_logits)
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"student_logits and teacher_logits must have the same leading shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got "
                         f"{student_logits.device} and {teacher_logits.device}")
    if min(student_logits.shape[-1], teacher_logits.shape[-1]) == 0:
        raise ValueError(f"{what} have an empty vocabulary (last) dimension: V = 0")
    V = shared_vocab(what, student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    temperature = checks.positive("temperature", temperature)
    beta = checks.scalar("beta", beta, 0.0, 1.0)
    alpha = checks.scalar("alpha", alpha, 0.0, 1.0)
    checks.choice("divergence", divergence, DIVERGENCES)
    if checks.scalar("skew", skew, 0.0, 1.0) == 1.0:
        raise ValueError("skew must be in [0, 1): at 1 the skewed mixture is the distribution itself (D = 0)")
    checks.reduction(reduction)
    checks.backend(backend)
    checks.integer("ignore_index", ignore_index)
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        checks.int_tensor("labels", labels)
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")
        if labels.device != student_logits.device:
            raise ValueError(f"labels must be on the logits' device {student_logits.device}, got {labels.device}")
        checks.index_range("labels", labels, V, allowed=ignore_index)
    elif alpha > 0:
        raise ValueError("alpha > 0 mixes in the hard-label cross-entropy: labels are required")
    return temperature, beta, alpha


def divergence_id(divergence: str, beta: float) -> int:
    """The kernels' divergence id: the generalized JSD at beta 0 and 1 is forward and reverse KL."""
    d = DIVERGENCES[divergence]
    if d == 2 and beta == 0.0:
        return 0
    if d == 2 and beta == 1.0:
        return 1
    return d


def kernel_divergence(divergence: str, beta: float, skew: float) -> tuple:
    """(kind, beta) as the kernels take them: :func:`divergence_id`, with the skew KL at ``skew`` 0
    being forward / reverse KL, and ``beta`` the mixture weight ``m = beta p_t + (1 - beta) p_s`` of
    the kind (:func:`kdkernels._core.divergences.mixture_weight`)."""
    kind = divergence_id(divergence, beta)
    if kind in (3, 4) and skew == 0.0:
        return kind - 3, 0.5
    return kind, mixture_weight(kind, beta, skew)


# ------------------------------------------------------------------------------ the PyTorch path

def _chunk(s: Tensor, t: Tensor, lab: Optional[Tensor], g: Tensor, *, temperature, kind, beta, ignore_index,
           ce_weight, kd_weight, need_s, need_t, acc, s_tf=IDENTITY, t_tf=IDENTITY):
    """Rows, d s, d t (module docstring) of a ``[R, V]`` chunk, in ``acc``; the logits transformed
    by ``s_tf``, ``t_tf`` (:mod:`kdkernels._core.logit_options`) first, the gradients chained
    through them."""
    us, ut = transform(s.to(acc), *s_tf), transform(t.to(acc), *t_tf)
    rows, ds, dt = _chunk_rows(us, ut, lab, g, temperature=temperature, kind=kind, beta=beta,
                               ignore_index=ignore_index, ce_weight=ce_weight, kd_weight=kd_weight, need_s=need_s,
                               need_t=need_t)
    if ds is not None and s_tf != IDENTITY:
        ds = ds * transform_grad(us, *s_tf)
    if dt is not None and t_tf != IDENTITY:
        dt = dt * transform_grad(ut, *t_tf)
    return rows, ds, dt


def _chunk_rows(s: Tensor, t: Tensor, lab: Optional[Tensor], g: Tensor, *, temperature, kind, beta, ignore_index,
                ce_weight, kd_weight, need_s, need_t):
    inv_t = 1.0 / temperature
    lps = torch.log_softmax(s * inv_t, dim=-1)
    lpt = torch.log_softmax(t * inv_t, dim=-1)
    ps, pt = lps.exp(), lpt.exp()
    ds = dt = None
    if kind == 0:
        D = p_times(pt, lpt - lps).sum(-1)
        if need_s:
            ds = ps - pt
        if need_t:
            dt = p_times(pt, lpt - lps - D[:, None])
    elif kind == 1:
        D = p_times(ps, lps - lpt).sum(-1)
        if need_s:
            ds = p_times(ps, lps - lpt - D[:, None])
        if need_t:
            dt = pt - ps
    else:  # the kinds with a second sweep (kdkernels._core.divergences)
        K1, K2 = pair_sums(lps, lpt, kind, beta)
        D = value(K1, K2, kind, beta)
        if need_s or need_t:
            ds, dt = pair_grads(lps, lpt, K1, K2, kind, beta)
            ds, dt = (ds if need_s else None), (dt if need_t else None)
    rows = kd_weight * D
    w = g * (kd_weight * inv_t)
    ds = None if ds is None else ds * w
    dt = None if dt is None else dt * w
    if lab is not None:
        V = s.shape[-1]
        valid = lab != ignore_index
        if ce_weight != 0.0:
            inside = (lab >= 0) & (lab < V)
            lp1 = lps if temperature == 1.0 else torch.log_softmax(s, dim=-1)
            safe = torch.where(valid & inside, lab, torch.zeros_like(lab))
            ce = -lp1.gather(1, safe[:, None]).squeeze(1)
            # a label outside [0, V): a NaN loss and NaN gradients for its row
            nan = torch.where(valid & ~inside, torch.full_like(ce, float("nan")), torch.zeros_like(ce))
            rows = rows + ce_weight * ce + nan
            if ds is not None:
                dce = lp1.exp()
                dce.scatter_add_(1, safe[:, None], torch.full_like(ce[:, None], -1.0))
                ds = ds + dce * (g * ce_weight) + nan[:, None]
        keep = valid[:, None]
        rows = torch.where(valid, rows, torch.zeros_like(rows))
        ds = None if ds is None else torch.where(keep, ds, torch.zeros_like(ds))
        dt = None if dt is None else torch.where(keep, dt, torch.zeros_like(dt))
    return rows, ds, dt


def _torch_rows(student, teacher, labels, scale, *, need_grad_student, need_grad_teacher, **kw):
    """The PyTorch path on ``[B, L, V]`` rows: row chunks of at most CHUNK_ELEMENTS values, so
    that the memory beyond the gradients stays O(chunk) whatever N."""
    B, L, V = student.shape
    acc = acc_dtype(student, teacher)
    dev = student.device
    rows = torch.zeros(B * L, dtype=acc, device=dev)
    grad_s = torch.empty((B * L, V), dtype=student.dtype, device=dev) if need_grad_student else None
    grad_t = torch.empty((B * L, V), dtype=teacher.dtype, device=dev) if need_grad_teacher else None
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    g = scale.to(acc).reshape(())
    for b in range(B):
        for l0 in range(0, L, step):
            l1 = min(L, l0 + step)
            r = slice(b * L + l0, b * L + l1)
            lab = None if labels is None else labels[r]
            out, ds, dt = _chunk(student[b, l0:l1], teacher[b, l0:l1], lab, g, need_s=need_grad_student,
                                 need_t=need_grad_teacher, acc=acc, **kw)
            rows[r] = out
            if ds is not None:
                grad_s[r] = ds
            if dt is not None:
                grad_t[r] = dt
    return rows, grad_s, grad_t


# ------------------------------------------------------------------------------ the op

def cuda_plan_override() -> dict:
    """The CUDA kernels' plan forced by ``KDK_CUDA_SOFTMAX_KL_PLAN`` (tests and benchmarks):
    ``stream``, ``staged`` or ``staged:<cluster>``, optionally ``/<threads>`` (``staged:4/256``).
    Unset: the planner decides (staged when rows are 16-byte aligned and fit, else streaming)."""
    spec = os.environ.get("KDK_CUDA_SOFTMAX_KL_PLAN", "").strip()
    if not spec:
        return {}
    mode, _, threads = spec.partition("/")
    mode, _, cluster = mode.partition(":")
    try:
        out = {"force_mode": {"stream": 0, "staged": 1}[mode], "force_cluster": int(cluster or 0),
               "force_threads": int(threads or 0)}
    except (KeyError, ValueError):
        raise ValueError(f"KDK_CUDA_SOFTMAX_KL_PLAN must be stream, staged or staged:<cluster>, optionally "
                         f"followed by /<threads>; got {spec!r}") from None
    return out


def _kernel(backend, inputs, extras, scale, need, *, temperature, kind, beta, ignore_index, ce_weight, kd_weight,
            s_scale, s_cap, t_scale, t_cap):
    """``(rows [N], grad_student, grad_teacher)`` of ``[B, L, V]`` rows (:mod:`kdkernels._core.rows`;
    the two may be laid out differently but hold the same N rows), the gradients contiguous."""
    student, teacher = inputs
    (labels,) = extras
    kw = dict(temperature=temperature, kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight,
              kd_weight=kd_weight, need_grad_student=need[0], need_grad_teacher=need[1])
    tf = dict(s_scale=s_scale, s_cap=s_cap, t_scale=t_scale, t_cap=t_cap)
    if backend == "cpu":
        return _ext.require("softmax_kl(backend='cpu')").softmax_kl_forward_cpu(student, teacher, labels, scale, **kw,
                                                                               **tf)
    if backend == "triton":
        from kdkernels.triton.softmax_kl import softmax_kl_forward

        return softmax_kl_forward(student, teacher, labels, scale, **kw, **tf)
    if backend == "cuda":
        rows, grad_s, grad_t, _plan = _ext.require("softmax_kl(backend='cuda')").softmax_kl_forward_cuda(
            student, teacher, labels, scale, **kw, **tf, **cuda_plan_override())
        return rows, grad_s, grad_t
    return _torch_rows(student, teacher, labels, scale, **kw, s_tf=(s_scale, s_cap), t_tf=(t_scale, t_cap))


softmax_kl_op = FusedOp("kdkernels::softmax_kl", inputs=("student", "teacher"), extras=("labels",),
                        params=dict(temperature=float, kind=int, beta=float, ignore_index=int, ce_weight=float,
                                    kd_weight=float, s_scale=float, s_cap=float, t_scale=float, t_cap=float),
                        kernel=_kernel, none="scale_rows")


def _fused(student_logits, teacher_logits, labels, *, temperature, divergence, beta, ignore_index, reduction, backend,
           ce_weight, kd_weight, op_name, vocab_size=None, num_items_in_batch=None, tf=(IDENTITY, IDENTITY), skew=0.1):
    name = backends.resolve(backend, student_logits.device, op_name)
    lead = student_logits.shape[:-1]
    items = num_items(num_items_in_batch, reduction, student_logits.device)
    if vocab_size is not None:  # the shared prefix, a strided view (rows3 reads it without a copy)
        student_logits, teacher_logits = student_logits[..., :vocab_size], teacher_logits[..., :vocab_size]
    # rows read through their strides: a view such as logits[:, :-1] (the causal shift) is not copied
    s3, t3 = rows3(student_logits), rows3(teacher_logits)
    if (s3.dtype == torch.float64) != (t3.dtype == torch.float64):  # float64 pairs with float64 only
        s3, t3 = s3.double(), t3.double()
    N = s3.shape[0] * s3.shape[1]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    scale = grad_scale(N, lab, ignore_index, reduction, torch.float32, student_logits.device,
                       batch_size(student_logits.shape), items)
    (s_scale, s_cap), (t_scale, t_cap) = tf
    kind, beta_k = kernel_divergence(divergence, beta, skew)
    params = dict(temperature=temperature, kind=kind, beta=beta_k, ignore_index=ignore_index,
                  ce_weight=ce_weight, kd_weight=kd_weight, s_scale=s_scale, s_cap=s_cap, t_scale=t_scale, t_cap=t_cap)
    loss = softmax_kl_op((s3, t3), (lab,), scale, params, REDUCTION_IDS[reduction], name)
    return loss.reshape(lead) if reduction == "none" else loss


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               divergence: str = "forward", beta: float = 0.5, labels: Optional[Tensor] = None,
               ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", skew: float = 0.1,
               vocab_size: Optional[int] = None, num_items_in_batch=None, student_softcap: Optional[float] = None,
               teacher_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
               teacher_logit_scale: float = 1.0) -> Tensor:
    r"""Divergence between the softmaxes of teacher and student logits, fused with its gradient.

    With ``p_s = softmax(student_logits / T)`` and ``p_t = softmax(teacher_logits / T)``, per row:

    * ``divergence="forward"``: ``KL(p_t || p_s) = sum p_t (log p_t - log p_s)``; with
      ``reduction="batchmean"`` this is exactly
      ``F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")``;
    * ``divergence="reverse"``: ``KL(p_s || p_t)``;
    * ``divergence="jsd"``: the generalized Jensen-Shannon divergence
      ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``;
      ``beta=0.5`` is the symmetric JSD. At ``beta=0`` and ``beta=1``, where that expression vanishes,
      the loss is forward and reverse KL (the convention of TRL's and Liger-Kernel's JSD losses).
    * ``divergence="skew_forward"``: DistiLLM's skew KL ``KL(p_t || skew p_t + (1 - skew) p_s)``;
      ``"skew_reverse"``: ``KL(p_s || skew p_s + (1 - skew) p_t)`` (``skew`` in ``[0, 1)``; at 0 they are
      forward and reverse KL);
    * ``divergence="tvd"``: the total variation distance ``sum |p_t - p_s| / 2``.

    JSD, the skew KL and TVD need two sums over the row before their gradient: one more read of the
    row than forward / reverse KL where the row does not fit on chip (their gradients are derived in
    :mod:`kdkernels._core.divergences`).

    Args:
        student_logits, teacher_logits: ``[..., V]`` float32, bfloat16, float16 or float64 logits of
            the same shape (the dtypes may differ). Leading dimensions are flattened to rows, read
            through their strides: a view such as ``logits[:, :-1]`` (the causal shift) is not copied.
            ``-inf`` entries (padded vocabulary) are legal; a NaN makes its row's loss NaN.
        temperature: ``T > 0``; no ``T**2`` factor is applied here (see :func:`distill_loss`).
        labels: optional integer ``[...]`` (the leading shape); rows whose label is ``ignore_index``
            cost nothing, contribute 0 and get a zero gradient.
        reduction: ``"none"`` (per-row losses, float32, 0 for ignored rows), ``"sum"``, ``"mean"``
            (the sum over the non-ignored rows divided by their number; an all-ignored batch gives
            0), or ``"batchmean"`` (PyTorch's: the sum over the non-ignored rows divided by
            ``student_logits.size(0)``, the batch B of ``[B, L, V]`` logits, V of a single ``[V]``
            row; for 2-D ``[N, V]`` logits without labels it equals ``"mean"``).
        backend: ``"auto"`` (the C++ kernel on CPU tensors, Triton on CUDA), ``"cpu"``, ``"triton"``,
            ``"cuda"``, or ``"torch"`` (row chunks of PyTorch operations, any device).
        vocab_size: for ``[..., Vs]`` and ``[..., Vt]`` logits of different (padded) vocabularies,
            the number of leading entries both share: the entries past it are left out of both
            softmaxes (no mass) and get a zero gradient. Different sizes without it are an error.
        num_items_in_batch: Hugging Face's global count of target tokens under gradient
            accumulation (an int, or a one-element tensor used on its device without a host sync):
            the loss is the sum over the non-ignored rows divided by it (``reduction="mean"`` only).
        student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale: the final-logit
            transforms of the models that have them, applied inside the kernels in the order
            scale, soft-cap, temperature: ``z -> c * tanh(scale * z / c)`` (Gemma 2/3's
            ``final_logit_softcapping`` = c; Cohere's ``logit_scale``), the gradient through
            ``tanh``. A Hugging Face model's output logits already include them: pass these only for
            logits computed without them (``hidden @ lm_head.weight.T``).

    Returns a float32 (float64 for float64 inputs) loss. Gradients flow to the student logits, and to
    the teacher logits when they require grad; every backend computes them in the forward pass
    (one read of each logit when the row fits on chip, a second read otherwise) and backward only
    scales them, so no ``[N, V]`` float32 intermediate is ever allocated besides the gradients.
    """
    temperature, beta, _ = validate(student_logits, teacher_logits, labels, temperature, divergence, beta,
                                    ignore_index, reduction, backend, vocab_size=vocab_size, skew=skew)
    tf = transforms(student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale)
    return _fused(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, ce_weight=0.0, kd_weight=1.0,
                  op_name="softmax_kl", vocab_size=vocab_size, num_items_in_batch=num_items_in_batch, tf=tf,
                  skew=skew)


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                 temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", skew: float = 0.1,
                 vocab_size: Optional[int] = None, num_items_in_batch=None, student_softcap: Optional[float] = None,
                 teacher_softcap: Optional[float] = None, student_logit_scale: float = 1.0,
                 teacher_logit_scale: float = 1.0) -> Tensor:
    r"""Hinton's distillation loss, in the same single pass over the logits:

    ``alpha * CE(student_logits, labels) + (1 - alpha) * T**2 * D(teacher, student)``

    where the cross-entropy uses temperature 1, ``D`` is the divergence selected by
    ``divergence``/``beta`` at temperature ``T`` (see :func:`softmax_kl`), and the ``T**2`` factor
    keeps the soft-target gradients' scale independent of ``T``. Both terms come from one read of
    each student row. ``alpha > 0`` requires ``labels``; rows labelled ``ignore_index`` are skipped
    by both terms. ``vocab_size``, ``num_items_in_batch`` and the logit transforms are those of
    :func:`softmax_kl`; the cross-entropy sees the transformed student logits (those the model
    outputs) and its labels must lie below ``vocab_size``.
    """
    temperature, beta, alpha = validate(student_logits, teacher_logits, labels, temperature, divergence, beta,
                                        ignore_index, reduction, backend, alpha=alpha, vocab_size=vocab_size,
                                        skew=skew)
    tf = transforms(student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale)
    return _fused(student_logits, teacher_logits, labels, temperature=temperature, divergence=divergence, beta=beta,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, ce_weight=alpha,
                  kd_weight=(1.0 - alpha) * temperature * temperature, op_name="distill_loss", vocab_size=vocab_size,
                  num_items_in_batch=num_items_in_batch, tf=tf, skew=skew)
