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

Only a single process (``world_size=1``) is supported: with ``world_size > 1`` open_clip gathers
the features of every rank, which this module does not do.
"""

from __future__ import annotations

import torch

from kdkernels.contrastive import clip_distill, info_nce

__all__ = ["ClipLoss", "DistillClipLoss", "SigLipLoss"]


def _log_scale(logit_scale, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(logit_scale, torch.Tensor):
        logit_scale = torch.tensor(float(logit_scale), dtype=torch.float32, device=like.device)
    return torch.log(logit_scale.reshape(()))


def _single_process(world_size: int, name: str) -> None:
    if world_size != 1:
        raise ValueError(f"kdkernels.compat.open_clip.{name}: only world_size=1 is supported (open_clip gathers "
                         f"the features of all ranks when world_size > 1), got world_size={world_size}")


class ClipLoss(torch.nn.Module):
    """open_clip's ``ClipLoss`` (single process): the symmetric InfoNCE of CLIP."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False):
        super().__init__()
        _single_process(world_size, type(self).__name__)
        self.local_loss, self.gather_with_grad, self.cache_labels = local_loss, gather_with_grad, cache_labels
        self.rank, self.world_size, self.use_horovod = rank, world_size, use_horovod

    def _contrastive(self, image_features, text_features, logit_scale, logit_bias=None):
        loss = info_nce(image_features, text_features, logit_scale=_log_scale(logit_scale, image_features))
        if isinstance(logit_bias, torch.Tensor) and logit_bias.requires_grad:
            loss = loss + 0.0 * logit_bias.sum()  # the bias cancels in the softmaxes: a zero gradient
        return loss

    def forward(self, image_features, text_features, logit_scale, logit_bias=None, output_dict: bool = False):
        loss = self._contrastive(image_features, text_features, logit_scale, logit_bias)
        return {"contrastive_loss": loss} if output_dict else loss


class DistillClipLoss(ClipLoss):
    """open_clip's ``DistillClipLoss`` (single process): CLIP's loss and the distillation of the
    teacher's image-text similarity rows and columns."""

    def forward(self, image_features, text_features, logit_scale, dist_image_features, dist_text_features,
                dist_logit_scale, output_dict: bool = False):
        # both losses from one pass over the tiles of the student's similarities (and the teacher's)
        contrastive, distill = clip_distill(image_features, text_features, dist_image_features,
                                                dist_text_features, _log_scale(logit_scale, image_features),
                                                float(dist_logit_scale))
        if output_dict:
            return {"contrastive_loss": contrastive, "distill_loss": distill}
        return contrastive, distill


class SigLipLoss(torch.nn.Module):
    """open_clip's ``SigLipLoss`` (single process): the pairwise sigmoid loss."""

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1, dist_impl=None):
        super().__init__()
        _single_process(world_size, type(self).__name__)
        self.cache_labels, self.rank, self.world_size = cache_labels, rank, world_size
        self.dist_impl = dist_impl or "bidir"

    def forward(self, image_features, text_features, logit_scale, logit_bias, output_dict: bool = False):
        bias = logit_bias if isinstance(logit_bias, torch.Tensor) else \
            torch.tensor(float(logit_bias), device=image_features.device)
        loss = info_nce(image_features, text_features, logit_scale=_log_scale(logit_scale, image_features),
                           logit_bias=bias.reshape(()), variant="sigmoid")
        return {"contrastive_loss": loss} if output_dict else loss
