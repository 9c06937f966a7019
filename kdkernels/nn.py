"""Drop-in ``nn.Module`` forms of the kdkernels losses."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdkernels.contrastive import info_nce
from kdkernels.fused_linear import fused_linear_kl
from kdkernels.fused_linear_topk import fused_linear_topk_kl
from kdkernels.kl_div import kl_div_sum
from kdkernels.projected_feature import projected_feature_loss
from kdkernels.relational import similarity_kd
from kdkernels.softmax_divergence import distill_loss, softmax_kl
from kdkernels.topk_teacher import topk_kl

__all__ = ["SoftmaxKL", "DistillationLoss", "FusedLinearDistillationLoss", "TopkKLLoss", "FusedLinearTopkKLLoss",
           "InfoNCELoss", "ClipLoss", "SimilarityKDLoss", "HintLoss", "KLDivLoss"]


def _options(vocab_size=None, **transforms) -> dict:
    """The token-level losses' shared options a module keeps (``vocab_size`` and the logit
    transforms; :mod:`kdkernels._core.logit_options`), the defaults left out."""
    defaults = dict(student_softcap=None, teacher_softcap=None, student_logit_scale=1.0, teacher_logit_scale=1.0)
    out = {k: v for k, v in transforms.items() if v != defaults[k]}
    return out if vocab_size is None else dict(vocab_size=vocab_size, **out)


class SoftmaxKL(torch.nn.Module):
    """Module form of :func:`kdkernels.softmax_kl`: ``loss = SoftmaxKL(T)(student_logits, teacher_logits)``.
    ``vocab_size`` and the logit transforms are fixed here; ``num_items_in_batch`` is a forward
    argument (it changes per step, as Hugging Face's Trainer passes it)."""

    def __init__(self, temperature: float = 1.0, divergence: str = "forward", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", *,
                 vocab_size: Optional[int] = None,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0):
        super().__init__()
        self.temperature, self.divergence, self.beta = temperature, divergence, beta
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.options = _options(vocab_size, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                num_items_in_batch=None) -> Tensor:
        return softmax_kl(student_logits, teacher_logits, temperature=self.temperature, divergence=self.divergence,
                          beta=self.beta, labels=labels, ignore_index=self.ignore_index,
                          reduction=self.reduction, backend=self.backend, num_items_in_batch=num_items_in_batch,
                          **self.options)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, divergence={self.divergence!r}, beta={self.beta}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}"
                + "".join(f", {k}={v!r}" for k, v in self.options.items()))


class DistillationLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.distill_loss` (Hinton: ``alpha`` CE + ``(1 - alpha) T^2`` KD);
    options as in :class:`SoftmaxKL`."""

    def __init__(self, temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", *,
                 vocab_size: Optional[int] = None,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0):
        super().__init__()
        self.temperature, self.alpha, self.divergence, self.beta = temperature, alpha, divergence, beta
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.options = _options(vocab_size, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None, *,
                num_items_in_batch=None) -> Tensor:
        return distill_loss(student_logits, teacher_logits, labels, temperature=self.temperature,
                            alpha=self.alpha, divergence=self.divergence, beta=self.beta,
                            ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                            num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
                f"beta={self.beta}, reduction={self.reduction!r}, backend={self.backend!r}"
                + "".join(f", {k}={v!r}" for k, v in self.options.items()))


class FusedLinearDistillationLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.fused_linear_kl`: the distillation loss from the hidden
    states and lm_head weights of both models, never forming the logits::

        loss_fn = FusedLinearDistillationLoss(temperature=2.0, alpha=0.1)
        loss = loss_fn(student_hidden, student.lm_head.weight, teacher_hidden, teacher.lm_head.weight,
                       labels=labels)
    """

    def __init__(self, temperature: float = 1.0, alpha: float = 0.0, divergence: str = "forward", beta: float = 0.5,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", *,
                 vocab_size: Optional[int] = None,
                 student_softcap: Optional[float] = None, teacher_softcap: Optional[float] = None,
                 student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0):
        super().__init__()
        self.temperature, self.alpha, self.divergence, self.beta = temperature, alpha, divergence, beta
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.options = _options(vocab_size, student_softcap=student_softcap, teacher_softcap=teacher_softcap,
                                student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Optional[Tensor] = None,
                teacher_weight: Optional[Tensor] = None, *, teacher_logits: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                labels: Optional[Tensor] = None, num_items_in_batch=None) -> Tensor:
        return fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight,
                               teacher_logits=teacher_logits, student_bias=student_bias, teacher_bias=teacher_bias,
                               temperature=self.temperature, divergence=self.divergence, beta=self.beta,
                               alpha=self.alpha, labels=labels, ignore_index=self.ignore_index,
                               reduction=self.reduction, backend=self.backend, num_items_in_batch=num_items_in_batch,
                               **self.options)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, alpha={self.alpha}, divergence={self.divergence!r}, "
                f"beta={self.beta}, reduction={self.reduction!r}, backend={self.backend!r}"
                + "".join(f", {k}={v!r}" for k, v in self.options.items()))


class TopkKLLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.topk_kl` (a teacher stored as its top-k entries per row)."""

    def __init__(self, topk_format: str = "logprobs", tail: str = "ignore", temperature: float = 1.0,
                 ignore_index: int = -100, reduction: str = "mean", backend: str = "auto", *,
                 vocab_size: Optional[int] = None, student_softcap: Optional[float] = None,
                 student_logit_scale: float = 1.0):
        super().__init__()
        self.topk_format, self.tail, self.temperature = topk_format, tail, temperature
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.options = _options(vocab_size, student_softcap=student_softcap, student_logit_scale=student_logit_scale)

    def forward(self, student_logits: Tensor, teacher_topk_values: Tensor, teacher_topk_indices: Tensor,
                labels: Optional[Tensor] = None, *, num_items_in_batch=None) -> Tensor:
        return topk_kl(student_logits, teacher_topk_values, teacher_topk_indices, topk_format=self.topk_format,
                       tail=self.tail, temperature=self.temperature, labels=labels,
                       ignore_index=self.ignore_index, reduction=self.reduction, backend=self.backend,
                       num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self) -> str:
        return (f"topk_format={self.topk_format!r}, tail={self.tail!r}, temperature={self.temperature}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}"
                + "".join(f", {k}={v!r}" for k, v in self.options.items()))


class FusedLinearTopkKLLoss(TopkKLLoss):
    """Module form of :func:`kdkernels.fused_linear_topk_kl`: :class:`TopkKLLoss` from the
    student's hidden states and lm_head weight (and bias)."""

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_topk_values: Tensor,
                teacher_topk_indices: Tensor, labels: Optional[Tensor] = None,
                student_bias: Optional[Tensor] = None, *, num_items_in_batch=None) -> Tensor:
        return fused_linear_topk_kl(student_hidden, student_weight, teacher_topk_values, teacher_topk_indices,
                                    student_bias=student_bias, topk_format=self.topk_format, tail=self.tail,
                                    temperature=self.temperature, labels=labels, ignore_index=self.ignore_index,
                                    reduction=self.reduction, backend=self.backend,
                                    num_items_in_batch=num_items_in_batch, **self.options)


class InfoNCELoss(torch.nn.Module):
    """Module form of :func:`kdkernels.info_nce` with a fixed temperature (or a fixed
    ``logit_scale`` given per call): ``InfoNCELoss(temperature=0.1)(a, b)``."""

    def __init__(self, temperature: Optional[float] = None, symmetric: bool = True, variant: str = "softmax",
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.symmetric, self.variant = temperature, symmetric, variant
        self.reduction, self.backend = reduction, backend

    def forward(self, a: Tensor, b: Tensor, labels: Optional[Tensor] = None, logit_scale: Optional[Tensor] = None,
                logit_bias: Optional[Tensor] = None) -> Tensor:
        return info_nce(a, b, temperature=self.temperature if logit_scale is None else None,
                           logit_scale=logit_scale, logit_bias=logit_bias, labels=labels, symmetric=self.symmetric,
                           variant=self.variant, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, symmetric={self.symmetric}, variant={self.variant!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}")


class ClipLoss(InfoNCELoss):
    """CLIP's symmetric contrastive loss: ``ClipLoss()(image_features, text_features, logit_scale)``
    with ``logit_scale`` the learnable log of the scale (CLIP's parameter, before ``.exp()``);
    ``variant="sigmoid"`` takes ``logit_bias`` too (SigLIP). Features are used as given (CLIP
    normalizes them in the model)."""

    def __init__(self, variant: str = "softmax", reduction: str = "mean", backend: str = "auto"):
        super().__init__(None, True, variant, reduction, backend)

    def forward(self, image_features: Tensor, text_features: Tensor, logit_scale: Tensor,
                logit_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None) -> Tensor:
        return super().forward(image_features, text_features, labels, logit_scale, logit_bias)


class SimilarityKDLoss(torch.nn.Module):
    """Module form of :func:`kdkernels.similarity_kd` (relational distillation of similarity rows)."""

    def __init__(self, temperature: float = 1.0, student_temperature: Optional[float] = None,
                 divergence: str = "forward", beta: float = 0.5, normalize: bool = True, symmetric: bool = True,
                 reduction: str = "mean", backend: str = "auto"):
        super().__init__()
        self.temperature, self.student_temperature = temperature, student_temperature
        self.divergence, self.beta = divergence, beta
        self.normalize, self.symmetric, self.reduction, self.backend = normalize, symmetric, reduction, backend

    def forward(self, student_a: Tensor, teacher_a: Tensor, student_b: Optional[Tensor] = None,
                teacher_b: Optional[Tensor] = None) -> Tensor:
        return similarity_kd(student_a, teacher_a, student_b, teacher_b, temperature=self.temperature,
                             student_temperature=self.student_temperature, divergence=self.divergence, beta=self.beta,
                             normalize=self.normalize, symmetric=self.symmetric, reduction=self.reduction,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, student_temperature={self.student_temperature}, "
                f"divergence={self.divergence!r}, normalize={self.normalize}, symmetric={self.symmetric}, "
                f"reduction={self.reduction!r}")


class HintLoss(torch.nn.Module):
    """A learnable projection of the student's features pulled to the teacher's (FitNets hints):
    ``loss = D(student_feat · weightᵀ + bias, teacher_feat)``, :func:`kdkernels.projected_feature_loss`,
    without the projected tensor. Owns ``weight`` ``[teacher_dim, student_dim]`` and ``bias``.

    ``init``: ``"xavier"`` (Xavier-uniform weight), ``"identity"`` (ones on the diagonal, which
    passes the first ``min(Ds, Dt)`` features through) or ``"zeros"``; the bias starts at 0.
    ``forward(student_feat [..., Ds], teacher_feat [..., Dt], mask=None)``; the teacher's features
    get a gradient only if they require one (detach them to keep the teacher frozen).
    """

    def __init__(self, student_dim: int, teacher_dim: int, *, metric: str = "mse", bias: bool = True,
                 init: str = "xavier", beta: float = 1.0, reduction: str = "mean", backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        if init not in ("xavier", "identity", "zeros"):
            raise ValueError(f"init must be 'xavier', 'identity' or 'zeros', got {init!r}")
        if int(student_dim) < 1 or int(teacher_dim) < 1:
            raise ValueError(f"student_dim and teacher_dim must be positive, got {student_dim} and {teacher_dim}")
        kw = dict(device=device, dtype=dtype)
        self.weight = torch.nn.Parameter(torch.empty(int(teacher_dim), int(student_dim), **kw))
        self.bias = torch.nn.Parameter(torch.zeros(int(teacher_dim), **kw)) if bias else None
        self.metric, self.init, self.beta, self.reduction, self.backend = metric, init, beta, reduction, backend
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "xavier":
                torch.nn.init.xavier_uniform_(self.weight)
            elif self.init == "identity":
                torch.nn.init.eye_(self.weight)
            else:
                self.weight.zero_()
            if self.bias is not None:
                self.bias.zero_()

    def forward(self, student_feat: Tensor, teacher_feat: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return projected_feature_loss(student_feat, self.weight, teacher_feat, bias=self.bias, metric=self.metric,
                                         beta=self.beta, mask=mask, reduction=self.reduction, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"student_dim={self.weight.shape[1]}, teacher_dim={self.weight.shape[0]}, metric={self.metric!r}, "
                f"bias={self.bias is not None}, init={self.init!r}, reduction={self.reduction!r}, "
                f"backend={self.backend!r}")


class KLDivLoss(torch.nn.KLDivLoss):
    """Drop-in for :class:`torch.nn.KLDivLoss` (same arguments, same results: ``input`` holds
    log-probabilities, ``target`` probabilities or, with ``log_target=True``, log-probabilities).

    For the reductions ``"sum"``, ``"mean"`` and ``"batchmean"`` the loss is accumulated over row
    chunks and the input gradient is written in the forward pass, so no pointwise loss tensor or
    float32 copy of the inputs is materialized (see :mod:`kdkernels.kl_div`). ``"none"``,
    broadcasting shapes and a target that requires grad use ``torch.nn.functional.kl_div``. The
    loss has torch's dtype, ``torch.promote_types(input.dtype, target.dtype)``, and is accumulated in
    float32 (float64 for float64 inputs); the input gradient has the input's dtype.

    To fuse the ``log_softmax`` as well, replace
    ``KLDivLoss(reduction="batchmean")(F.log_softmax(s / T, -1), F.softmax(t / T, -1))`` by
    ``kdkernels.softmax_kl(s, t, temperature=T)``.
    """

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        if (self.reduction == "none" or input.shape != target.shape or target.requires_grad
                or not input.dtype.is_floating_point or input.dim() == 0):
            return torch.nn.functional.kl_div(input, target, reduction=self.reduction, log_target=self.log_target)
        if self.reduction == "mean":
            scale = 1.0 / max(1, input.numel())
        elif self.reduction == "batchmean":
            scale = 1.0 / max(1, input.shape[0])
        elif self.reduction == "sum":
            scale = 1.0
        else:
            raise ValueError(f"reduction must be 'none', 'batchmean', 'sum' or 'mean', got {self.reduction!r}")
        # the loss in torch's dtype: input and target promoted (a bf16 input and a float32 target
        # give float32), accumulated in float32 (float64 for float64 inputs) whatever the dtypes
        return kl_div_sum(input, target, scale=scale, log_target=self.log_target,
                          out_dtype=torch.promote_types(input.dtype, target.dtype))
