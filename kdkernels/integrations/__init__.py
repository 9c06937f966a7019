"""kdkernels inside other libraries' training stacks.

* :mod:`kdkernels.integrations.hf`: Hugging Face causal LMs (``pip install "kdkernels[hf]"``):
  ``lm_head_of``, ``hidden_states_of`` and ``DistillationTrainer``, a ``transformers.Trainer``
  whose loss is :func:`kdkernels.fused_linear_kl` on the two models' final hidden states.
* :mod:`kdkernels.integrations.trl`: TRL's ``GKDTrainer`` with its generalized JSD fused.

Nothing is imported here: ``transformers`` is imported by the submodule alone.
"""
