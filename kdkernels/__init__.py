"""kdkernels: fused knowledge-distillation losses for PyTorch.

Each loss computes its value and its input gradients in one pass over memory (Triton kernels on
GPUs, C++ kernels on CPUs), so no ``tokens x vocab`` float32 intermediate is ever materialized.
"""

from kdkernels import nn, reference
from kdkernels._ext import build_info
from kdkernels.functional import (available_backends, distill_loss, fused_linear_kl, fused_linear_topk_kl, info_nce,
                                  projected_feature_loss, similarity_kd, softmax_kl, topk_kl)

__version__ = "0.1.0"

__all__ = ["softmax_kl", "distill_loss", "fused_linear_kl", "topk_kl", "fused_linear_topk_kl", "info_nce", "similarity_kd",
           "projected_feature_loss", "available_backends", "build_info", "nn", "reference", "__version__"]
