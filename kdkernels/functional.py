"""The public functions of kdkernels: validate the inputs, pick a backend, call the fused op."""

from __future__ import annotations

import math
from numbers import Real
from typing import Optional

import torch
from torch import Tensor

from kdkernels import _backend, _ext, reference
from kdkernels.ops.rows import rows3
from kdkernels.ops.softmax_kl import KIND_IDS, REDUCTION_IDS, softmax_kl_op

__all__ = ["softmax_kl", "distill_loss", "fused_linear_kl", "topk_kl", "fused_linear_topk_kl", "info_nce",
           "similarity_kd", "projected_feature_loss", "available_backends"]

available_backends = _backend.available_backends

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_REDUCTIONS = ("none", "sum", "mean", "batchmean")


def _check_logits(name: str, x) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64 logits, got {x.dtype}")
    if x.dim() == 0:
        raise ValueError(f"{name} must have a vocabulary dimension [..., V], got a 0-d tensor")


def _check_scalar(name: str, value, lo: float, hi: float, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if not math.isfinite(v) or v < lo or v > hi or (lo_open and v == lo):
        bracket = "(" if lo_open else "["
        raise ValueError(f"{name} must be in {bracket}{lo}, {hi}], got {value!r}")
    return v


def _validate(student_logits, teacher_logits, labels, temperature, kind, beta, ignore_index, reduction,
              backend, alpha=0.0):
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student_logits and teacher_logits must have the same shape, got "
                         f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}")
    if student_logits.device != teacher_logits.device:
        raise ValueError(f"student_logits and teacher_logits must be on the same device, got "
                         f"{student_logits.device} and {teacher_logits.device}")
    V = student_logits.shape[-1]
    if V == 0:
        raise ValueError("student_logits and teacher_logits have an empty vocabulary (last) dimension: V = 0")
    temperature = _check_scalar("temperature", temperature, 0.0, math.inf, lo_open=True)
    beta = _check_scalar("beta", beta, 0.0, 1.0)
    alpha = _check_scalar("alpha", alpha, 0.0, 1.0)
    if kind not in KIND_IDS:
        raise ValueError(f"kind must be one of {tuple(KIND_IDS)}, got {kind!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if backend not in _backend.BACKENDS:
        raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if labels is not None:
        if not isinstance(labels, Tensor):
            raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if labels.shape != student_logits.shape[:-1]:
            raise ValueError(f"labels must have the logits' leading shape {tuple(student_logits.shape[:-1])}, "
                             f"got {tuple(labels.shape)}")
        if labels.device != student_logits.device:
            raise ValueError(f"labels must be on the logits' device {student_logits.device}, got {labels.device}")
        if labels.numel() and not torch.compiler.is_compiling():
            bad = (labels != ignore_index) & ((labels < 0) | (labels >= V))
            if bool(bad.any()):
                first = labels[bad].flatten()[0].item()
                raise ValueError(f"labels must be in [0, {V}) or equal ignore_index={ignore_index}, got {first}")
    elif alpha > 0:
        raise ValueError("alpha > 0 mixes in the hard-label cross-entropy: labels are required")
    return temperature, beta, alpha


def _kind_id(kind: str, beta: float) -> int:
    """The kernel's kind: the generalized JSD at beta 0 and 1 is forward and reverse KL."""
    kind_id = KIND_IDS[kind]
    if kind_id == 2 and beta == 0.0:
        return 0
    if kind_id == 2 and beta == 1.0:
        return 1
    return kind_id


def _batch_size(shape) -> int:
    """``input.size(0)`` of logits of this shape, the divisor of PyTorch's ``"batchmean"``: the
    first leading dimension (the batch of ``[B, L, V]`` logits), or ``V`` for a single ``[V]`` row
    (as ``F.kl_div`` divides a 1-D input's sum by its length)."""
    return int(shape[0])


def _grad_scale(N: int, labels: Optional[Tensor], ignore_index: int, reduction: str, dtype, device,
                batch: Optional[int] = None) -> Tensor:
    """The gradient scale of a reduction over rows: 1 / (non-ignored rows) for ``"mean"``,
    1 / ``batch`` (the logits' ``size(0)``, :func:`_batch_size`) for ``"batchmean"`` (NaN for an
    empty batch, as ``F.kl_div`` gives), else 1."""
    if reduction == "batchmean":
        if batch is None:
            raise ValueError("reduction='batchmean' needs the logits' size(0)")
        return torch.full((), 1.0 / batch if batch else math.nan, dtype=dtype, device=device)
    if reduction != "mean":
        return torch.ones((), dtype=dtype, device=device)
    if labels is None:
        return torch.full((), 1.0 / max(N, 1), dtype=dtype, device=device)
    return (labels != ignore_index).sum().clamp_min(1).to(dtype).reciprocal().reshape(())


def _fused(student_logits, teacher_logits, labels, *, temperature, kind, beta, ignore_index, reduction, backend,
           ce_weight, kd_weight, op_name):
    device = student_logits.device
    name = _backend.resolve(backend, device, op_name)
    red = reduction
    batch = _batch_size(student_logits.shape)
    if name == "torch":
        rows = reference.softmax_kl_rows(student_logits, teacher_logits, labels, temperature=temperature,
                                         kind=kind, beta=beta, ignore_index=ignore_index, ce_weight=ce_weight,
                                         kd_weight=kd_weight)
        return reference.reduce_rows(rows, labels, ignore_index, red, batch=batch)

    lead = student_logits.shape[:-1]
    # rows read through their strides: a view such as logits[:, :-1] (the causal shift) is not copied
    s2, t2 = rows3(student_logits), rows3(teacher_logits)
    if (s2.dtype == torch.float64) != (t2.dtype == torch.float64):  # float64 pairs with float64 only
        s2, t2 = s2.double(), t2.double()
    N = s2.shape[0] * s2.shape[1]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)

    grad_scale = _grad_scale(N, lab, ignore_index, red, torch.float32, device, batch)
    kind_id = _kind_id(kind, beta)
    grad_on = torch.is_grad_enabled()
    loss, _, _ = softmax_kl_op(s2, t2, lab, grad_scale, temperature, kind_id, beta, ignore_index,
                               ce_weight, kd_weight, REDUCTION_IDS[red],
                               grad_on and student_logits.requires_grad, grad_on and teacher_logits.requires_grad,
                               name)
    return loss.reshape(lead) if red == "none" else loss


def softmax_kl(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
               kind: str = "forward", beta: float = 0.5, labels: Optional[Tensor] = None,
               ignore_index: int = -100, reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Divergence between the softmaxes of teacher and student logits, fused with its gradient.

    With ``p_s = softmax(student_logits / T)`` and ``p_t = softmax(teacher_logits / T)``, per row:

    * ``kind="forward"``: ``KL(p_t || p_s) = sum p_t (log p_t - log p_s)``; with
      ``reduction="batchmean"`` this is exactly
      ``F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")``;
    * ``kind="reverse"``: ``KL(p_s || p_t)``;
    * ``kind="jsd"``: the generalized Jensen-Shannon divergence
      ``beta * KL(p_t || m) + (1 - beta) * KL(p_s || m)`` with ``m = beta * p_t + (1 - beta) * p_s``;
      ``beta=0.5`` is the symmetric JSD. At ``beta=0`` and ``beta=1``, where that expression vanishes,
      the loss is forward and reverse KL (the convention of TRL's and Liger-Kernel's JSD losses).

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
            ``"cuda"``, or ``"torch"`` (plain PyTorch: the reference, which materializes the softmaxes).

    Returns a float32 (float64 for float64 inputs) loss. Gradients flow to the student logits, and to
    the teacher logits when they require grad; the fused backends compute them in the forward pass
    (one read of each logit when the row fits on chip, a second read otherwise) and backward only
    scales them, so no ``[N, V]`` float32 intermediate is ever allocated besides the gradients.
    """
    temperature, beta, _ = _validate(student_logits, teacher_logits, labels, temperature, kind, beta,
                                     ignore_index, reduction, backend)
    return _fused(student_logits, teacher_logits, labels, temperature=temperature, kind=kind, beta=beta,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, ce_weight=0.0, kd_weight=1.0,
                  op_name="softmax_kl")


def distill_loss(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                 temperature: float = 1.0, alpha: float = 0.0, kind: str = "forward", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Hinton's distillation loss, in the same single pass over the logits:

    ``alpha * CE(student_logits, labels) + (1 - alpha) * T**2 * D(teacher, student)``

    where the cross-entropy uses temperature 1, ``D`` is the divergence selected by ``kind``/``beta``
    at temperature ``T`` (see :func:`softmax_kl`), and the ``T**2`` factor keeps the soft-target
    gradients' scale independent of ``T``. Both terms come from one read of each student row.
    ``alpha > 0`` requires ``labels``; rows labelled ``ignore_index`` are skipped by both terms.
    """
    temperature, beta, alpha = _validate(student_logits, teacher_logits, labels, temperature, kind, beta,
                                         ignore_index, reduction, backend, alpha=alpha)
    return _fused(student_logits, teacher_logits, labels, temperature=temperature, kind=kind, beta=beta,
                  ignore_index=ignore_index, reduction=reduction, backend=backend, ce_weight=alpha,
                  kd_weight=(1.0 - alpha) * temperature * temperature, op_name="distill_loss")


# ------------------------------------------------------------------------------ fused-linear KL

def _check_float(name: str, x, dims: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")
    if dims is None and x.dim() == 0:
        raise ValueError(f"{name} must have a feature dimension [..., H], got a 0-d tensor")


def fused_linear_kl(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor] = None,
                    teacher_weight: Optional[Tensor] = None, *, teacher_logits: Optional[Tensor] = None,
                    student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                    temperature: float = 1.0, kind: str = "forward", beta: float = 0.5, alpha: float = 0.0,
                    labels: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                    backend: str = "auto") -> Tensor:
    r""":func:`distill_loss` on the logits ``student_hidden @ student_weight.T + student_bias`` and
    ``teacher_hidden @ teacher_weight.T + teacher_bias`` (or the given ``teacher_logits``), without
    ever forming a ``[N, V]`` logits tensor:

    ``alpha * CE(student, labels) + (1 - alpha) * T**2 * D(teacher, student)``

    The vocabulary is processed in tiles: a first pass keeps per-row online statistics, a second
    recomputes each logits tile and accumulates the gradients of the hidden states, weights and
    biases (of the teacher too, when its tensors require grad). Matmuls accumulate in float32
    (float64 for float64 inputs); logits are never rounded to the input dtype. Rows labelled
    ``ignore_index`` cost nothing. Peak extra memory: the gradients, O(rows) statistics and a few
    logits tiles, independent of V.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``; student_bias: ``[V]`` or None.
        teacher_hidden: ``[..., Ht]`` (the same leading shape); teacher_weight: ``[V, Ht]``;
            teacher_bias: ``[V]`` or None. Or instead ``teacher_logits``: ``[..., V]``.
        temperature, kind, beta, alpha, labels, ignore_index, reduction: as in :func:`distill_loss`.
        backend: ``"auto"`` (the C++ kernel on CPU tensors when the extension is built, the Triton
            kernels on CUDA tensors, else ``"torch"``), ``"cpu"``, ``"triton"`` (tensor-core ``tl.dot``
            tiles; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``), or ``"torch"`` (the same
            tiles in PyTorch operations; any device).
    """
    temperature, beta, alpha = _validate_fused_linear(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, student_bias, teacher_bias,
        labels, temperature, kind, beta, alpha, ignore_index, reduction, backend)
    return _fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                         teacher_logits, labels, temperature=temperature, kind=kind, beta=beta,
                         ignore_index=ignore_index, reduction=reduction, ce_weight=alpha,
                         kd_weight=(1.0 - alpha) * temperature * temperature, backend=backend)


def _check_student_linear(student_hidden, student_weight):
    """The student's ``[..., H]`` hidden states and ``[V, H]`` weight; returns (leading shape, V)."""
    _check_float("student_hidden", student_hidden)
    _check_float("student_weight", student_weight, 2)
    lead, H = student_hidden.shape[:-1], student_hidden.shape[-1]
    if student_weight.shape[1] != H:
        raise ValueError(f"student_weight must be [V, H] with H = {H} (student_hidden {tuple(student_hidden.shape)}), "
                         f"got {tuple(student_weight.shape)}")
    return lead, student_weight.shape[0]


def _check_bias(name, bias, V):
    if bias is not None:
        _check_float(name, bias, 1)
        if bias.shape[0] != V:
            raise ValueError(f"{name} must be [V] = [{V}], got {tuple(bias.shape)}")


def _validate_fused_linear(student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits,
                           student_bias, teacher_bias, labels, temperature, kind, beta, alpha, ignore_index,
                           reduction, backend, allow_empty_vocab=False):
    """The checks of :func:`fused_linear_kl`; returns (temperature, beta, alpha) as floats.
    ``allow_empty_vocab``: V = 0 is legal (a rank's empty vocabulary slice)."""
    lead, V = _check_student_linear(student_hidden, student_weight)
    if V == 0 and not allow_empty_vocab:
        raise ValueError("student_weight has an empty vocabulary: V = 0")
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("give either teacher_logits or teacher_hidden and teacher_weight (and teacher_bias), "
                             "not both")
        _check_float("teacher_logits", teacher_logits)
        if teacher_logits.shape != (*lead, V):
            raise ValueError(f"teacher_logits must be {(*lead, V)} (student_hidden's leading shape and V), got "
                             f"{tuple(teacher_logits.shape)}")
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is missing: give teacher_hidden and teacher_weight, or teacher_logits")
        _check_float("teacher_hidden", teacher_hidden)
        _check_float("teacher_weight", teacher_weight, 2)
        if teacher_hidden.shape[:-1] != lead:
            raise ValueError(f"teacher_hidden must have student_hidden's leading shape {tuple(lead)}, got "
                             f"{tuple(teacher_hidden.shape)}")
        if teacher_weight.shape != (V, teacher_hidden.shape[-1]):
            raise ValueError(f"teacher_weight must be [V, Ht] = {(V, teacher_hidden.shape[-1])} (V from "
                             f"student_weight, Ht from teacher_hidden), got {tuple(teacher_weight.shape)}")
    _check_bias("student_bias", student_bias, V)
    _check_bias("teacher_bias", teacher_bias, V)
    tensors = [x for x in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           teacher_logits) if x is not None]
    if len({x.device for x in tensors}) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted({str(x.device) for x in tensors})}")
    # labels, scalars, kind, reduction: the checks of distill_loss on a [..., V] stand-in
    stand_in = student_hidden.new_zeros(()).expand(*lead, max(V, 1))  # the logits' shape, no memory
    temperature, beta, alpha = _validate(stand_in, stand_in, labels, temperature, kind, beta, ignore_index,
                                         reduction, backend, alpha=alpha)
    if backend == "cuda":
        raise ValueError("fused_linear_kl(backend='cuda'): there is no CUDA C++ fused-linear kernel; on CUDA tensors "
                         "use backend='auto' or 'triton' (tensor-core tiles), or 'torch'")
    return temperature, beta, alpha


def _fused_linear(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher_logits, labels, *, temperature, kind, beta, ignore_index, reduction, ce_weight, kd_weight,
                  backend="auto"):
    """The fused-linear op on validated inputs, with explicit CE and divergence weights."""
    from kdkernels.ops.fused_linear_kl import fused_linear_kl_op

    backend = _backend.resolve(backend, student_hidden.device, "fused_linear_kl", has_cuda_kernel=False)
    # under autocast, the matmul operands in autocast's dtype (as F.linear gets them); products in fp32
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = \
        _backend.autocast_operands(student_hidden.device, student_hidden, student_weight, student_bias,
                                   teacher_hidden, teacher_weight, teacher_bias)

    lead = student_hidden.shape[:-1]
    tensors = [x for x in (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           teacher_logits) if x is not None]

    # [B, L, D] rows read through their strides: a causal-shift view of the hidden states (or of the
    # teacher's logits) is not copied
    rows = lambda x: None if x is None else rows3(x)  # noqa: E731
    hs, ht, tl = rows(student_hidden), rows(teacher_hidden), rows(teacher_logits)
    N = hs.shape[0] * hs.shape[1]
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    red = reduction
    # in the accumulation dtype: a float32 1/N would cost float64 inputs 8 digits
    scale_dtype = torch.float64 if any(x.dtype == torch.float64 for x in tensors) else torch.float32
    grad_scale = _grad_scale(N, lab, ignore_index, red, scale_dtype, hs.device,
                             _batch_size((*lead, student_weight.shape[0])))
    kind_id = _kind_id(kind, beta)
    grad_on = torch.is_grad_enabled()
    srcs = (student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits)
    need = [bool(grad_on and x is not None and x.requires_grad) for x in srcs]
    outs = fused_linear_kl_op(hs, student_weight, student_bias, ht, teacher_weight, teacher_bias, tl, lab, grad_scale,
                              temperature, kind_id, beta, ignore_index, ce_weight, kd_weight, REDUCTION_IDS[red], need,
                              backend)
    loss = outs[0]
    return loss.reshape(lead) if red == "none" else loss


# ------------------------------------------------------------------------------ top-k teacher

def _validate_topk(stand_in, teacher_topk_values, teacher_topk_indices, values, tail, temperature, labels,
                   ignore_index, reduction, backend, op):
    """The checks of :func:`topk_kl` on the student logits (or a ``[..., V]`` stand-in with their
    shape); returns (temperature, the resolved backend)."""
    _check_logits("teacher_topk_values", teacher_topk_values)
    if not isinstance(teacher_topk_indices, Tensor) or teacher_topk_indices.dtype.is_floating_point \
            or teacher_topk_indices.dtype == torch.bool:
        raise TypeError("teacher_topk_indices must be an integer tensor")
    lead, V = stand_in.shape[:-1], stand_in.shape[-1]
    if V == 0:
        raise ValueError("the student has an empty vocabulary: V = 0")
    if teacher_topk_values.shape[:-1] != lead or teacher_topk_indices.shape != teacher_topk_values.shape:
        raise ValueError(f"teacher_topk_values and teacher_topk_indices must both be [..., k] with the student's "
                         f"leading shape {tuple(lead)}, got {tuple(teacher_topk_values.shape)} and "
                         f"{tuple(teacher_topk_indices.shape)}")
    k = teacher_topk_values.shape[-1]
    if k == 0 or k > V:
        raise ValueError(f"k (the last dimension of the top-k tensors) must be in [1, V = {V}], got {k}")
    if values not in ("logprobs", "logits"):
        raise ValueError(f"values must be 'logprobs' or 'logits', got {values!r}")
    if tail not in ("ignore", "uniform"):
        raise ValueError(f"tail must be 'ignore' or 'uniform', got {tail!r}")
    if tail == "uniform" and values == "logits":
        raise ValueError("tail='uniform' needs values='logprobs': logits do not say how much mass the top-k miss")
    devices = {stand_in.device, teacher_topk_values.device, teacher_topk_indices.device}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devices)}")
    if teacher_topk_indices.numel() and not torch.compiler.is_compiling():
        if bool(((teacher_topk_indices < 0) | (teacher_topk_indices >= V)).any()):
            raise ValueError(f"teacher_topk_indices must be in [0, {V})")
    temperature, _, _ = _validate(stand_in, stand_in, labels, temperature, "forward", 0.5, ignore_index,
                                  reduction, backend)
    if backend == "cuda":
        raise ValueError(f"{op}(backend='cuda'): there is no CUDA C++ top-k kernel; on CUDA tensors use "
                         "backend='auto' or 'triton', or 'torch'")
    return temperature, _backend.resolve(backend, stand_in.device, op, has_cuda_kernel=False)


def topk_kl(student_logits: Tensor, teacher_topk_values: Tensor, teacher_topk_indices: Tensor, *,
            values: str = "logprobs", tail: str = "ignore", temperature: float = 1.0, labels: Optional[Tensor] = None,
            ignore_index: int = -100, reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Forward ``KL(p_t || p_s)`` against a teacher stored as its top-k entries per row.

    Args:
        student_logits: ``[..., V]`` float logits.
        teacher_topk_values: ``[..., k]``: log-probabilities over the full vocabulary (``values=
            "logprobs"``, temperature 1, as ``log_softmax(teacher).topk(k)`` stores them) or logits
            (``values="logits"``). ``-inf`` entries (padding) are legal.
        teacher_topk_indices: ``[..., k]`` integer vocabulary indices, distinct within a row.
        tail: what the probability mass outside the top-k means: ``"ignore"`` drops it (the top-k
            renormalized), ``"uniform"`` spreads it evenly over the other ``V - k`` entries (needs
            log-probabilities, whose missing mass is ``1 - sum exp(values)``).
        temperature: ``T``: the student's softmax of ``s / T``; the teacher's probabilities are raised
            to ``1/T`` and renormalized (for logits: their softmax at ``T``). No ``T**2`` factor.
        labels, ignore_index, reduction, backend: as in :func:`softmax_kl`: ``"cpu"`` (the C++
            kernel), ``"triton"`` (CUDA tensors, or the interpreter), ``"torch"`` (the float64
            reference, materialized).

    The gradient flows to the student only, ``(p_s - p_t) / T`` with ``p_t`` the sparse (plus
    uniform tail) teacher; it is computed in the forward pass in one more read of the row.
    """
    _check_logits("student_logits", student_logits)
    temperature, backend = _validate_topk(student_logits, teacher_topk_values, teacher_topk_indices, values, tail,
                                          temperature, labels, ignore_index, reduction, backend, "topk_kl")
    k = teacher_topk_values.shape[-1]
    lead = student_logits.shape[:-1]

    from kdkernels.ops.topk_kl import topk_kl_op

    s2 = rows3(student_logits)  # rows through their strides: a causal-shift view is not copied
    vals = teacher_topk_values.reshape(-1, k)
    idx = teacher_topk_indices.reshape(-1, k).to(torch.int64)
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    red = reduction
    N = s2.shape[0] * s2.shape[1]
    scale_dtype = torch.float64 if s2.dtype == torch.float64 else torch.float32
    grad_scale = _grad_scale(N, lab, ignore_index, red, scale_dtype, s2.device, _batch_size(student_logits.shape))
    need = torch.is_grad_enabled() and student_logits.requires_grad
    loss, _ = topk_kl_op(s2, vals, idx, lab, grad_scale, values == "logits", tail == "uniform", temperature,
                         ignore_index, REDUCTION_IDS[red], need, backend)
    return loss.reshape(lead) if red == "none" else loss


def fused_linear_topk_kl(student_hidden: Tensor, student_weight: Tensor, teacher_topk_values: Tensor,
                         teacher_topk_indices: Tensor, *, student_bias: Optional[Tensor] = None,
                         values: str = "logprobs", tail: str = "ignore", temperature: float = 1.0,
                         labels: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "mean",
                         backend: str = "auto") -> Tensor:
    r""":func:`topk_kl` on the student logits ``student_hidden @ student_weight.T + student_bias``,
    without forming them: the vocabulary is processed in tiles as in :func:`fused_linear_kl`, and
    the k teacher columns of each row are gathered from the weight.

    Args:
        student_hidden: ``[..., H]``; student_weight: ``[V, H]``; student_bias: ``[V]`` or None.
        teacher_topk_values, teacher_topk_indices: ``[..., k]`` with student_hidden's leading shape.
        values, tail, temperature, labels, ignore_index, reduction: as in :func:`topk_kl`.
        backend: ``"auto"`` or ``"torch"``: tiles of ATen matmuls on any device (the matmuls are the
            whole cost; the per-row work is O(k)).

    Gradients go to the hidden states, the weight and the bias. Peak extra memory: the gradients,
    O(rows · k) statistics and tiles of a fixed size, independent of V.
    """
    lead, V = _check_student_linear(student_hidden, student_weight)
    _check_bias("student_bias", student_bias, V)
    if student_hidden.device != student_weight.device or (student_bias is not None
                                                          and student_bias.device != student_weight.device):
        raise ValueError("student_hidden, student_weight and student_bias must be on one device")
    if backend not in ("auto", "torch"):
        raise ValueError(f"fused_linear_topk_kl(backend={backend!r}): the fused-linear top-k loss runs as tiles of "
                         "ATen matmuls on any device; use backend='auto' or 'torch'")
    stand_in = student_hidden.new_zeros(()).expand(*lead, V)
    temperature, _ = _validate_topk(stand_in, teacher_topk_values, teacher_topk_indices, values, tail, temperature,
                                    labels, ignore_index, reduction, "torch", "fused_linear_topk_kl")

    from kdkernels.ops.fused_linear_topk_kl import FusedLinearTopkKL

    student_hidden, student_weight, student_bias = _backend.autocast_operands(student_hidden.device, student_hidden,
                                                                              student_weight, student_bias)

    k = teacher_topk_values.shape[-1]
    hs = rows3(student_hidden)  # [B, L, H] rows through their strides (no copy of a shifted view)
    vals = teacher_topk_values.reshape(-1, k)
    idx = teacher_topk_indices.reshape(-1, k).to(torch.int64)
    lab = None if labels is None else labels.reshape(-1).to(torch.int64)
    red = reduction
    fp64 = torch.float64 in (student_hidden.dtype, student_weight.dtype)
    grad_scale = _grad_scale(hs.shape[0] * hs.shape[1], lab, ignore_index, red,
                             torch.float64 if fp64 else torch.float32, hs.device, _batch_size((*lead, V)))
    grad_on = torch.is_grad_enabled()
    need = tuple(bool(grad_on and x is not None and x.requires_grad)
                 for x in (student_hidden, student_weight, student_bias))
    loss = FusedLinearTopkKL.apply(hs, student_weight, student_bias, vals, idx, lab, grad_scale, tail == "uniform",
                                   temperature, ignore_index, REDUCTION_IDS[red], need)
    return loss.reshape(lead) if red == "none" else loss


# ------------------------------------------------------------------------------ similarity losses

def _check_embeddings(name: str, x, D: Optional[int] = None) -> None:
    _check_float(name, x, 2)
    if D is not None and x.shape[1] != D:
        raise ValueError(f"{name} must be [N, {D}], got {tuple(x.shape)}")


def _similarity_backend(backend: str, device, op: str) -> str:
    """"triton" (the default for CUDA tensors), "cpu" (C++ sweeps per tile) or "torch" (PyTorch
    operations per tile, any device); there is no CUDA C++ kernel for the similarity losses."""
    if backend == "cuda":
        raise ValueError(f"{op}(backend='cuda'): the similarity losses have no CUDA C++ kernel; on CUDA tensors "
                         "use backend='auto' or 'triton' (Triton kernels), or 'torch'")
    return _backend.resolve(backend, device, op, has_cuda_kernel=False)


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, log_scale, bias, labels, grad_scale, sigmoid, symmetric, reduction, need, backend):
        from kdkernels.ops.similarity import info_nce_tiled

        ctx.kw = dict(sigmoid=sigmoid, symmetric=symmetric, need=need, backend=backend)
        ctx.reduction = reduction
        outs = info_nce_tiled(a, b, log_scale, bias, labels, grad_scale,
                              **{**ctx.kw, "need": need if reduction else (False,) * 4})
        if reduction == 0:
            ctx.save_for_backward(a, b, log_scale, bias, labels)
            return outs[0]
        ctx.save_for_backward(*outs[1:])
        return outs[0].sum() * grad_scale.to(outs[0].dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        from kdkernels.ops.similarity import info_nce_tiled

        if ctx.reduction == 0:
            a, b, log_scale, bias, labels = ctx.saved_tensors
            grads = info_nce_tiled(a, b, log_scale, bias, labels, grad_loss, **ctx.kw)[1:]
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None, None, None)


def info_nce(a: Tensor, b: Tensor, *, temperature: Optional[float] = None, logit_scale: Optional[Tensor] = None,
             logit_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None, symmetric: bool = True,
             kind: str = "softmax", reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Contrastive loss on ``S = scale · a bᵀ`` without forming ``S``.

    ``kind="softmax"`` (InfoNCE / CLIP): row i of ``a`` matches row ``labels[i]`` of ``b`` (default
    i); its loss is the cross-entropy of row i of S with target ``labels[i]``; with ``symmetric``
    it is averaged with the cross-entropy of column ``labels[i]`` with target i (CLIP's two
    directions). ``kind="sigmoid"`` (SigLIP): ``Σ_j −log σ(z_ij (S_ij + logit_bias))`` with
    ``z = +1`` for the matching pair and ``−1`` otherwise (``symmetric`` does not apply).

    Args:
        a: ``[N_a, D]``; b: ``[N_b, D]`` (``N_b ≥ N_a`` without labels). Any float dtype; the
            products accumulate in float32 (float64 for float64 inputs).
        temperature: ``scale = 1 / temperature``; or ``logit_scale``: a 0-d tensor holding
            ``log(scale)`` (as CLIP stores it), which gets a gradient when it requires one.
        logit_bias: a 0-d tensor (``kind="sigmoid"`` only), with gradient.
        labels: int ``[N_a]`` in ``[0, N_b)``, or None.
        reduction: ``"mean"`` over rows of ``a``, ``"sum"``, or ``"none"`` (``[N_a]``).
        backend: ``"auto"`` (``"triton"`` for CUDA tensors, ``"cpu"`` for CPU tensors when the
            extension is built, else ``"torch"``), ``"triton"`` (tensor-core tiles, the gradients
            in the same kernel; CUDA, or CPU under ``TRITON_INTERPRET=1``), ``"cpu"`` (ATen
            matmuls per tile, the element-wise work in C++ sweeps) or ``"torch"`` (the same tiles
            in PyTorch operations, any device).

    Memory beyond the inputs and their gradients: O(N) statistics and fixed-size tiles of S.
    """
    _check_embeddings("a", a)
    _check_embeddings("b", b, a.shape[1])
    if kind not in ("softmax", "sigmoid"):
        raise ValueError(f"kind must be 'softmax' or 'sigmoid', got {kind!r}")
    if (temperature is None) == (logit_scale is None):
        raise ValueError("give exactly one of temperature (scale = 1 / temperature) and logit_scale "
                         "(a 0-d tensor holding log(scale))")
    if temperature is not None:
        temperature = _check_scalar("temperature", temperature, 0.0, math.inf, lo_open=True)
    if logit_scale is not None and (not isinstance(logit_scale, Tensor) or logit_scale.numel() != 1):
        raise TypeError("logit_scale must be a one-element tensor holding log(scale)")
    if logit_bias is not None:
        if kind != "sigmoid":
            raise ValueError("logit_bias is only used by kind='sigmoid' (it cancels in a softmax)")
        if not isinstance(logit_bias, Tensor) or logit_bias.numel() != 1:
            raise TypeError("logit_bias must be a one-element tensor")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    na, nb = a.shape[0], b.shape[0]
    if labels is None:
        if nb < na:
            raise ValueError(f"without labels row i of a matches row i of b: b needs at least N_a = {na} rows, "
                             f"got {nb}")
        lab = torch.arange(na, device=a.device)
    else:
        if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError("labels must be an integer tensor")
        if labels.shape != (na,):
            raise ValueError(f"labels must be [N_a] = [{na}], got {tuple(labels.shape)}")
        lab = labels.to(torch.int64)
        if na and not torch.compiler.is_compiling() and bool(((lab < 0) | (lab >= nb)).any()):
            raise ValueError(f"labels must be in [0, N_b = {nb})")
    devs = {x.device for x in (a, b, logit_scale, logit_bias, labels) if isinstance(x, Tensor)}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    backend = _similarity_backend(backend, a.device, "info_nce")
    a, b = _backend.autocast_operands(a.device, a, b)
    acc = torch.float64 if torch.float64 in (a.dtype, b.dtype) else torch.float32
    log_scale = logit_scale.reshape(()) if logit_scale is not None else \
        torch.tensor(-math.log(temperature), dtype=acc, device=a.device)
    bias = None if logit_bias is None else logit_bias.reshape(())
    red = REDUCTION_IDS[reduction]
    grad_scale = torch.full((), 1.0 / max(na, 1) if reduction == "mean" else 1.0, dtype=acc, device=a.device)
    on = torch.is_grad_enabled()
    need = tuple(bool(on and x is not None and x.requires_grad) for x in (a, b, log_scale, bias))
    out = _InfoNCE.apply(a, b, log_scale, bias, lab, grad_scale, kind == "sigmoid", bool(symmetric), red, need,
                         backend)
    return out


class _SimilarityKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, sa, sb, ta, tb, inv_ts, grad_scale, kw, reduction, need):
        from kdkernels.ops.similarity import similarity_kd_tiled

        kw = dict(kw, inv_ts=float(inv_ts))
        ctx.kw, ctx.reduction, ctx.need = kw, reduction, need
        outs = similarity_kd_tiled(sa, ta, sb, tb, grad_scale, need=need if reduction else (False,) * 3, **kw)
        if reduction == 0:
            ctx.save_for_backward(sa, sb, ta, tb)
            return outs[0]
        ctx.save_for_backward(*outs[1:4])
        return outs[0].sum() * grad_scale.to(outs[0].dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        from kdkernels.ops.similarity import similarity_kd_tiled

        if ctx.reduction == 0:
            sa, sb, ta, tb = ctx.saved_tensors
            d_sa, d_sb, d_inv = similarity_kd_tiled(sa, ta, sb, tb, grad_loss, need=ctx.need, **ctx.kw)[1:4]
        else:
            d_sa, d_sb, d_inv = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return d_sa, d_sb, None, None, d_inv, None, None, None, None


def similarity_kd(student_a: Tensor, teacher_a: Tensor, student_b: Optional[Tensor] = None,
                  teacher_b: Optional[Tensor] = None, *, temperature: float = 1.0,
                  student_temperature: Optional[float] = None, kind: str = "forward", beta: float = 0.5,
                  normalize: bool = True, symmetric: bool = True, reduction: str = "mean",
                  backend: str = "auto") -> Tensor:
    r"""Relational distillation: the student's similarity rows pulled to the teacher's.

    The teacher's ``S_t = a_t b_tᵀ / temperature`` and the student's ``S_s = a_s b_sᵀ /
    student_temperature`` (self-similarity ``a aᵀ`` without its diagonal when the ``*_b`` are None;
    cross-modal, e.g. image-text, when given) are turned into row-wise softmaxes and compared with
    ``D(teacher row, student row)`` (``kind`` as in :func:`softmax_kl`); with ``b`` given and
    ``symmetric``, averaged with the same over columns. Neither matrix is ever formed.

    Args:
        student_a: ``[N, Ds]``; teacher_a: ``[N, Dt]`` (the dims may differ); student_b, teacher_b:
            ``[N, Ds]``, ``[N, Dt]`` or None.
        temperature: the teacher's; student_temperature: the student's (default: the same): a
            float, or a one-element tensor that gets a gradient when it requires one.
        normalize: L2-normalize every embedding first (cosine similarities).
        reduction: ``"mean"`` over rows, ``"sum"``, or ``"none"`` (``[N]``).
        backend: ``"auto"``, ``"cpu"`` or ``"torch"``, as in :func:`info_nce`.

    Gradients go to the student's embeddings; the teacher's are constants.
    """
    return _similarity_kd(student_a, teacher_a, student_b, teacher_b, temperature=temperature,
                          student_temperature=student_temperature, kind=kind, beta=beta, normalize=normalize,
                          symmetric=symmetric, reduction=reduction, backend=backend)


def _similarity_kd(student_a, teacher_a, student_b=None, teacher_b=None, *, temperature=1.0,
                   student_temperature=None, kind="forward", beta=0.5, normalize=True, symmetric=True,
                   reduction="mean", backend="auto", mask_offset=None):
    """:func:`similarity_kd` with ``mask_offset``: the entries (i, i + mask_offset) of a cross
    similarity are left out (kdkernels.distributed's self-similarity of a rank's rows)."""
    _check_embeddings("student_a", student_a)
    _check_embeddings("teacher_a", teacher_a)
    n = student_a.shape[0]
    if teacher_a.shape[0] != n:
        raise ValueError(f"student_a and teacher_a must have the same rows, got {tuple(student_a.shape)} and "
                         f"{tuple(teacher_a.shape)}")
    if (student_b is None) != (teacher_b is None):
        raise ValueError("give both student_b and teacher_b (cross similarity) or neither (self-similarity)")
    if student_b is not None:
        _check_embeddings("student_b", student_b, student_a.shape[1])
        _check_embeddings("teacher_b", teacher_b, teacher_a.shape[1])
        if teacher_b.shape[0] != student_b.shape[0]:
            raise ValueError(f"student_b and teacher_b must have the same rows, got {tuple(student_b.shape)} and "
                             f"{tuple(teacher_b.shape)}")
        if symmetric and student_b.shape[0] != n:
            raise ValueError(f"symmetric=True averages rows and columns pair by pair: a and b need the same number "
                             f"of rows, got {n} and {student_b.shape[0]}")
    temperature = _check_scalar("temperature", temperature, 0.0, math.inf, lo_open=True)
    if isinstance(student_temperature, Tensor):  # a learnable temperature: it gets a gradient
        if student_temperature.numel() != 1 or not student_temperature.is_floating_point():
            raise TypeError("student_temperature must be a float or a one-element float tensor")
        if not torch.compiler.is_compiling() and not bool(student_temperature.detach() > 0):
            raise ValueError(f"student_temperature must be > 0, got {float(student_temperature)}")
        ts = student_temperature.reshape(())
    else:
        ts = temperature if student_temperature is None else \
            _check_scalar("student_temperature", student_temperature, 0.0, math.inf, lo_open=True)
    if kind not in KIND_IDS:
        raise ValueError(f"kind must be one of {tuple(KIND_IDS)}, got {kind!r}")
    beta = _check_scalar("beta", beta, 0.0, 1.0)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    devs = {x.device for x in (student_a, teacher_a, student_b, teacher_b) if x is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    backend = _similarity_backend(backend, student_a.device, "similarity_kd")
    student_a, teacher_a, student_b, teacher_b = _backend.autocast_operands(student_a.device, student_a, teacher_a,
                                                                            student_b, teacher_b)
    prep = (lambda x: torch.nn.functional.normalize(x, dim=-1)) if normalize else (lambda x: x)  # noqa: E731
    sa, sb = prep(student_a), None if student_b is None else prep(student_b)
    with torch.no_grad():
        ta, tb = prep(teacher_a), None if teacher_b is None else prep(teacher_b)
    acc = torch.float64 if torch.float64 in (student_a.dtype, teacher_a.dtype) else torch.float32
    grad_scale = torch.full((), 1.0 / max(n, 1) if reduction == "mean" else 1.0, dtype=acc, device=sa.device)
    on = torch.is_grad_enabled()
    inv_ts = 1.0 / ts if isinstance(ts, Tensor) else torch.tensor(1.0 / ts, dtype=acc, device=sa.device)
    need = tuple(bool(on and x is not None and x.requires_grad) for x in (sa, sb, inv_ts))
    kw = dict(inv_t=1.0 / temperature, kind=_kind_id(kind, beta), beta=beta, symmetric=bool(symmetric),
              backend=backend, mask_offset=mask_offset)
    return _SimilarityKD.apply(sa, sb, ta, tb, inv_ts, grad_scale, kw, REDUCTION_IDS[reduction], need)


class _ClipDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, ta, tb, log_scale, t_scale, need, backend):
        from kdkernels.ops.similarity import clip_distill_forward

        contrastive, distill, stats = clip_distill_forward(a, b, ta, tb, log_scale, t_scale, backend=backend)
        ctx.save_for_backward(a, b, ta, tb, log_scale, *stats)
        ctx.t_scale, ctx.need, ctx.backend = t_scale, need, backend
        n = max(a.shape[0], 1)
        return contrastive.sum() / n, distill.sum() / n

    @staticmethod
    def backward(ctx, g_c, g_d):
        from kdkernels.ops.similarity import clip_distill_backward

        a, b, ta, tb, log_scale, *stats = ctx.saved_tensors
        n = max(a.shape[0], 1)
        wc = 0.0 if g_c is None else float(g_c) / n
        wd = 0.0 if g_d is None else float(g_d) / n
        da, db, d_ls = clip_distill_backward(a, b, ta, tb, log_scale, ctx.t_scale, stats, wc, wd, ctx.need,
                                             backend=ctx.backend)
        cast = lambda g, x: None if g is None else g.to(x.dtype)  # noqa: E731
        return cast(da, a), cast(db, b), None, None, cast(d_ls, log_scale), None, None, None


def _clip_distill(image: Tensor, text: Tensor, t_image: Tensor, t_text: Tensor, log_scale: Tensor, t_scale: float,
                  backend: str = "auto"):
    """(CLIP's contrastive loss, the soft cross-entropy distillation loss) of open_clip's
    ``DistillClipLoss`` (pairs i ↔ i, both means over the N pairs), from one pass over the tiles of
    the student's ``S = exp(log_scale) image textᵀ`` and the teacher's ``T = t_scale t_image t_textᵀ``:
    the two losses share S and its log-sum-exps. Gradients go to ``image``, ``text`` and
    ``log_scale`` (a 0-d tensor); the teacher is a constant."""
    _check_embeddings("image", image)
    _check_embeddings("text", text, image.shape[1])
    _check_embeddings("t_image", t_image)
    _check_embeddings("t_text", t_text, t_image.shape[1])
    n = image.shape[0]
    if not (text.shape[0] == t_image.shape[0] == t_text.shape[0] == n):
        raise ValueError(f"image, text, t_image and t_text must have the same rows, got {image.shape[0]}, "
                         f"{text.shape[0]}, {t_image.shape[0]}, {t_text.shape[0]}")
    if not isinstance(log_scale, Tensor) or log_scale.numel() != 1:
        raise TypeError("log_scale must be a one-element tensor")
    t_scale = _check_scalar("t_scale", float(t_scale), 0.0, math.inf, lo_open=True)
    devs = {x.device for x in (image, text, t_image, t_text, log_scale)}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    backend = _similarity_backend(backend, image.device, "DistillClipLoss")
    image, text, t_image, t_text = _backend.autocast_operands(image.device, image, text, t_image, t_text)
    log_scale = log_scale.reshape(())
    on = torch.is_grad_enabled()
    need = tuple(bool(on and x.requires_grad) for x in (image, text, log_scale))
    return _ClipDistill.apply(image, text, t_image.detach(), t_text.detach(), log_scale, t_scale, need, backend)


# ------------------------------------------------------------------------------ feature projection (hint) losses

class _ProjectedFeature(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, W, b, T, keep, grad_scale, kw, reduction, need):
        ctx.kw, ctx.reduction, ctx.need = kw, reduction, need
        outs = _projected_feature_launch(X, W, b, T, keep, grad_scale, need if reduction else (False,) * 4, kw)
        if reduction == 0:
            ctx.save_for_backward(X, W, b, T, keep)
            rows = outs[0].new_zeros(X.shape[0]).index_copy_(0, keep, outs[0])
            return rows
        ctx.save_for_backward(*[None if g is None else g.to(x.dtype) for g, x in zip(outs[1:], (X, W, b, T))])
        return (outs[0] * grad_scale.to(outs[0].dtype)).sum()

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.reduction == 0:
            X, W, b, T, keep = ctx.saved_tensors
            outs = _projected_feature_launch(X, W, b, T, keep, grad_loss.index_select(0, keep), ctx.need, ctx.kw)
            grads = [None if g is None else g.to(x.dtype) for g, x in zip(outs[1:], (X, W, b, T))]
        else:
            grads = [None if g is None else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors]
        return (*grads, None, None, None, None, None)


@_backend.without_autocast
def _projected_feature_launch(X, W, b, T, keep, grad_scale, need, kw):
    if kw["backend"] == "triton":
        from kdkernels.triton.projected_feature import projected_feature_forward

        return projected_feature_forward(X, W, b, T, keep, grad_scale, kind=kw["kind"], beta=kw["beta"], need=need)
    from kdkernels.ops.projected_feature import projected_feature_tiled

    return projected_feature_tiled(X, W, b, T, keep, grad_scale, need=need, **kw)


def projected_feature_loss(student_feat: Tensor, weight: Tensor, teacher_feat: Tensor, *, bias: Optional[Tensor] = None,
                           kind: str = "mse", beta: float = 1.0, mask: Optional[Tensor] = None,
                           reduction: str = "mean", backend: str = "auto") -> Tensor:
    r"""Hint loss (FitNets): ``D(student_feat · weightᵀ + bias, teacher_feat)`` per row, without the
    projected ``[N, Dt]`` tensor.

    Per row (``Dt`` teacher features, ``d = P - T``, ``P`` the projection): ``"mse"`` ``mean_j d_j²``,
    ``"l1"`` ``mean_j |d_j|``, ``"smooth_l1"`` ``mean_j`` of Huber's ``d²/(2β)`` below ``|d| < β``
    and ``|d| − β/2`` above (``β = 0``: l1), ``"cosine"`` ``1 − cos(P, T)`` (as
    ``F.cosine_similarity``, eps 1e-8). Unmasked, ``"mean"`` equals ``F.mse_loss(P, T)`` /
    ``F.l1_loss`` / ``F.smooth_l1_loss`` (``reduction="mean"``) and ``(1 − F.cosine_similarity(P, T)).mean()``.

    Args:
        student_feat: ``[..., Ds]``; weight: ``[Dt, Ds]``; teacher_feat: ``[..., Dt]`` (same leading
            shape); bias: ``[Dt]`` or None. float32, bfloat16, float16 or float64 (may differ);
            the products accumulate in float32 (float64 when any input is float64).
        mask: the leading shape, bool or 0/1: rows where it is False/0 are dropped before any
            matmul, cost nothing, contribute 0 and get zero gradients.
        reduction: ``"mean"`` over the kept rows (0 when none is kept), ``"sum"`` of the per-row
            losses, or ``"none"`` (the leading shape, 0 on masked rows).
        backend: ``"auto"`` (``"triton"`` for CUDA tensors, ``"cpu"`` for CPU tensors when the
            extension is built, else ``"torch"``), ``"triton"``, ``"cpu"`` (ATen matmuls per tile,
            the epilogue in C++ sweeps) or ``"torch"`` (the same tiles in PyTorch operations).

    Gradients go to ``student_feat``, ``weight``, ``bias`` and ``teacher_feat``, each when it
    requires one. Memory beyond the inputs and their gradients: one ``[512, 2048]`` tile of ``P``
    (CPU) and O(N) per-row values.
    """
    from kdkernels.ops.projected_feature import KINDS

    _check_float("student_feat", student_feat)
    _check_float("weight", weight, 2)
    _check_float("teacher_feat", teacher_feat)
    if bias is not None:
        _check_float("bias", bias, 1)
    Ds, Dt = student_feat.shape[-1], teacher_feat.shape[-1]
    shapes = (f"student_feat {tuple(student_feat.shape)}, weight {tuple(weight.shape)}, teacher_feat "
              f"{tuple(teacher_feat.shape)}")
    if weight.shape != (Dt, Ds) or student_feat.shape[:-1] != teacher_feat.shape[:-1]:
        raise ValueError(f"expected student_feat [..., Ds], weight [Dt, Ds], teacher_feat [..., Dt] with the same "
                         f"leading shape; got {shapes}")
    if bias is not None and bias.shape != (Dt,):
        raise ValueError(f"bias must be [Dt] = [{Dt}], got {tuple(bias.shape)} ({shapes})")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {tuple(KINDS)}, got {kind!r}")
    beta = _check_scalar("beta", beta, 0.0, math.inf)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    lead = student_feat.shape[:-1]
    if mask is not None:
        if not isinstance(mask, Tensor):
            raise TypeError("mask must be a tensor (bool or 0/1) of the leading shape")
        if mask.shape != lead:
            raise ValueError(f"mask must have the leading shape {tuple(lead)}, got {tuple(mask.shape)}")
    devs = {x.device for x in (student_feat, weight, teacher_feat, bias, mask) if x is not None}
    if len(devs) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(str(d) for d in devs)}")
    backend = _backend.resolve(backend, student_feat.device, "projected_feature_loss", has_cuda_kernel=False)
    student_feat, weight, bias = _backend.autocast_operands(student_feat.device, student_feat, weight, bias)
    X, T = student_feat.reshape(-1, Ds), teacher_feat.reshape(-1, Dt)
    N = X.shape[0]
    keep = (mask.reshape(-1) != 0).nonzero().squeeze(1) if mask is not None else \
        torch.arange(N, device=X.device)
    acc = torch.float64 if torch.float64 in (X.dtype, weight.dtype, T.dtype) else torch.float32
    grad_scale = torch.full((), 1.0 / max(keep.numel(), 1) if reduction == "mean" else 1.0, dtype=acc,
                            device=X.device)
    on = torch.is_grad_enabled()
    need = tuple(bool(on and x is not None and x.requires_grad) for x in (X, weight, bias, T))
    kw = dict(kind=KINDS[kind], beta=beta, backend=backend)
    out = _ProjectedFeature.apply(X, weight, bias, T, keep, grad_scale, kw, REDUCTION_IDS[reduction], need)
    return out.reshape(lead) if reduction == "none" else out
