"""softmax-KL, forward KL(p_t || p_s) at temperature 2, forward + backward.

Student logits ``s [N, V]`` (requires grad) and teacher logits ``t [N, V]`` (no grad), same dtype.
The loss is the batch mean over rows; ``loss.backward()`` produces ``s.grad`` in ``s``'s dtype.

Minimum traffic of one forward+backward: read s, read t, write grad_s once each,
``(2 * itemsize + itemsize) * N * V`` bytes (the gradient is written in the input dtype).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import CompiledProvider, Family, Provider, kdkernels_providers, peer_provider

TEMPERATURE = 2.0

SHAPES = [(256, 32000), (64, 131072), (512, 131072), (128, 262144)]
QUICK_SHAPES = [(256, 32000), (64, 131072)]


def make_inputs(shape, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(shape, dtype=dtype, device=device, generator=g).requires_grad_()
    t = torch.randn(shape, dtype=dtype, device=device, generator=g)
    return {"s": s, "t": t}


def min_bytes(shape, dtype):
    n, v = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    return (2 * itemsize + itemsize) * n * v


def eager_loss(s, t):
    # What a user writes today; bf16 inputs are upcast inside.
    T = TEMPERATURE
    return F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
                    reduction="batchmean", log_target=True)


def kdkernels_loss(backend):
    import kdkernels

    def loss(s, t):
        return kdkernels.softmax_kl(s, t, temperature=TEMPERATURE, divergence="forward", reduction="mean",
                                    backend=backend)

    return loss


def kdkernels_cuda_streaming_loss():
    """The CUDA C++ kernels forced onto their streaming plan (each row read twice), to set beside
    the staged plan the planner picks (each row read once)."""
    import os

    inner = kdkernels_loss("cuda")

    def loss(s, t):
        os.environ["KDK_CUDA_SOFTMAX_KL_PLAN"] = "stream"
        try:
            return inner(s, t)
        finally:
            del os.environ["KDK_CUDA_SOFTMAX_KL_PLAN"]

    return loss


def _import_trl():
    import os
    import warnings

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.gkd.gkd_trainer import GKDTrainer
    return GKDTrainer.generalized_jsd_loss


def trl_loss(generalized_jsd_loss):
    # TRL's GKD loss at beta = 0 is forward KL(p_t || p_s); it computes in the input dtype
    def loss(s, t):
        return generalized_jsd_loss(s, t, beta=0.0, temperature=TEMPERATURE, reduction="batchmean")

    return loss


def _import_liger():
    from liger_kernel.transformers import LigerKLDIVLoss

    return LigerKLDIVLoss(reduction="batchmean", log_target=True)


def liger_loss(kl_div):
    # Liger-Kernel fuses the pointwise KL and its reduction; the log-softmaxes stay in PyTorch
    def loss(s, t):
        T = TEMPERATURE
        return kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1))

    return loss


def providers(device, notes):
    peers = [*peer_provider("trl", _import_trl, trl_loss, notes, "pip install .[bench]")]
    if device == "cuda":
        peers += peer_provider("liger", _import_liger, liger_loss, notes, "pip install .[bench]")
    else:
        notes.append("liger skipped: its KL-divergence loss is a Triton kernel (CUDA only)")
    ours = kdkernels_providers(device, kdkernels_loss, notes)
    if any(p.name == "kdkernels-cuda" for p in ours):
        ours.append(Provider("kdkernels-cuda-stream", kdkernels_cuda_streaming_loss()))
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *peers, *ours]


FAMILY = Family(
    name="softmax_kl",
    title=f"forward KL(p_t || p_s), T={TEMPERATURE}, batch mean, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(2, 5000),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
)


def variant_family(name: str, title: str, eager, kdkernels_loss, shapes, inputs=make_inputs) -> Family:
    """A family for a variant of this loss (the same inputs and minimum traffic): eager PyTorch,
    torch.compile of it and kdkernels' backends."""

    def providers(device, notes):
        ours = kdkernels_providers(device, kdkernels_loss, notes)
        return [Provider("eager", eager), CompiledProvider("compile", eager), *ours]

    return Family(name=name, title=title, shapes=shapes, quick_shapes=shapes[:1], tiny_shape=(2, 5000),
                  make_inputs=inputs, min_bytes=min_bytes, providers=providers)
