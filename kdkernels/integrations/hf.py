"""Hugging Face causal LMs distilled through :func:`kdkernels.fused_linear_kl`.

The fused loss needs what a ``PreTrainedModel`` computes before its ``lm_head`` (the final hidden
states, after the final norm) and the head itself (weight, bias, and the transforms its forward
applies to the logits: Gemma 2/3's ``final_logit_softcapping``, Cohere's ``logit_scale``,
Granite's ``logits_scaling``). This module reads both from any model with an output embedding:

* :func:`lm_head_of` returns ``LMHead(weight, bias, softcap, logit_scale)``;
* :func:`hidden_states_of` runs the model's own forward with ``logits_to_keep`` set to no
  position (so no ``[tokens, vocab]`` logits are formed, and wrappers such as DDP and FSDP2 see
  an ordinary forward) and returns the decoder's ``last_hidden_state``;
* :func:`distillation_loss` is the fused loss of a student and a teacher on one batch (for a
  training loop of one's own);
* :class:`DistillationTrainer` is a ``transformers.Trainer`` with a ``teacher_model`` whose
  ``compute_loss`` is ``fused_linear_kl`` on both models' hidden states, shifted for next-token
  prediction, with the labels' ``-100`` ignored and the Trainer's ``num_items_in_batch``.

The teacher runs in eval mode under ``torch.no_grad()`` with its head detached: it gets no
gradient and costs no backward work even when its parameters still require grad.
"""

from __future__ import annotations

import inspect
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from kdkernels.fused_linear import fused_linear_kl

try:
    import transformers
except ImportError as exc:  # pragma: no cover - the optional extra is missing
    raise ImportError('kdkernels.integrations.hf needs transformers: pip install "kdkernels[hf]"') from exc

__all__ = ["LMHead", "lm_head_of", "hidden_states_of", "distillation_loss", "DistillationTrainer"]


class LMHead(NamedTuple):
    """A causal LM's output layer: ``logits = transform(hidden @ weight.T + bias)`` with
    ``transform(z) = softcap * tanh(logit_scale * z / softcap)`` (``logit_scale * z`` without a
    soft-cap), the arguments :func:`kdkernels.fused_linear_kl` takes as ``student_*`` / ``teacher_*``."""

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    logit_scale: float


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel / DataParallel wrapper."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        return None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head_of(model: nn.Module) -> LMHead:
    """The output layer of a Hugging Face causal LM: ``get_output_embeddings()``'s weight and bias
    (a tied head is the input embedding's weight, as the model uses it) and, from the config,
    ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere) or ``1 / logits_scaling``
    (Granite). A ValueError names the model when it has no output embedding to read."""
    inner = _unwrap(model)
    name = type(inner).__name__
    get = getattr(inner, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(f"lm_head_of: {name} has no output embedding with a [vocab, hidden] weight "
                         f"(get_output_embeddings() gave {type(head).__name__}); kdkernels reads the lm_head "
                         "from it: pass a *ForCausalLM model")
    bias = getattr(head, "bias", None)
    cfg = _text_config(inner)
    cap = getattr(cfg, "final_logit_softcapping", None) if cfg is not None else None
    scale = 1.0
    if cfg is not None and getattr(cfg, "logit_scale", None) is not None:
        scale = float(cfg.logit_scale)
    elif cfg is not None and getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
        scale = 1.0 / float(cfg.logits_scaling)
    return LMHead(weight, bias if isinstance(bias, Tensor) else None, float(cap) if cap else None, scale)


def _accepts(fn, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params


def hidden_states_of(model: nn.Module, **batch) -> Tensor:
    """The final hidden states ``[batch, seq, hidden]`` (after the final norm) of a Hugging Face
    causal LM on ``batch`` (``input_ids``, ``attention_mask``, ...; ``labels`` is ignored), without
    computing its logits. The model's own forward runs (through a DDP / FSDP2 wrapper when
    ``model`` is one) with ``logits_to_keep`` an empty index, so its lm_head sees no position;
    the decoder's output is taken with a forward hook. A model whose forward has no
    ``logits_to_keep`` runs its decoder (``get_decoder()``) directly."""
    inner = _unwrap(model)
    batch = {k: v for k, v in batch.items() if k not in ("labels", "num_items_in_batch", "shift_labels")}
    get_decoder = getattr(inner, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    if decoder is None or decoder is inner:
        raise ValueError(f"hidden_states_of: {type(inner).__name__} has no decoder distinct from the model "
                         "(get_decoder()); pass a *ForCausalLM model")
    if not _accepts(inner.forward, "logits_to_keep"):
        out = decoder(**batch, use_cache=False)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state
    seen = []

    def grab(_module, _args, out):
        seen.append(out[0] if isinstance(out, tuple) else out.last_hidden_state)

    ref = next((v for v in batch.values() if isinstance(v, Tensor)), None)
    none = torch.empty(0, dtype=torch.long, device=ref.device if ref is not None else None)
    handle = decoder.register_forward_hook(grab)
    try:
        model(**batch, logits_to_keep=none, use_cache=False)
    finally:
        handle.remove()
    if len(seen) != 1:
        raise RuntimeError(f"hidden_states_of: {type(inner).__name__}'s decoder ran {len(seen)} times in one "
                           "forward; call it on a plain causal LM")
    return seen[0]


def distillation_loss(student: nn.Module, teacher: nn.Module, inputs: dict, *, num_items_in_batch=None,
                      **options) -> Tensor:
    """:func:`kdkernels.fused_linear_kl` of ``student`` against ``teacher`` on one batch of a causal
    LM: both trunks run (:func:`hidden_states_of`, the teacher in eval mode under ``no_grad`` with
    its head detached), the hidden state at position ``i`` and the label at ``i + 1`` make a row,
    rows labelled -100 are ignored, and the heads' bias, soft-cap and logit scale
    (:func:`lm_head_of`) are applied inside the kernel. ``inputs`` holds ``input_ids``, optionally
    ``attention_mask`` and ``labels`` (without labels: ``input_ids`` where ``attention_mask`` is
    1). ``options``: ``temperature``, ``divergence``, ``beta``, ``skew``, ``alpha``,
    ``vocab_size``, ``reduction``, ``backend`` of :func:`kdkernels.fused_linear_kl`."""
    inputs = dict(inputs)
    labels = inputs.pop("labels", None)
    if labels is None:
        labels = inputs["input_ids"].clone()
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, -100)
    hs = hidden_states_of(student, **inputs)
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            ht = hidden_states_of(teacher, **inputs)
    finally:
        teacher.train(was_training)
    head_s, head_t = lm_head_of(student), lm_head_of(teacher)
    return fused_linear_kl(
        hs[:, :-1], head_s.weight, ht[:, :-1], head_t.weight.detach(), student_bias=head_s.bias,
        teacher_bias=None if head_t.bias is None else head_t.bias.detach(), labels=labels[:, 1:],
        num_items_in_batch=num_items_in_batch, student_softcap=head_s.softcap, teacher_softcap=head_t.softcap,
        student_logit_scale=head_s.logit_scale, teacher_logit_scale=head_t.logit_scale, **options)


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` that distills ``teacher_model`` into ``model`` with
    :func:`kdkernels.fused_linear_kl`: both trunks run (:func:`hidden_states_of`), the loss takes
    their final hidden states and lm_heads (:func:`lm_head_of`), shifted for next-token prediction,
    so the ``[tokens, vocab]`` logits are never formed, by either model.

    Per position ``alpha * CE(student, label) + (1 - alpha) * T**2 * D(teacher, student)``
    (:func:`kdkernels.distill_loss`), summed over the positions whose label is not -100 and divided
    by the Trainer's ``num_items_in_batch`` (the label tokens of the whole accumulated step, across
    devices, as Hugging Face's causal-LM loss does; their count per micro-batch when there is
    none). Without ``labels`` in a batch, the positions where ``attention_mask`` is 1 are distilled.

    Args:
        teacher_model: a causal LM of the same tokenizer (vocabularies may be padded to different
            sizes: give ``vocab_size``); put in eval mode with its parameters frozen, and moved to
            the Trainer's device unless it carries a device map.
        temperature, divergence, beta, skew, alpha, vocab_size, backend: as in
            :func:`kdkernels.fused_linear_kl`.
        Everything else goes to ``transformers.Trainer``.
    """

    def __init__(self, model=None, args=None, *, teacher_model: nn.Module, temperature: float = 1.0,
                 divergence: str = "forward", beta: float = 0.5, skew: float = 0.1, alpha: float = 0.0,
                 vocab_size: Optional[int] = None, backend: str = "auto", **kwargs):
        super().__init__(model=model, args=args, **kwargs)
        if teacher_model is None:
            raise ValueError("DistillationTrainer needs a teacher_model")
        lm_head_of(teacher_model)  # a model it cannot read fails here, not at the first step
        lm_head_of(self.model)
        teacher_model.requires_grad_(False)
        teacher_model.eval()
        if getattr(teacher_model, "hf_device_map", None) is None:
            teacher_model.to(self.args.device)
        self.teacher_model = teacher_model
        self.distill_options = dict(temperature=float(temperature), divergence=divergence, beta=float(beta),
                                    skew=float(skew), alpha=float(alpha), vocab_size=vocab_size, backend=backend)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = distillation_loss(model, self.teacher_model, inputs, num_items_in_batch=num_items_in_batch,
                                 **self.distill_options)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every device's tokens and DDP averages the gradients over the
            # devices: the Trainer's own causal-LM loss is scaled back the same way
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            loss = loss * (self.accelerator.num_processes // tp if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, {"loss": loss}) if return_outputs else loss
