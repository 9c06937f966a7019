"""Hint loss (FitNets): MSE between a learnable projection of the student's features and the
teacher's, ``F.mse_loss(student_feat · Wᵀ + b, teacher_feat)``, forward + backward (gradients to
the student's features, the projection's weight and bias; the teacher is frozen).

Inputs: student features ``[N, Ds]`` (requires grad), the projection ``W [Dt, Ds]`` and ``b [Dt]``
(require grad), teacher features ``[N, Dt]``. Shapes are ``N x Ds x Dt``. Eager PyTorch (and
``torch.compile`` of it) forms the projected ``[N, Dt]`` tensor and the difference and keeps them
for backward; kdkernels forms neither.

Minimum traffic of one forward+backward: read the student's features, W, b and the teacher's
features, write the three gradients: ``item * (2 N Ds + 2 Dt Ds + 2 Dt + N Dt)`` bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.common import CompiledProvider, Family, Provider, kdkernels_providers

SHAPES = [(8192, 1024, 4096), (32768, 512, 2048)]  # N x Ds x Dt
QUICK_SHAPES = [(2048, 256, 1024)]


def make_inputs(shape, dtype, device, seed=0):
    n, ds, dt = shape
    g = torch.Generator(device=device).manual_seed(seed)
    return {"x": torch.randn(n, ds, device=device, generator=g).to(dtype).requires_grad_(),
            "w": (torch.randn(dt, ds, device=device, generator=g) / ds ** 0.5).to(dtype).requires_grad_(),
            "b": torch.zeros(dt, device=device).to(dtype).requires_grad_(),
            "t": torch.randn(n, dt, device=device, generator=g).to(dtype)}


def min_bytes(shape, dtype):
    n, ds, dt = shape
    item = torch.empty((), dtype=dtype).element_size()
    return item * (2 * n * ds + 2 * dt * ds + 2 * dt + n * dt)


def eager_loss(x, w, b, t):
    return F.mse_loss(F.linear(x, w, b).float(), t.float())


def kdkernels_loss(backend):
    import kdkernels

    def loss(x, w, b, t):
        return kdkernels.projected_feature_loss(x, w, t, bias=b, metric="mse", backend=backend)

    return loss


def providers(device, notes):
    ours = kdkernels_providers(device, kdkernels_loss, notes)
    if any(p.name == "kdkernels-cuda" for p in ours):
        notes.append("kdkernels-cuda not run: projected_feature_loss has no CUDA C++ kernel (Triton runs it on CUDA)")
        ours = [p for p in ours if p.name != "kdkernels-cuda"]
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *ours]


FAMILY = Family(
    name="projected_feature",
    title="hint loss: MSE of a learnable projection of the student's features to the teacher's, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(4, 8, 16),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
    dims="N×Ds×Dt",
)
