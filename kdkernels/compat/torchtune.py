"""torchtune's knowledge-distillation losses (``torchtune.modules.loss``) on the fused kernels.

Replace ``from torchtune.modules.loss import ForwardKLLoss`` (and the others below) by
``from kdkernels.compat.torchtune import ForwardKLLoss``: same constructors, same ``forward``
arguments, same values. torchtune's definitions, per position with ``p = softmax(logits)``
(temperature 1, float32):

* ``ForwardKLLoss``: ``-sum_v p_t log p_s``, the soft cross-entropy, i.e. ``KL(p_t || p_s)`` plus
  the teacher's entropy ``H(p_t)`` (a constant for a frozen teacher: the student gradients are
  those of forward KL);
* ``ReverseKLLoss``: ``KL(p_s || p_t)``;
* ``SymmetricKLLoss(sym_kd_ratio)``: ``ratio * forward + (1 - ratio) * reverse``;

averaged over the positions whose label is not ``ignore_index`` (``normalize=True``; 0 when there
is none) or summed (``normalize=False``). The ``...WithChunkedOutputLoss`` forms take lists of
logits chunks along the sequence and divide the summed loss by the number of valid positions.

Where the result would differ: torchtune drops terms whose student (forward) or student or teacher
(reverse) logit is infinite. The fused kernels agree where both logits are ``-inf`` (a padded
vocabulary), but a finite teacher probability on a ``-inf`` student logit gives the true, infinite
divergence here. A teacher that requires grad gets torchtune's own gradient (the loss is then
computed in plain PyTorch, as torchtune does), since the soft cross-entropy's teacher gradient is
not forward KL's.
"""

from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F

from kdkernels._core.rows import rows3, take_rows
from kdkernels.softmax_divergence import softmax_kl

__all__ = ["ForwardKLLoss", "ReverseKLLoss", "SymmetricKLLoss", "ForwardKLWithChunkedOutputLoss",
           "ReverseKLWithChunkedOutputLoss", "SymmetricKLWithChunkedOutputLoss"]

_ENTROPY_ROWS = 256  # rows per chunk of the teacher-entropy computation


def _teacher_entropy_sum(teacher_logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """sum over valid rows of H(softmax(teacher)), in float32, chunked over rows (no [N, V] float32;
    the rows gathered from the strided logits, a chunk of a sequence is not copied whole)."""
    t = rows3(teacher_logits)
    keep = valid.reshape(-1).nonzero().squeeze(1)
    total = torch.zeros((), dtype=torch.float32, device=t.device)
    with torch.no_grad():
        for i in range(0, keep.numel(), _ENTROPY_ROWS):
            lt = F.log_softmax(take_rows(t, keep[i:i + _ENTROPY_ROWS]).float(), dim=-1)
            total += -(torch.where(lt > -float("inf"), lt.exp() * lt, torch.zeros_like(lt))).sum()
    return total


def _summed(kind: str, student_logits, teacher_logits, labels, ignore_index):
    """(sum over valid positions of the loss, number of valid positions)."""
    V = student_logits.shape[-1]
    lab = labels.reshape(student_logits.shape[:-1])
    valid = lab != ignore_index
    if teacher_logits.requires_grad and kind == "forward" and torch.is_grad_enabled():
        s, t = student_logits.reshape(-1, V), teacher_logits.reshape(-1, V)
        valid = valid.reshape(-1)
        # torchtune's teacher gradient is the soft cross-entropy's: compute it its way
        tp = F.softmax(t, dim=-1, dtype=torch.float32)
        x = torch.masked_fill(tp * F.log_softmax(s, dim=-1, dtype=torch.float32), torch.isinf(s), 0).sum(-1)
        return -(x * valid).sum(), valid.sum()
    # the logits as given (a chunk of the sequence is a strided view: read in place, not copied);
    # torchtune computes in float32 whatever the logits' dtype, so its loss is float32
    total = softmax_kl(student_logits, teacher_logits, divergence=kind, labels=lab, ignore_index=ignore_index,
                          reduction="sum").to(torch.float32)
    if kind == "forward":
        total = total + _teacher_entropy_sum(teacher_logits, valid)
    return total, valid.sum()


def _mean(total, count, device):
    if int(count) == 0:
        return torch.tensor(0.0, device=device)
    return total / count


class _KD(torch.nn.Module):
    kind = "forward"

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        self.ignore_index = ignore_index

    def _sum(self, student_logits, teacher_logits, labels):
        return _summed(self.kind, student_logits, teacher_logits, labels, self.ignore_index)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                normalize: bool = True) -> torch.Tensor:
        total, count = self._sum(student_logits, teacher_logits, labels)
        if not normalize:
            return total
        return _mean(total, count, student_logits.device)


class ForwardKLLoss(_KD):
    """torchtune's ``ForwardKLLoss``: the soft cross-entropy ``-sum p_t log p_s`` per valid position."""

    kind = "forward"


class ReverseKLLoss(_KD):
    """torchtune's ``ReverseKLLoss``: ``KL(p_s || p_t)`` per valid position."""

    kind = "reverse"


class SymmetricKLLoss(_KD):
    """torchtune's ``SymmetricKLLoss``: ``sym_kd_ratio * forward + (1 - sym_kd_ratio) * reverse``."""

    def __init__(self, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__(ignore_index)
        if sym_kd_ratio < 0.0 or sym_kd_ratio > 1.0:
            raise ValueError("sym_kd_ratio must be in the range [0, 1]")
        self.sym_kd_ratio = sym_kd_ratio

    def _sum(self, student_logits, teacher_logits, labels):
        f, count = _summed("forward", student_logits, teacher_logits, labels, self.ignore_index)
        r, _ = _summed("reverse", student_logits, teacher_logits, labels, self.ignore_index)
        return self.sym_kd_ratio * f + (1 - self.sym_kd_ratio) * r, count


class _Chunked(torch.nn.Module):
    inner = ForwardKLLoss

    def __init__(self, num_output_chunks: int = 8, ignore_index: int = -100, **inner_kwargs):
        super().__init__()
        self.num_output_chunks = num_output_chunks
        self.ignore_index = ignore_index
        self.loss = self.inner(ignore_index=ignore_index, **inner_kwargs)

    def forward(self, student_logits: List[torch.Tensor], teacher_logits: List[torch.Tensor],
                labels: torch.Tensor) -> torch.Tensor:
        label_chunks = labels.chunk(self.num_output_chunks, dim=1)
        total = 0.0
        for s, t, lab in zip(student_logits, teacher_logits, label_chunks):
            total = total + self.loss._sum(s, t, lab)[0]
        count = (labels != self.ignore_index).sum()
        return _mean(total, count, student_logits[0].device)


class ForwardKLWithChunkedOutputLoss(_Chunked):
    """torchtune's ``ForwardKLWithChunkedOutputLoss``: logits as lists of sequence chunks."""

    inner = ForwardKLLoss


class ReverseKLWithChunkedOutputLoss(_Chunked):
    """torchtune's ``ReverseKLWithChunkedOutputLoss``."""

    inner = ReverseKLLoss


class SymmetricKLWithChunkedOutputLoss(_Chunked):
    """torchtune's ``SymmetricKLWithChunkedOutputLoss``."""

    inner = SymmetricKLLoss

    def __init__(self, num_output_chunks: int = 8, sym_kd_ratio: float = 0.5, ignore_index: int = -100):
        super().__init__(num_output_chunks, ignore_index, sym_kd_ratio=sym_kd_ratio)
        self.sym_kd_ratio = sym_kd_ratio
