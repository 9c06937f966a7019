"""``liger_kernel.chunked_loss``'s distillation loss on :func:`kdkernels.fused_linear_kl`:
``LigerFusedLinearJSDLoss`` and its function ``liger_fused_linear_jsd`` (the
``LigerFusedLinearJSDFunction.apply`` of ``liger_kernel.chunked_loss.functional``).

Liger-Kernel 0.8.5's definition, kept here: ``weight_hard_loss * CE + weight_soft_loss *
JSD_beta(T)``, each summed over the positions whose label is not ``ignore_index`` and divided by
their number (at least one); the CE is at temperature 1 over the student's own vocabulary, the JSD
at ``T`` with no ``T**2`` factor; a student vocabulary smaller than the teacher's is padded with
zero logits for the JSD. Gradients go to the student's input, weight and bias; the teacher is
treated as frozen (no gradient, as in Liger). The loss (and, with ``return_soft_hard_loss``, its
two parts) is a float32 scalar for every input dtype (Liger accumulates it in a default-dtype
zero). Differences: no ``[tokens, V]`` logits are formed, not even per chunk of rows
(``compiled`` and ``chunk_size`` are accepted and have no effect); logits are computed from the
operands in float32 (under autocast: from operands in autocast's dtype), never rounded to a
16-bit dtype, so results agree with Liger's to the inputs' precision.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels.fused_linear import fused_linear_distill, validate_fused_linear

__all__ = ["LigerFusedLinearJSDLoss", "liger_fused_linear_jsd"]


def _pad_student(weight: Tensor, bias: Optional[Tensor], teacher_vocab: int):
    """Zero rows (and zero bias) for the teacher's extra vocabulary entries: zero student logits."""
    extra = teacher_vocab - weight.shape[0]
    if extra <= 0:
        return weight, bias
    weight = torch.cat([weight, weight.new_zeros(extra, weight.shape[1])])
    if bias is not None:
        bias = torch.cat([bias, bias.new_zeros(extra)])
    return weight, bias


def _loss(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias,
          ce_weight, kd_weight, *, beta, ignore_index, temperature):
    Vs, Vt = student_weight.shape[0], teacher_weight.shape[0]
    if Vs > Vt:
        raise ValueError(f"the student's vocabulary ({Vs}) is larger than the teacher's ({Vt})")
    teacher = (teacher_input.detach(), teacher_weight.detach(), None if teacher_bias is None else teacher_bias.detach())
    common = dict(temperature=temperature, divergence="jsd", beta=float(beta), ignore_index=ignore_index,
                  reduction="mean")
    if Vs == Vt or ce_weight == 0:
        weight, bias = _pad_student(student_weight, student_bias, Vt)
        validate_fused_linear(student_input, weight, teacher[0], teacher[1], None, bias, teacher[2], true_labels,
                              temperature, "jsd", float(beta), 0.0, ignore_index, "mean", "auto")
        return fused_linear_distill(student_input, weight, bias, *teacher, None, true_labels, ce_weight=ce_weight,
                                    kd_weight=kd_weight, **common)
    # a padded student: the CE is over the student's own vocabulary, the JSD over the padded one
    hard = fused_linear_distill(student_input, student_weight, student_bias, student_input.detach(),
                                student_weight.detach(), None, None, true_labels, ce_weight=1.0, kd_weight=0.0,
                                **common)
    soft = _loss(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                 teacher_bias, 0.0, 1.0, beta=beta, ignore_index=ignore_index, temperature=temperature)
    return ce_weight * hard + kd_weight * soft


def liger_fused_linear_jsd(student_input: Tensor, student_weight: Tensor, teacher_input: Tensor,
                           teacher_weight: Tensor, true_labels: Tensor, student_bias: Optional[Tensor] = None,
                           teacher_bias: Optional[Tensor] = None, weight_hard_loss: float = 0.5,
                           weight_soft_loss: float = 0.5, beta: float = 0.5, ignore_index: int = -100,
                           temperature: float = 1.0, compiled: bool = True, chunk_size: int = 1024,
                           return_soft_hard_loss: bool = False):
    """``liger_kernel.chunked_loss.functional.liger_fused_linear_jsd`` (the same positional
    arguments; the biases may be omitted): the loss, or ``(loss, soft, hard)``, float32."""
    if temperature == 0:
        raise ValueError("temperature must be non-zero")
    args = (student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias, teacher_bias)
    kw = dict(beta=beta, ignore_index=ignore_index, temperature=temperature)
    out_dtype = torch.get_default_dtype()
    loss = _loss(*args, weight_hard_loss, weight_soft_loss, **kw).to(out_dtype)
    if not return_soft_hard_loss:
        return loss
    with torch.no_grad():  # the two parts, for logging (loss-only passes)
        soft = _loss(*args, 0.0, 1.0, **kw).to(out_dtype)
        hard = _loss(*args, 1.0, 0.0, **kw).to(out_dtype)
    return loss, soft, hard


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

    def forward(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
                true_labels: torch.LongTensor, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None):
        return liger_fused_linear_jsd(student_input, student_weight, teacher_input, teacher_weight, true_labels,
                                      student_bias, teacher_bias, self.weight_hard_loss, self.weight_soft_loss,
                                      self.beta, self.ignore_index, self.temperature, self.compiled, self.chunk_size,
                                      self.return_soft_hard_loss)
