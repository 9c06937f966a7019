"""TRL's generalized JSD loss (``trl.GKDTrainer.generalized_jsd_loss``) on the fused kernel.

Replace ``GKDTrainer.generalized_jsd_loss(...)`` by
``kdkernels.compat.trl.generalized_jsd_loss(...)`` with the same arguments. TRL's definition, kept
here exactly:

* logits are divided by ``temperature`` (no ``T**2`` factor);
* ``beta == 0``: ``KL(p_t || p_s)``; ``beta == 1``: ``KL(p_s || p_t)``; otherwise
  ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``;
* positions whose label is -100 are dropped;
* ``reduction``: ``"batchmean"`` divides the sum by the number of unmasked positions (at least 1)
  when ``labels`` are given, else by the size of the first dimension (the batch, for
  ``[batch, seq, vocab]`` logits); ``"sum"``; ``"mean"`` divides by the number of elements
  (positions × vocabulary); anything else returns the elementwise terms ``[..., V]`` (or
  ``[unmasked, V]`` with labels); ``num_items_in_batch``, when given, divides the sum by it
  whatever the reduction.

The loss has TRL's dtype (the logits' promoted dtype: bfloat16 for bfloat16 logits). Differences:
the fused kernel accumulates in float32 for bfloat16/float16 logits and rounds once at the end (TRL
computes in the input dtype), so results agree to the input dtype's precision rather than bit for
bit; the
elementwise (``"none"``) form materializes the ``[..., V]`` terms, as it must, in plain PyTorch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdkernels.softmax_divergence import softmax_kl

__all__ = ["generalized_jsd_loss"]



def _elementwise(student_logits, teacher_logits, labels, beta, temperature):
    # TRL's own computation; the elementwise output is [..., V] by definition
    s = F.log_softmax(student_logits / temperature, dim=-1)
    t = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype, device=s.device)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), dim=0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + \
            (1 - b) * F.kl_div(m, s, reduction="none", log_target=True)
    return jsd[labels != -100] if labels is not None else jsd


def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                         reduction="batchmean", num_items_in_batch=None):
    """TRL's ``GKDTrainer.generalized_jsd_loss``, fused (see the module docstring)."""
    if num_items_in_batch is None and reduction not in ("batchmean", "sum", "mean"):
        return _elementwise(student_logits, teacher_logits, labels, beta, temperature)
    # TRL computes in the logits' dtype, so its loss has their promoted dtype (bf16 for bf16 logits);
    # the sum here accumulates in float32 and is rounded to that dtype once, at the end
    out_dtype = torch.promote_types(student_logits.dtype, teacher_logits.dtype)
    total = softmax_kl(student_logits, teacher_logits, temperature=temperature, divergence="jsd", beta=float(beta),
                          labels=labels, ignore_index=-100, reduction="sum")
    if num_items_in_batch is not None:
        if isinstance(num_items_in_batch, torch.Tensor):
            num_items_in_batch = num_items_in_batch.to(total.device)
        return (total / num_items_in_batch).to(out_dtype)
    if reduction == "sum":
        return total.to(out_dtype)
    V = student_logits.shape[-1]
    if labels is not None:
        positions = (labels != -100).sum()
        if reduction == "batchmean":
            return (total / positions.clamp_min(1)).to(out_dtype)
        return (total / (positions * V)).to(out_dtype)  # mean over the elements of jsd[mask] (NaN when empty)
    if reduction == "batchmean":
        return (total / max(student_logits.shape[0], 1)).to(out_dtype)
    return (total / student_logits.numel()).to(out_dtype)
