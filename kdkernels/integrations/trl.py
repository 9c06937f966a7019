"""TRL's ``GKDTrainer`` with its loss through the fused path.

``kdkernels.integrations.trl.GKDTrainer`` is ``trl.experimental.gkd.GKDTrainer`` (same arguments,
same ``GKDConfig``, TRL's on-policy and sequence-level generation unchanged) whose
``compute_loss`` computes TRL's generalized JSD (``beta``: 0 forward KL, 1 reverse KL, else the
JSD of the ``beta`` mixture; TRL's ``compute_loss`` leaves the loss at temperature 1, and so does
this one) with :func:`kdkernels.integrations.hf.distillation_loss`: the final hidden states and
the lm_heads of both models, never the ``[tokens, vocab]`` logits. The reduction is TRL's: the
sum over positions whose label is not -100, divided by ``num_items_in_batch`` when the Trainer
gives one, else by the number of such positions.
"""

from __future__ import annotations

from kdkernels.integrations.hf import distillation_loss

try:
    from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
except ImportError as exc:  # pragma: no cover - TRL is missing, or too old to have it here
    raise ImportError("kdkernels.integrations.trl needs TRL with trl.experimental.gkd (pip install trl)") from exc

__all__ = ["GKDTrainer"]


class GKDTrainer(_TRLGKDTrainer):
    """``trl.experimental.gkd.GKDTrainer`` with the generalized JSD fused (module docstring)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        batch = {"input_ids": inputs["input_ids"], "attention_mask": inputs["attention_mask"],
                 "labels": inputs["labels"]}
        loss = distillation_loss(model, self.teacher_model, batch, num_items_in_batch=num_items_in_batch,
                                 divergence="jsd", beta=float(self.beta), temperature=1.0, reduction="mean")
        return (loss, {"loss": loss}) if return_outputs else loss
