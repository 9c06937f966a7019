"""open_clip's ``DistillClipLoss``: CLIP's contrastive loss plus the distillation of a teacher's
image-text similarity rows and columns (soft cross-entropy), forward + backward; the step's loss
is the sum of the two terms.

Inputs: the student's image and text features ``[N, D]`` (L2-normalized, require grad) and
``log_scale`` (requires grad); the teacher's features ``[N, 2 D]`` and scale, frozen. Shapes are
``N x D``. Eager PyTorch and open_clip form four ``N x N`` logit matrices and their softmaxes;
kdkernels (``kdkernels.compat.open_clip.DistillClipLoss``: ``info_nce`` + ``similarity_kd`` + the
teacher's entropy) forms none.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.clip import load_open_clip_loss, ours, skip_dense
from bench.common import CompiledProvider, Family, Provider, peer_provider

SHAPES = [(4096, 256), (16384, 256), (65536, 256)]
QUICK_SHAPES = [(4096, 256)]


def make_inputs(shape, dtype, device, seed=0):
    n, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    feats = lambda k: F.normalize(torch.randn(n, k, device=device, generator=g), dim=-1).to(dtype)  # noqa: E731
    return {"img": feats(d).requires_grad_(), "txt": feats(d).requires_grad_(),
            "log_scale": torch.tensor(math.log(1 / 0.07), device=device).requires_grad_(),
            "t_img": feats(2 * d), "t_txt": feats(2 * d), "t_scale": torch.tensor(100.0, device=device)}


def min_bytes(shape, dtype):
    n, d = shape
    item = torch.empty((), dtype=dtype).element_size()
    return (4 * n * d + 2 * n * 2 * d) * item


def eager_loss(img, txt, log_scale, t_img, t_txt, t_scale):
    img, txt = img.float(), txt.float()
    S = log_scale.exp() * img @ txt.t()
    St = t_scale * t_img.float() @ t_txt.float().t()
    y = torch.arange(S.shape[0], device=S.device)
    contrastive = (F.cross_entropy(S, y) + F.cross_entropy(S.t(), y)) / 2
    soft_ce = lambda t, s: -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()  # noqa: E731
    return contrastive + (soft_ce(St, S) + soft_ce(St.t(), S.t())) / 2


def _wrap(loss_module):
    def loss(img, txt, log_scale, t_img, t_txt, t_scale):
        contrastive, distill = loss_module(img, txt, log_scale.exp(), t_img, t_txt, t_scale)
        return contrastive + distill

    return loss


def kdkernels_loss(backend):
    from kdkernels import clip_distill

    def loss(img, txt, log_scale, t_img, t_txt, t_scale):  # kdkernels.compat.open_clip.DistillClipLoss's op
        contrastive, distill = clip_distill(img, txt, t_img, t_txt, log_scale, float(t_scale), backend=backend)
        return contrastive + distill

    return loss


def providers(device, notes):
    peers = peer_provider("open_clip", lambda: load_open_clip_loss().DistillClipLoss(), _wrap, notes,
                          "pip install --no-deps open_clip_torch")
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *peers,
            *ours(device, kdkernels_loss)]


FAMILY = Family(
    name="distill_clip",
    title="open_clip DistillClipLoss (contrastive + distillation), forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(8, 16),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
    skip=skip_dense,
    dims="N×D",
)

