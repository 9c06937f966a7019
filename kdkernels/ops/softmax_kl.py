"""The softmax-KL custom op ``kdkernels::softmax_kl`` and its autograd.

The op returns the reduced loss together with the input gradients, which every backend computes
in the same pass as the loss (pre-scaled by ``grad_scale``: ``1/rows`` for a mean). Backward
therefore only scales those gradients by ``grad_output``, and hands them back untouched when
``grad_output`` is 1 (``loss.backward()`` on the loss itself), so the peak extra memory of a
training step is the gradient buffer plus O(rows).

Registered with ``torch.library.custom_op`` (opaque to ``torch.compile``, with a fake
implementation for tracing), so a compiled model calls the fused kernel instead of tracing into it.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
from torch import Tensor

from kdkernels import _ext
from kdkernels.ops.rows import row_count

KIND_IDS = {"forward": 0, "reverse": 1, "jsd": 2}
REDUCTION_IDS = {"none": 0, "sum": 1, "mean": 2, "batchmean": 2}  # the op sums rows times grad_scale


def launch(backend: str, student: Tensor, teacher: Tensor, labels: Optional[Tensor], grad_scale: Tensor, *,
           temperature: float, kind: int, beta: float, ignore_index: int, ce_weight: float, kd_weight: float,
           need_grad_student: bool, need_grad_teacher: bool):
    """Run one backend's kernel on ``[N, V]`` or ``[B, L, V]`` rows (:mod:`kdkernels.ops.rows`; the
    two may be laid out differently but hold the same N rows): ``(loss_rows [N], grad_student
    [N, V] | None, grad_teacher [N, V] | None)``, the gradients contiguous."""
    kwargs = dict(temperature=temperature, kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight,
                  kd_weight=kd_weight, need_grad_student=need_grad_student, need_grad_teacher=need_grad_teacher)
    if backend == "cpu":
        return _ext.require("softmax_kl(backend='cpu')").softmax_kl_forward_cpu(student, teacher, labels,
                                                                              grad_scale, **kwargs)
    if backend == "triton":
        from kdkernels.triton.softmax_kl import softmax_kl_forward

        return softmax_kl_forward(student, teacher, labels, grad_scale, **kwargs)
    if backend == "cuda":
        C = _ext.require("softmax_kl(backend='cuda')")
        rows, grad_s, grad_t, _plan = C.softmax_kl_forward_cuda(student, teacher, labels, grad_scale, **kwargs,
                                                                **cuda_plan_override())
        return rows, grad_s, grad_t
    raise ValueError(f"no fused softmax_kl kernel for backend {backend!r}")


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


@torch.library.custom_op("kdkernels::softmax_kl", mutates_args=())
def softmax_kl_op(student: Tensor, teacher: Tensor, labels: Optional[Tensor], grad_scale: Tensor,
                  temperature: float, kind: int, beta: float, ignore_index: int, ce_weight: float,
                  kd_weight: float, reduction: int, need_grad_student: bool, need_grad_teacher: bool,
                  backend: str) -> Tuple[Tensor, Tensor, Tensor]:
    rows, grad_s, grad_t = launch(backend, student, teacher, labels, grad_scale, temperature=temperature,
                                  kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight,
                                  kd_weight=kd_weight, need_grad_student=need_grad_student,
                                  need_grad_teacher=need_grad_teacher)
    loss = rows if reduction == 0 else rows.sum() * grad_scale.to(rows.dtype)
    # the kernels write [N, V] contiguous gradients: the inputs' row shapes, contiguous (a view);
    # custom ops cannot return None: an absent gradient is an empty tensor
    return (loss, grad_s.view(student.shape) if grad_s is not None else student.new_empty(0),
            grad_t.view(teacher.shape) if grad_t is not None else teacher.new_empty(0))


@softmax_kl_op.register_fake
def _(student, teacher, labels, grad_scale, temperature, kind, beta, ignore_index, ce_weight, kd_weight,
      reduction, need_grad_student, need_grad_teacher, backend):
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss = student.new_empty((row_count(student),) if reduction == 0 else (), dtype=acc)
    grad_s = torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad_student \
        else student.new_empty(0)
    grad_t = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_grad_teacher \
        else teacher.new_empty(0)
    return loss, grad_s, grad_t


def _setup_context(ctx, inputs, output):
    _, grad_s, grad_t = output
    # the gradient outputs are never differentiated: don't let autograd build [N, V] zeros for them
    ctx.set_materialize_grads(False)
    ctx.reduction = inputs[10]
    ctx.save_for_backward(grad_s if inputs[11] else None, grad_t if inputs[12] else None)


def _is_one(grad_output: Tensor) -> bool:
    """True when grad_output is exactly 1 and we are running eagerly (never while tracing)."""
    if torch.compiler.is_compiling() or type(grad_output) is not torch.Tensor:
        return False
    return grad_output.numel() == 1 and bool(grad_output.item() == 1.0)


def _backward(ctx, grad_loss, _unused_gs, _unused_gt):
    grad_s, grad_t = ctx.saved_tensors

    def scale(g):
        if g is None or grad_loss is None:
            return None
        if ctx.reduction == 0:  # per-row losses: one grad_output per row
            return g * grad_loss.unsqueeze(-1).to(g.dtype)
        if _is_one(grad_loss):  # loss.backward(): the saved gradient is the answer
            return g
        return g * grad_loss.to(g.dtype)

    return (scale(grad_s), scale(grad_t)) + (None,) * 12


softmax_kl_op.register_autograd(_backward, setup_context=_setup_context)
