"""open_clip's contrastive losses (``open_clip.loss``) on the tiled kdkernels losses.

Replace ``from open_clip.loss import ClipLoss`` (and ``DistillClipLoss``, ``SigLipLoss``) by
``from kdkernels.compat.open_clip import ClipLoss``: same constructors, same ``forward`` arguments
and return values, same results, without the ``N x N`` logits (and their softmaxes) that
open_clip keeps for backward. As in open_clip, ``logit_scale`` is the multiplier itself (the
model's ``logit_scale.exp()``), and the features are used as given (open_clip's models normalize
them).

* ``ClipLoss``: ``(CE(S, y) + CE(Sᵀ, y)) / 2`` with ``S = logit_scale · image @ textᵀ`` and
  ``y = arange(N)``: :func:`kdkernels.info_nce`. A ``logit_bias`` cancels in both softmaxes (its
  gradient is 0, as in open_clip).
* ``DistillClipLoss``: returns ``(contrastive_loss, distill_loss)``; the distillation term is
  open_clip's soft cross-entropy ``-Σ softmax(S_teacher) log softmax(S_student)`` averaged over
  rows and over columns (forward KL of :func:`kdkernels.similarity_kd` plus the teacher's entropy).
  Both terms come from one pass over the tiles of ``S`` and of the teacher's similarities: they
  share ``S`` and its log-sum-exps (:func:`kdkernels.clip_distill`).
* ``SigLipLoss``: ``-Σ log σ(z ∘ (S + logit_bias)) / N``: :func:`kdkernels.info_nce` with
  ``variant="sigmoid"``.

With ``world_size > 1`` (an initialized ``torch.distributed`` group) the features of every rank
are gathered as open_clip gathers them (``gather_with_grad``: with gradients to their owners;
without: the other ranks' as constants, the own rank's live unless ``local_loss``) and the tiled
losses run on them: ``local_loss=True`` gives each rank its own anchors' rows against the gathered
batch (``[n_rank, N]`` tiles, labels offset by ``n_rank · rank``), ``local_loss=False`` the global
``N × N`` loss on every rank, never formed. ``SigLipLoss`` (every ``dist_impl``) is each rank's
images against every rank's texts, the other ranks' texts negatives only. ``DistillClipLoss``
takes ``local_loss=False`` only. open_clip assumes equal local batches; so does this module.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from kdkernels.contrastive import clip_distill, info_nce

__all__ = ["ClipLoss", "DistillClipLoss", "SigLipLoss"]


def _log_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=like.device)
    return torch.log(logit_scale.reshape(()))


def _check_world(world_size: int, rank: int, name: str) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"kdkernels.compat.open_clip.{name}: rank must be in [0, world_size), got rank={rank}, "
                         f"world_size={world_size}")


def _gather(x: torch.Tensor, local_loss: bool, with_grad: bool, rank: int, world_size: int) -> torch.Tensor:
    """open_clip's ``gather_features`` for one tensor: every rank's rows in rank order."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("kdkernels.compat.open_clip: world_size > 1 needs an initialized torch.distributed "
                           "process group")
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        return torch.cat(all_gather(x.contiguous()), 0)
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    if not local_loss:  # the own rank's rows keep their gradient, as in open_clip
        parts[rank] = x
    return torch.cat(parts, 0)


class ClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss``: the symmetric InfoNCE of CLIP (over every rank's features when
    ``world_size > 1``)."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        _check_world(world_size, rank, type(self).__name__)
        if use_horovod:
            raise ValueError(f"kdkernels.compat.open_clip.{type(self).__name__}: use_horovod is not supported "
                             f"(torch.distributed gathers the features)")
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod

    def _all(self, *xs):
        return [_gather(x, self.local_loss, self.gather_with_grad, self.rank, self.world_size) for x in xs]

    def _contrastive(self, image_features, text_features, logit_scale, logit_bias=None):
        ls = _log_scale(logit_scale, image_features)
        if self.world_size == 1:
            loss = info_nce(image_features, text_features, logit_scale=ls)
        elif self.local_loss:  # this rank's anchors against the gathered batch, both directions
            all_image, all_text = self._all(image_features, text_features)
            n = image_features.shape[0]
            labels = torch.arange(n, device=image_features.device) + n * self.rank
            loss = 0.5 * (info_nce(image_features, all_text, logit_scale=ls, labels=labels, symmetric=False)
                          + info_nce(text_features, all_image, logit_scale=ls, labels=labels, symmetric=False))
        else:  # the global loss, on every rank
            loss = info_nce(*self._all(image_features, text_features), logit_scale=ls)
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # the bias cancels in the softmaxes: a zero gradient
        return loss

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = self._contrastive(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss``: CLIP's loss and the distillation of the teacher's image-text
    similarity rows and columns (``world_size > 1``: over every rank's features, ``local_loss=False``)."""

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        if self.world_size > 1:
            if self.local_loss:
                raise ValueError("kdkernels.compat.open_clip.DistillClipLoss: local_loss=True with world_size > 1 "
                                 "is not supported; local_loss=False computes the global loss on every rank")
            image_features, text_features, dist_image_features, dist_text_features = self._all(
                image_features, text_features, dist_image_features, dist_text_features)
        # both losses from one pass over the tiles of the student's similarities (and the teacher's)
        contrastive, distill = clip_distill(image_features, text_features, dist_image_features,
                                                dist_text_features, _log_scale(logit_scale, image_features),
                                                float(dist_logit_scale))
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(torch.nn.Module):
    """open_clip's ``SigLipLoss``: the pairwise sigmoid loss (``world_size > 1``: this rank's images
    against every rank's texts, whatever ``dist_impl``: they all compute that sum)."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None):
        super().__init__()
        _check_world(world_size, rank, type(self).__name__)
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"
        if self.dist_impl not in ("bidir", "shift", "reduce", "gather"):
            raise ValueError(f"dist_impl must be one of 'bidir', 'shift', 'reduce', 'gather', got {dist_impl!r}")

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        bias = logit_bias if isinstance(logit_bias, torch.Tensor) else \
            torch.tensor(float(logit_bias), device=image_features.device)
        labels = None
        if self.world_size > 1:  # the texts of every rank, with gradients to their owners (open_clip's exchange)
            n = image_features.shape[0]
            text_features = _gather(text_features, True, True, self.rank, self.world_size)
            labels = torch.arange(n, device=image_features.device) + n * self.rank
        loss = info_nce(image_features, text_features, logit_scale=_log_scale(logit_scale, image_features),
                        logit_bias=bias.reshape(()), labels=labels, variant="sigmoid")
        return {"contrastive_loss": loss} if output_dict else loss
