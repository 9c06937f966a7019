"""kdkernels: fused knowledge-distillation losses for PyTorch.

Each loss computes its value and its input gradients in one pass over memory (Triton kernels on
GPUs, C++ kernels on CPUs), so no ``tokens x vocab`` float32 intermediate is ever materialized.
One module per loss family holds its math, public functions and op: :mod:`kdkernels.softmax_divergence`,
:mod:`kdkernels.topk_teacher`, :mod:`kdkernels.fused_linear`, :mod:`kdkernels.fused_linear_topk`,
:mod:`kdkernels.contrastive`, :mod:`kdkernels.relational`, :mod:`kdkernels.projected_feature`
and :mod:`kdkernels.kl_div`.
"""

from kdkernels import distributed, nn, reference  # distributed: registers the DTensor handlers
from kdkernels._core.backends import available_backends
from kdkernels._core.ext import build_info
from kdkernels.contrastive import clip_distill, info_nce
from kdkernels.fused_linear import fused_linear_kl
from kdkernels.fused_linear_topk import fused_linear_topk_kl
from kdkernels.kl_div import kl_div_sum, logprob_jsd_sum
from kdkernels.projected_feature import projected_feature_loss
from kdkernels.relational import similarity_kd
from kdkernels.softmax_divergence import distill_loss, softmax_kl
from kdkernels.topk_teacher import topk_kl

__version__ = "0.1.0"

__all__ = ["softmax_kl", "distill_loss", "fused_linear_kl", "topk_kl", "fused_linear_topk_kl", "info_nce",
           "similarity_kd", "clip_distill", "projected_feature_loss", "kl_div_sum", "logprob_jsd_sum",
           "available_backends", "build_info", "distributed", "nn", "reference", "__version__"]
