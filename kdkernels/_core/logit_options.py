r"""The options every token-level loss shares (softmax-KL, top-k, fused-linear, vocab-parallel):

* ``vocab_size``: the number of leading vocabulary entries teacher and student share. Models of
  one tokenizer often pad their embeddings to different sizes (151,936 against 152,064); entries
  past ``vocab_size`` are left out of both softmaxes (no probability mass, a zero gradient).
* ``num_items_in_batch``: Hugging Face's global token count under gradient accumulation; the loss
  is the sum over the non-ignored rows divided by it (a tensor stays on its device: no host sync).
* the logit transforms, in the order the models apply them: ``z -> logit_scale * z`` (Cohere),
  then ``z -> softcap * tanh(z / softcap)`` (Gemma 2/3's ``final_logit_softcapping``), then the
  temperature. With ``u = f(z)`` the transformed logit, ``du/dz = scale`` without a cap and
  ``scale * (1 - (u / cap)^2)`` with one, so a kernel that holds ``u`` needs no second ``tanh``
  for the gradient. A ``-inf`` logit becomes ``-cap`` (as the model computes it) with a zero
  gradient.

A transform is carried to the kernels as ``(scale, cap)`` pairs with ``cap = 0`` meaning none.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["shared_vocab", "num_items", "transforms", "transform", "transform_grad", "is_identity", "IDENTITY"]

IDENTITY = (1.0, 0.0)  # (scale, cap): no transform


def shared_vocab(what: str, Vs: int, Vt: int, vocab_size: Optional[int]) -> int:
    """The vocabulary both sides use: ``Vs == Vt`` without ``vocab_size``, else ``vocab_size``
    (in ``[1, min(Vs, Vt)]``). ``what`` names the two sizes in the error: ``"student_logits and
    teacher_logits"``."""
    if vocab_size is None:
        if Vs != Vt:
            raise ValueError(f"{what} have different vocabulary sizes, {Vs} and {Vt}: pass "
                             f"vocab_size=min(...) = {min(Vs, Vt)} to compare the {min(Vs, Vt)} leading entries "
                             f"both share (the others, padding, are left out of both softmaxes)")
        return Vs
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, Integral):
        raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
    vocab_size = int(vocab_size)
    if not 1 <= vocab_size <= min(Vs, Vt):
        raise ValueError(f"vocab_size must be in [1, {min(Vs, Vt)}] (the smaller of the vocabulary sizes {Vs} and "
                         f"{Vt} of {what}), got {vocab_size}")
    return vocab_size


def num_items(value, reduction: str, device) -> Optional[Tensor]:
    """``num_items_in_batch`` checked against ``reduction`` (it replaces the divisor of ``"mean"``,
    so any other reduction is an error) as a 0-d float tensor on ``device``, or None."""
    if value is None:
        return None
    if reduction != "mean":
        raise ValueError(f"num_items_in_batch divides the sum over the non-ignored rows by it, in place of "
                         f"reduction='mean''s divisor; leave reduction='mean', got reduction={reduction!r}")
    if isinstance(value, Tensor):
        if value.numel() != 1 or value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"num_items_in_batch must be an int or a one-element int/float tensor, got a "
                            f"{value.dtype} tensor of shape {tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=torch.float64, non_blocking=True)
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"num_items_in_batch must be an int, a one-element tensor or None, got "
                        f"{type(value).__name__}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"num_items_in_batch must be > 0 (the number of target tokens), got {value!r}")
    return torch.full((), float(value), dtype=torch.float64, device=device)


def _positive(name: str, value, default: float, none_ok: bool) -> float:
    """A finite real number > 0 (``default`` for None where ``none_ok``)."""
    if value is None and none_ok:
        return default
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number{' or None' if none_ok else ''}, got {type(value).__name__}")
    v = float(value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0{' or None' if none_ok else ''}, got {value!r}")
    return v


def _one(side: str, softcap, logit_scale) -> Tuple[float, float]:
    return (_positive(f"{side}_logit_scale", logit_scale, 1.0, True),
            _positive(f"{side}_softcap", softcap, 0.0, True))


def transforms(student_softcap=None, teacher_softcap=None, student_logit_scale=1.0,
               teacher_logit_scale=1.0) -> Tuple[Tuple[float, float], Tuple[float, float]]:
    """The checked ``((s_scale, s_cap), (t_scale, t_cap))`` of the four public options."""
    return _one("student", student_softcap, student_logit_scale), _one("teacher", teacher_softcap,
                                                                      teacher_logit_scale)


def is_identity(tf: Tuple[float, float]) -> bool:
    return tuple(tf) == IDENTITY


def transform(z: Tensor, scale: float, cap: float) -> Tensor:
    """``cap * tanh(scale * z / cap)`` (``scale * z`` when ``cap`` is 0), in ``z``'s dtype."""
    if scale != 1.0:
        z = z * scale
    if cap:
        z = torch.tanh(z * (1.0 / cap)) * cap
    return z


def transform_grad(u: Tensor, scale: float, cap: float) -> Tensor:
    """``du/dz`` from the transformed logits ``u``: ``scale * (1 - (u / cap)^2)``, or ``scale``."""
    if not cap:
        return torch.full_like(u, scale)
    r = u * (1.0 / cap)
    return (1.0 - r * r) * scale
