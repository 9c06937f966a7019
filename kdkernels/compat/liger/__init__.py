"""Liger-Kernel's distillation losses with the same names, constructors, signatures, values,
gradients and loss dtypes (Liger-Kernel 0.8.5), on the kdkernels kernels (which also run on the
CPU; Liger's Triton losses need CUDA). Change ``liger_kernel.transformers`` to
``kdkernels.compat.liger`` and ``liger_kernel.chunked_loss`` to ``kdkernels.compat.liger.chunked_loss``.

* ``LigerJSD`` / ``liger_jsd(input, target, shift_labels, beta, ignore_index)``: the generalized
  JSD of the student's log-probabilities ``input`` (``log q``) and the teacher's ``target``
  (``log p``), ``[BT, V]`` (any ``[..., V]`` here), summed and divided by the number of positions
  whose label is not ``ignore_index`` (all rows without labels). Pointwise in the numbers given, as
  Liger's kernel: the gradient is the derivative with respect to those log-probabilities (the
  formulas in :mod:`kdkernels.kl_div`), not a gradient of logits, so it is right whether or not
  a ``log_softmax`` comes first. No gradient to ``target``. The loss has ``input``'s dtype.
  Difference: a zero probability (``-inf`` log-probability) contributes 0 here; Liger's kernel
  multiplies it by an infinite log ratio and returns NaN.
* ``LigerKLDIVLoss`` / ``liger_kl_div(input, target, size_average, reduce, reduction, log_target,
  eps)``: ``torch.nn.KLDivLoss``'s reductions with Liger's ``t (log max(t, eps) - x)`` for a
  probability target (``e^t (t - x)`` for a log target); the loss (``[..., V]`` for
  ``reduction="none"``) is float32 for every input dtype, as Liger's kernel writes it. No gradient
  to ``target``. (``kdkernels.nn.KLDivLoss`` is the drop-in for torch's own class: torch's dtypes,
  no ``eps``.)
* ``LigerFusedLinearJSD`` / ``liger_fused_linear_jsd(student_input, student_weight, teacher_input,
  teacher_weight, shift_labels, jsd_beta, ignore_index, temperature, accum_dtype)``: ``liger_jsd`` of
  the log-softmaxes of ``x Wᵀ / T`` of student and teacher, from hidden states, on
  :func:`kdkernels.fused_linear_kl` (no ``[BT, V]`` logits). Gradients to the student's input and
  weight; float32 loss. ``accum_dtype`` is accepted: products always accumulate in float32 (float64
  for float64 inputs).
* ``LigerFusedLinearJSDLoss`` (re-exported from :mod:`kdkernels.compat.liger.chunked_loss`).

Every fused-linear entry point runs under ``torch.autocast`` (its matmul operands in autocast's
dtype, the products accumulated in float32), as Liger's do.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels import nn as knn
from kdkernels._core import checks
from kdkernels._core.numerics import acc_dtype
from kdkernels.compat.liger import chunked_loss
from kdkernels.compat.liger.chunked_loss import LigerFusedLinearJSDLoss
from kdkernels.fused_linear import fused_linear_distill, validate_fused_linear
from kdkernels.kl_div import kl_div_sum, logprob_jsd_sum

__all__ = ["LigerFusedLinearJSDLoss", "LigerFusedLinearJSD", "LigerJSD", "LigerKLDIVLoss", "liger_jsd",
           "liger_kl_div", "liger_fused_linear_jsd", "chunked_loss"]


def _check_pair(name_a: str, a, name_b: str, b) -> None:
    for name, x in ((name_a, a), (name_b, b)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if a.shape != b.shape:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")


def liger_jsd(input: Tensor, target: Tensor, shift_labels: Optional[Tensor] = None, beta: float = 0.5,
              ignore_index: int = -100) -> Tensor:
    """``liger_kernel.transformers.functional.liger_jsd``: see the module docstring."""
    _check_pair("input", input, "target", target)
    if input.dim() == 0 or input.shape[-1] == 0:
        raise ValueError(f"input must be [..., V] log-probabilities with V > 0, got shape {tuple(input.shape)}")
    beta = checks.scalar("beta", beta, 0.0, 1.0)
    acc = acc_dtype(input)
    keep = None
    if shift_labels is not None:
        if not isinstance(shift_labels, Tensor) or shift_labels.dtype.is_floating_point:
            raise TypeError("shift_labels must be an integer tensor")
        if shift_labels.shape != input.shape[:-1]:
            raise ValueError(f"shift_labels must be {tuple(input.shape[:-1])} (input's leading shape), got "
                             f"{tuple(shift_labels.shape)}")
        keep = shift_labels != ignore_index
        n = keep.sum().clamp_min(1).to(acc)
    else:
        n = torch.tensor(max(1, input[..., 0].numel()), dtype=acc, device=input.device)
    return logprob_jsd_sum(input, target, beta=beta, scale=n.reciprocal(), keep=keep)


class LigerJSD(torch.nn.Module):
    """``liger_kernel.transformers.LigerJSD(beta, ignore_index)``: ``forward(log_q, log_p, shift_labels=None)``."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, log_q: Tensor, log_p: Tensor, shift_labels: Optional[torch.LongTensor] = None) -> Tensor:
        return liger_jsd(log_q, log_p, shift_labels, self.beta, self.ignore_index)


_KL_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def liger_kl_div(input: Tensor, target: Tensor, size_average: bool = True, reduce: bool = True,
                 reduction: str = "mean", log_target: bool = False, eps: float = 1e-10) -> Tensor:
    """``liger_kernel.transformers.functional.liger_kl_div``: see the module docstring
    (``size_average`` and ``reduce`` are placeholders there too)."""
    _check_pair("input", input, "target", target)
    if reduction not in _KL_REDUCTIONS:
        raise ValueError(f"reduction must be one of {_KL_REDUCTIONS}, got {reduction!r}")
    target = target.detach()
    if reduction == "none":  # the pointwise terms are the output: [..., V] in float32, as Liger's
        x, t = input.float(), target.float()
        return t.exp() * (t - x) if log_target else t * (t.clamp_min(eps).log() - x)
    if reduction == "sum":
        scale = 1.0
    elif reduction == "mean":
        scale = 1.0 / max(1, input.numel())
    else:  # batchmean: the sum over input.size(0)
        scale = 1.0 / input.shape[0] if input.dim() and input.shape[0] else float("nan")
    return kl_div_sum(input, target, scale=scale, log_target=log_target, eps=None if log_target else eps,
                      out_dtype=torch.float32)


class LigerKLDIVLoss(knn.KLDivLoss):
    """``liger_kernel.transformers.LigerKLDIVLoss(eps=1e-10, reduction=..., log_target=...)``."""

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, y_pred: Tensor, y_true: Tensor) -> Tensor:
        return liger_kl_div(y_pred, y_true, reduction=self.reduction, log_target=self.log_target, eps=self.eps)


def liger_fused_linear_jsd(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                           teacher_weight: Tensor, shift_labels: Optional[Tensor] = None, jsd_beta: float = 0.5,
                           ignore_index: int = -100, temperature: float = 1.0,
                           accum_dtype: Optional[torch.dtype] = None) -> Tensor:
    """``liger_kernel.transformers.functional.liger_fused_linear_jsd``: see the module docstring."""
    validate_fused_linear(student_input, student_weight, teacher_input, teacher_weight, None, None, None, shift_labels,
                          temperature, "jsd", float(jsd_beta), 0.0, ignore_index, "mean", "auto")
    loss = fused_linear_distill(student_input, student_weight, None, teacher_input.detach(), teacher_weight.detach(),
                                None, None, shift_labels, temperature=temperature, divergence="jsd",
                                beta=float(jsd_beta), ignore_index=ignore_index, reduction="mean", ce_weight=0.0,
                                kd_weight=1.0)
    return loss.to(torch.float32)


class LigerFusedLinearJSD(torch.nn.Module):
    """``liger_kernel.transformers.LigerFusedLinearJSD``: JSD_beta at temperature T from hidden states."""

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.jsd_beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature
        self.accum_dtype = accum_dtype  # accumulation is always float32 (float64 for float64 inputs)

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                shift_labels: Optional[torch.LongTensor] = None) -> Tensor:
        return liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, shift_labels,
                                      self.jsd_beta, self.ignore_index, self.temperature, self.accum_dtype)
