"""Liger-Kernel's distillation losses with the same constructors, ``forward`` signatures and
results, on the kdkernels kernels (which also run on the CPU; Liger's Triton losses need CUDA):

* ``LigerFusedLinearJSDLoss`` (``liger_kernel.chunked_loss``): from hidden states and lm_head
  weights, ``weight_hard_loss * CE + weight_soft_loss * JSD_beta(T)``, each averaged over the
  positions whose label is not ``ignore_index`` (at least one), no ``T**2`` factor, gradients to
  the student's input, weight and bias (the teacher is treated as frozen). A student vocabulary
  smaller than the teacher's is padded with zero logits, as Liger does. Runs on
  :func:`kdkernels.fused_linear_kl`: no ``[tokens, V]`` logits, not even per chunk of rows
  (``compiled`` and ``chunk_size`` are accepted and have no effect).
* ``LigerFusedLinearJSD`` (``liger_kernel.transformers``): the same without the hard loss or biases.
* ``LigerJSD``: generalized JSD between student and teacher log-probabilities ``[BT, V]``, the sum
  over positions divided by the number of non-ignored positions. beta = 0 / 1 are forward / reverse KL.
* ``LigerKLDIVLoss``: ``torch.nn.KLDivLoss`` semantics (Liger adds ``eps`` as a floor under a
  non-log target inside the log, which changes a term only where the target is below ``eps``,
  1e-10 by default; here such a term is computed exactly).
"""

from __future__ import annotations

from typing import Optional

import torch

from kdkernels import functional as KF
from kdkernels import nn as knn

__all__ = ["LigerFusedLinearJSDLoss", "LigerFusedLinearJSD", "LigerJSD", "LigerKLDIVLoss"]



def _pad_student(weight: torch.Tensor, bias: Optional[torch.Tensor], teacher_vocab: int):
    """Zero rows (and zero bias) for the teacher's extra vocabulary entries: zero student logits."""
    extra = teacher_vocab - weight.shape[0]
    if extra <= 0:
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(extra)])
    return weight, bias


class LigerFusedLinearJSDLoss(torch.nn.Module):
    """``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` on :func:`kdkernels.fused_linear_kl`."""

    def __init__(self, weight_hard_loss: float = 0.5, weight_soft_loss: float = 0.5, beta: float = 0.5,
                 ignore_index: int = -100, temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                 return_soft_hard_loss: bool = False):
        super().__init__()
        if temperature == 0:
            raise ValueError("temperature must be non-zero")
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size = compiled, chunk_size
        self.return_soft_hard_loss = return_soft_hard_loss

    def _loss(self, student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
              teacher_bias, ce_weight, kd_weight):
        Vs, Vt = student_weight.shape[0], teacher_weight.shape[0]
        if Vs > Vt:
            raise ValueError(f"the student's vocabulary ({Vs}) is larger than the teacher's ({Vt})")
        teacher = (teacher_input.detach(), teacher_weight.detach(),
                   None if teacher_bias is None else teacher_bias.detach())
        common = dict(temperature=self.temperature, kind="jsd", beta=float(self.beta),
                      ignore_index=self.ignore_index, reduction="mean")
        if Vs == Vt or ce_weight == 0:
            weight, bias = _pad_student(student_weight, student_bias, Vt)
            KF._validate_fused_linear(student_input, weight, teacher[0], teacher[1], None, bias, teacher[2],
                                      true_labels, self.temperature, "jsd", float(self.beta), 0.0, self.ignore_index,
                                      "mean", "auto")
            return KF._fused_linear(student_input, weight, bias, *teacher, None, true_labels, ce_weight=ce_weight,
                                    kd_weight=kd_weight, **common)
        # a padded student: the CE is over the student's own vocabulary, the JSD over the padded one
        hard = KF._fused_linear(student_input, student_weight, student_bias, student_input.detach(),
                                student_weight.detach(), None, None, true_labels, ce_weight=1.0, kd_weight=0.0,
                                **common)
        soft = self._loss(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                          teacher_bias, 0.0, 1.0)
        return ce_weight * hard + kd_weight * soft

    def forward(self, student_input: torch.Tensor, student_weight: torch.Tensor, teacher_input: torch.Tensor,
                teacher_weight: torch.Tensor, true_labels: torch.LongTensor, student_bias: torch.Tensor = None,
                teacher_bias: torch.Tensor = None):
        args = (student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias)
        loss = self._loss(*args, self.weight_hard_loss, self.weight_soft_loss)
        if not self.return_soft_hard_loss:
            return loss
        with torch.no_grad():  # the two parts, for logging (loss-only passes)
            soft = self._loss(*args, 0.0, 1.0)
            hard = self._loss(*args, 1.0, 0.0)
        return loss, soft, hard


class LigerFusedLinearJSD(torch.nn.Module):
    """``liger_kernel.transformers.LigerFusedLinearJSD``: JSD_beta at temperature T from hidden states."""

    def __init__(self, jsd_beta: float = 0.5, ignore_index: int = -100, temperature: float = 1.0,
                 accum_dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.jsd_beta, self.ignore_index, self.temperature = jsd_beta, ignore_index, temperature
        self.accum_dtype = accum_dtype  # accumulation is always float32 (float64 for float64 inputs)

    def forward(self, student_input, student_weight, teacher_input, teacher_weight, shift_labels=None):
        return KF._fused_linear(student_input, student_weight, None, teacher_input.detach(), teacher_weight.detach(),
                                None, None, shift_labels, temperature=self.temperature, kind="jsd", beta=float(self.jsd_beta),
                                ignore_index=self.ignore_index, reduction="mean", ce_weight=0.0, kd_weight=1.0)


class LigerJSD(torch.nn.Module):
    """``liger_kernel.transformers.LigerJSD``: ``log_q`` student and ``log_p`` teacher log-probabilities."""

    def __init__(self, beta: float = 0.5, ignore_index: int = -100):
        super().__init__()
        self.beta, self.ignore_index = beta, ignore_index

    def forward(self, log_q: torch.Tensor, log_p: torch.Tensor, shift_labels: Optional[torch.LongTensor] = None):
        # log-probabilities are their own log-softmax: the fused kernel at T = 1 sees the same distributions
        return KF.softmax_kl(log_q, log_p, kind="jsd", beta=float(self.beta), labels=shift_labels,
                             ignore_index=self.ignore_index, reduction="mean")


class LigerKLDIVLoss(knn.KLDivLoss):
    """``liger_kernel.transformers.LigerKLDIVLoss(eps=1e-10, reduction=..., log_target=...)``."""

    def __init__(self, eps: float = 1e-10, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.eps = eps
