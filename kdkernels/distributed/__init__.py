"""Distillation losses over tensors sharded across processes (``torch.distributed``).

* :func:`vocab_parallel_kl`: the lm_head's vocabulary is split across ranks (tensor
  parallelism): each rank holds ``[..., V_rank]`` student and teacher logits for its slice of the
  vocabulary; the loss and gradients equal those of :func:`kdkernels.softmax_kl` on the full rows.
* :func:`vocab_parallel_fused_linear_kl`: the same from the hidden states and each rank's slice of
  the lm_head weights (column parallelism), as :func:`kdkernels.fused_linear_kl`: no logits tile
  ever leaves a rank, only per-row statistics.
* :func:`info_nce` and :func:`similarity_kd`: the contrastive and relational losses over the global
  batch of a data-parallel job (embeddings all-gathered with gradients; no rank forms an ``N x N``
  matrix).
* :mod:`~kdkernels.distributed.sharded`: ``kdkernels.fused_linear_kl`` and
  ``kdkernels.fused_linear_topk_kl`` with DTensor weights (the vocab-parallel loss for weights
  sharded on the vocabulary, else the weights gathered for the call).
"""

from kdkernels.distributed import sharded  # noqa: F401  (registers the DTensor handlers)
from kdkernels.distributed.similarity import info_nce, similarity_kd
from kdkernels.distributed.vocab_parallel import vocab_parallel_fused_linear_kl, vocab_parallel_kl

__all__ = ["vocab_parallel_kl", "vocab_parallel_fused_linear_kl", "info_nce", "similarity_kd"]
