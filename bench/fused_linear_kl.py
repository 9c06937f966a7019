"""Fused-linear KL: forward KL(p_t || p_s) at T = 1 from hidden states and lm_head weights,
forward + backward (gradients to the student's hidden states and weight; the teacher is frozen).

Inputs: student hidden ``hs [N, H]`` and weight ``Ws [V, H]`` (both require grad), teacher
hidden ``ht [N, H]`` and weight ``Wt [V, H]``. The loss is the mean over rows. T = 1 so that every
provider computes the same number (Liger-Kernel's fused JSD loss has no ``T**2`` factor).

This loss is bound by its matrix products, not by memory: the "minimum bytes" (read the four
inputs, write the two gradients) are reported for completeness; the number to read is the time
and the peak memory, which for kdkernels excludes any ``[N, V]`` logits tensor.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import CompiledProvider, Family, Provider, peer_provider

SHAPES = [(1024, 512, 32768), (1024, 512, 131072)]  # N x H x V
QUICK_SHAPES = [(256, 256, 8192)]


def make_inputs(shape, dtype, device, seed=0):
    n, h, v = shape
    g = torch.Generator(device=device).manual_seed(seed)
    rand = lambda *size, scale=1.0: torch.randn(*size, dtype=torch.float32, device=device,  # noqa: E731
                                                generator=g).mul_(scale).to(dtype)
    return {"hs": rand(n, h).requires_grad_(), "Ws": rand(v, h, scale=h ** -0.5).requires_grad_(),
            "ht": rand(n, h), "Wt": rand(v, h, scale=h ** -0.5)}


def min_bytes(shape, dtype):
    n, h, v = shape
    item = torch.empty((), dtype=dtype).element_size()
    return (2 * (n * h + v * h) + (n * h + v * h)) * item


def eager_loss(hs, Ws, ht, Wt):
    # what a user writes today: both logits materialized, the KL on their float32 log-softmaxes
    s = hs @ Ws.t()
    with torch.no_grad():
        t = ht @ Wt.t()
    return F.kl_div(F.log_softmax(s.float(), -1), F.log_softmax(t.float(), -1), reduction="batchmean",
                    log_target=True)


def kdkernels_loss(backend):
    import kdkernels

    def loss(hs, Ws, ht, Wt):
        return kdkernels.fused_linear_kl(hs, Ws, ht, Wt, divergence="forward", backend=backend)

    return loss


def _import_liger():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, temperature=1.0,
                                   compiled=True)


def liger_loss(module):
    # Liger-Kernel's chunked fused-linear JSD at beta = 0 (forward KL), torch.compile'd chunks of
    # 1024 rows with the full [chunk, V] logits; runs on the CPU
    def loss(hs, Ws, ht, Wt):
        labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)  # no position ignored
        return module(hs, Ws, ht, Wt, labels)

    return loss


def _import_cce():
    from cut_cross_entropy import linear_cross_entropy

    return linear_cross_entropy


def cce_loss(linear_cross_entropy):
    # Cut Cross-Entropy (torch_compile implementation): plain cross-entropy on the student only,
    # half the work of a distillation loss; a floor for what a fused-linear loss costs
    def loss(hs, Ws, ht, Wt):
        labels = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
        return linear_cross_entropy(hs, Ws, labels, impl="torch_compile")

    return loss


def providers(device, notes):
    import kdkernels

    ours = []
    if device == "cpu" and kdkernels.build_info()["extension"]:
        ours.append(Provider("kdkernels-cpu", kdkernels_loss("cpu")))
    ours.append(Provider("kdkernels-torch", kdkernels_loss("torch")))
    peers = [*peer_provider("liger", _import_liger, liger_loss, notes, "pip install liger-kernel==0.8.5"),
             *peer_provider("cce", _import_cce, cce_loss, notes, "pip install cut-cross-entropy")]
    if any(p.name == "cce" for p in peers):
        notes.append("cce computes plain cross-entropy (a different loss): its check column is expected to differ")
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *peers, *ours]


FAMILY = Family(
    name="fused_linear_kl",
    title="forward KL(p_t || p_s) from hidden states and lm_head weights, T=1, mean, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(4, 32, 256),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
    dims="N×H×V",
)
