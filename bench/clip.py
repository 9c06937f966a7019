"""CLIP's symmetric contrastive loss (InfoNCE), forward + backward.

Inputs: image and text features ``[N, D]`` (L2-normalized, both require grad) and CLIP's
learnable ``log_scale`` (a 0-d tensor, requires grad; the multiplier is ``exp(log_scale)`` = 1/0.07).
The loss is ``(CE(S, y) + CE(Sᵀ, y)) / 2`` with ``S = exp(log_scale) image textᵀ``, ``y = arange(N)``.

Shapes are ``N x D``. Eager PyTorch and open_clip hold ``S`` and its softmaxes (several ``N x N``
float32 matrices) for backward; kdkernels never forms ``S``. Cases whose ``N x N`` matrices do not
fit this machine's memory are not run for the providers that form them (see the notes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from bench.common import CompiledProvider, Family, Provider, peer_provider

SHAPES = [(4096, 256), (16384, 256), (65536, 256)]
QUICK_SHAPES = [(4096, 256)]
DENSE_LIMIT = 32768  # rows beyond which an N x N float32 matrix (4 GiB at 32768) is not formed here


def make_inputs(shape, dtype, device, seed=0):
    n, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    feats = lambda: F.normalize(torch.randn(n, d, device=device, generator=g), dim=-1).to(dtype)  # noqa: E731
    return {"img": feats().requires_grad_(), "txt": feats().requires_grad_(),
            "log_scale": torch.tensor(math.log(1 / 0.07), device=device).requires_grad_()}


def min_bytes(shape, dtype):
    n, d = shape
    item = torch.empty((), dtype=dtype).element_size()
    return 4 * n * d * item  # read both feature matrices, write both gradients


def eager_loss(img, txt, log_scale):
    S = log_scale.exp() * img.float() @ txt.float().t()
    y = torch.arange(S.shape[0], device=S.device)
    return (F.cross_entropy(S, y) + F.cross_entropy(S.t(), y)) / 2


def kdkernels_loss(backend):
    import kdkernels

    def loss(img, txt, log_scale):
        return kdkernels.info_nce(img, txt, logit_scale=log_scale, backend=backend)

    return loss


def _import_open_clip():
    return load_open_clip_loss().ClipLoss()


def open_clip_loss(clip_loss):
    # open_clip's ClipLoss takes the multiplier itself (its models pass logit_scale.exp())
    def loss(img, txt, log_scale):
        return clip_loss(img, txt, log_scale.exp())

    return loss


def load_open_clip_loss():
    """open_clip's loss.py loaded on its own: importing the open_clip package needs torchvision,
    which the CPU build of torch used here cannot load."""
    import importlib.util
    import os

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("open_clip is not installed (pip install --no-deps open_clip_torch)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def ours(device, make_loss):
    import kdkernels

    if device == "cuda":
        return [Provider("kdkernels-triton", make_loss("triton")), Provider("kdkernels-torch", make_loss("torch"))]
    backend = "cpu" if kdkernels.build_info()["extension"] else "torch"
    return [Provider(f"kdkernels-{backend}", make_loss(backend))]


def providers(device, notes):
    peers = peer_provider("open_clip", _import_open_clip, open_clip_loss, notes,
                          "pip install --no-deps open_clip_torch")
    return [Provider("eager", eager_loss), CompiledProvider("compile", eager_loss), *peers,
            *ours(device, kdkernels_loss)]


def skip_dense(provider, shape):
    if not provider.startswith("kdkernels") and shape[0] > DENSE_LIMIT:
        return f"its N x N float32 matrices ({shape[0] ** 2 * 4 / 2**30:.0f} GiB each) exceed this machine's memory"
    return None


FAMILY = Family(
    name="clip",
    title="CLIP symmetric InfoNCE, learnable logit scale, mean, forward+backward",
    shapes=SHAPES,
    quick_shapes=QUICK_SHAPES,
    tiny_shape=(8, 16),
    make_inputs=make_inputs,
    min_bytes=min_bytes,
    providers=providers,
    skip=skip_dense,
    dims="N×D",
)
