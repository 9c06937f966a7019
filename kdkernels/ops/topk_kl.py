"""The top-k teacher KL custom op ``kdkernels::topk_kl`` and its autograd.

The teacher is given by its top-k values (log-probabilities or logits) and indices per row, as
distillation pipelines store it offline; the loss is forward ``KL(p_t || p_s)`` with the teacher
distribution of :func:`kdkernels.reference.topk_teacher_log_probs`. The C++ kernel
(csrc/cpu/topk_kl.cpp) and the Triton kernel (kdkernels/triton/topk_kl.py) read each student row
twice (normalizer, gradient) and the teacher's k entries; the gradient is computed in the forward pass and backward only scales it, as in
:mod:`kdkernels.ops.softmax_kl`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from kdkernels import _ext, reference
from kdkernels.ops.rows import row_count
from kdkernels.ops.softmax_kl import _is_one


@torch.library.custom_op("kdkernels::topk_kl", mutates_args=())
def topk_kl_op(student: Tensor, values: Tensor, indices: Tensor, labels: Optional[Tensor], grad_scale: Tensor,
               values_are_logits: bool, uniform_tail: bool, temperature: float, ignore_index: int, reduction: int,
               need_grad: bool, backend: str) -> Tuple[Tensor, Tensor]:
    shape = student.shape  # [N, V] or [B, L, V] rows (kdkernels.ops.rows)
    if backend == "cpu":
        C = _ext.require("topk_kl(backend='cpu')")
        rows, grad = C.topk_kl_forward_cpu(student, values, indices, labels, grad_scale, values_are_logits,
                                           uniform_tail, temperature, ignore_index, need_grad)
    elif backend == "triton":
        from kdkernels.triton.topk_kl import topk_kl_forward

        rows, grad = topk_kl_forward(student, values, indices, labels, grad_scale, values_are_logits=values_are_logits,
                                     uniform_tail=uniform_tail, temperature=temperature, ignore_index=ignore_index,
                                     need_grad=need_grad)
    elif backend == "torch":
        # the reference, materialized in float64 (a uniform tail over a large V loses float32 digits);
        # its gradient g (p_s - p_t) / T written out
        out_dtype = student.dtype
        student, values = student.reshape(-1, student.shape[-1]).double(), values.double()
        kw = dict(values_kind="logits" if values_are_logits else "logprobs",
                  tail="uniform" if uniform_tail else "ignore", temperature=temperature)
        rows = reference.topk_kl(student, values, indices, values=kw["values_kind"], tail=kw["tail"],
                                 temperature=temperature, labels=labels, ignore_index=ignore_index, reduction="none")
        rows = rows.to(torch.float64 if out_dtype == torch.float64 else torch.float32)
        grad = None
        if need_grad:
            log_pt = reference.topk_teacher_log_probs(values, indices, student.shape[-1], **kw)
            ps = torch.softmax(student.to(log_pt.dtype) / temperature, dim=-1)
            g = (ps - log_pt.exp()) * (grad_scale.to(log_pt.dtype) / temperature)
            if labels is not None:
                g = torch.where((labels != ignore_index).unsqueeze(-1), g, torch.zeros_like(g))
            grad = g.to(out_dtype)
    else:
        raise ValueError(f"no topk_kl kernel for backend {backend!r}")
    loss = rows if reduction == 0 else rows.sum() * grad_scale.to(rows.dtype)
    # the kernels write [N, V] contiguous gradients: the student's row shape, contiguous (a view)
    return loss, grad.view(shape) if grad is not None else student.new_empty(0)


@topk_kl_op.register_fake
def _(student, values, indices, labels, grad_scale, values_are_logits, uniform_tail, temperature, ignore_index,
      reduction, need_grad, backend):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((row_count(student),) if reduction == 0 else (), dtype=acc)
    grad = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad else student.new_empty(0)
    return loss, grad


def _setup_context(ctx, inputs, output):
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[9]
    ctx.save_for_backward(output[1] if inputs[10] else None)


def _backward(ctx, grad_loss, _unused):
    (g,) = ctx.saved_tensors
    if g is None or grad_loss is None:
        out = None
    elif ctx.reduction == 0:
        out = g * grad_loss.unsqueeze(-1).to(g.dtype)
    elif _is_one(grad_loss):
        out = g
    else:
        out = g * grad_loss.to(g.dtype)
    return (out,) + (None,) * 11


topk_kl_op.register_autograd(_backward, setup_context=_setup_context)
