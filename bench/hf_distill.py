"""One distillation step of Hugging Face Llama models: the Trainer computing logits against
:func:`kdkernels.integrations.hf.distillation_loss`, forward + backward.

A case is ``N×V``: ``N`` tokens (rows of 256) at a vocabulary of ``V``. The student is a Llama of
width 256 and 2 layers, the teacher one of width 512 and 2 layers (random weights, float32;
``transformers`` must be installed). Both providers run both trunks (the teacher under
``no_grad``) and the loss ``0.1 CE + 0.9 T² KL(p_t || p_s)`` at T = 2 over the shifted tokens:

* ``eager``: what ``transformers.Trainer`` with a KL loss computes today: each model's forward
  returns its ``[N, V]`` logits, then ``log_softmax`` and ``kl_div`` in float32;
* ``kdkernels-<backend>``: ``distillation_loss`` (the final hidden states and the lm_heads into
  ``fused_linear_kl``; no ``[N, V]`` tensor).

The gradients compared are every student parameter's. Minimum traffic: the two lm_head weights
and the two hidden-state matrices, read once (``(V + N) (256 + 512)`` floats): what the loss alone
must read; the trunks' work comes on top for every provider.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import Family, Provider, kdkernels_providers

TEMPERATURE, ALPHA = 2.0, 0.1
STUDENT, TEACHER = (256, 2), (512, 2)
SEQ = 256
SHAPES = [(512, 32000), (512, 128256)]


def _llama(vocab, hidden, layers, dtype, device):
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                   num_key_value_heads=max(1, hidden // 128), max_position_embeddings=SEQ)
    return transformers.LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def make_inputs(shape, dtype, device, seed=0):
    n, vocab = shape
    torch.manual_seed(seed)
    student, teacher = _llama(vocab, *STUDENT, dtype, device), _llama(vocab, *TEACHER, dtype, device)
    teacher.requires_grad_(False)
    ids = torch.randint(0, vocab, (max(1, n // SEQ), min(n, SEQ)), device=device)
    inputs = {"input_ids": ids, "labels": ids, "models": (student, teacher)}
    inputs.update({f"student.{k}": p for k, p in student.named_parameters()})  # their grads are compared
    return inputs


def eager_loss(input_ids, labels, models, **_params):
    student, teacher = models
    s = student(input_ids=input_ids).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(input_ids=input_ids).logits[:, :-1].float()
    y = labels[:, 1:].reshape(-1)
    s, t = s.reshape(y.numel(), -1), t.reshape(y.numel(), -1)
    kd = F.kl_div(F.log_softmax(s / TEMPERATURE, -1), F.log_softmax(t / TEMPERATURE, -1), reduction="batchmean",
                  log_target=True)
    return ALPHA * F.cross_entropy(s, y) + (1 - ALPHA) * TEMPERATURE ** 2 * kd


def kdkernels_loss(backend):
    from kdkernels.integrations.hf import distillation_loss

    def loss(input_ids, labels, models, **_params):
        student, teacher = models
        return distillation_loss(student, teacher, {"input_ids": input_ids, "labels": labels},
                                 temperature=TEMPERATURE, alpha=ALPHA, backend=backend)

    return loss


def min_bytes(shape, dtype):
    n, vocab = shape
    width = STUDENT[0] + TEACHER[0]
    return (vocab + n) * width * torch.empty((), dtype=dtype).element_size()


def providers(device, notes):
    try:
        import transformers  # noqa: F401
    except ImportError:
        notes.append('hf_distill skipped: transformers is not installed (pip install "kdkernels[hf]")')
        return []
    return [Provider("eager", eager_loss), *kdkernels_providers(device, kdkernels_loss, notes)]


FAMILY = Family(name="hf_distill",
                title=f"Hugging Face Llama step: student {STUDENT[0]}x{STUDENT[1]} layers from teacher "
                      f"{TEACHER[0]}x{TEACHER[1]}, {ALPHA:g} CE + KL at T={TEMPERATURE:g}, both trunks, "
                      "forward+backward",
                shapes=SHAPES, quick_shapes=SHAPES[:1], tiny_shape=(32, 1000), make_inputs=make_inputs,
                min_bytes=min_bytes, providers=providers)
