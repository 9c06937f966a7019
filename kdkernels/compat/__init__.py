"""Drop-in replacements for the distillation losses of other libraries: the same names,
signatures and results, computed by the fused kdkernels kernels, so that existing code changes
only an import.

* :mod:`kdkernels.compat.trl`: ``generalized_jsd_loss`` (TRL's ``GKDTrainer.generalized_jsd_loss``);
* :mod:`kdkernels.compat.torchtune`: ``ForwardKLLoss``, ``ReverseKLLoss``, ``SymmetricKLLoss`` and their
  ``...WithChunkedOutputLoss`` forms (``torchtune.modules.loss``);
* :mod:`kdkernels.compat.liger`: ``LigerFusedLinearJSD``, ``LigerJSD``, ``LigerKLDIVLoss`` and the
  functions ``liger_fused_linear_jsd``, ``liger_jsd``, ``liger_kl_div`` (``liger_kernel.transformers``),
  and :mod:`kdkernels.compat.liger.chunked_loss`: ``LigerFusedLinearJSDLoss`` and its
  ``liger_fused_linear_jsd`` (``liger_kernel.chunked_loss``);
* :mod:`kdkernels.compat.open_clip`: ``ClipLoss``, ``DistillClipLoss``, ``SigLipLoss`` (``open_clip.loss``,
  single process).
"""

from kdkernels.compat import liger, open_clip, torchtune, trl

__all__ = ["trl", "torchtune", "liger", "open_clip"]
