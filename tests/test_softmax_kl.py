"""softmax_kl / distill_loss / nn modules: every backend against the float64 reference."""

import math
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, HAS_PEAK_RSS_RESET, assert_close, backend_device_params

import kdkernels
from kdkernels import reference
from kdkernels._core import debug as _debug

KINDS = ["forward", "reverse", "jsd"]
HALF = [torch.float32, torch.bfloat16, torch.float16]
VOCABS = [1, 7, 1000, 32001, 131073]


def make_logits(n, v, dtype, device, scale=3.0, related=True):
    """Student and teacher logits; the teacher is a noisy copy (small, realistic divergences) or not."""
    s = torch.randn(n, v, device=device) * scale
    t = (s + torch.randn(n, v, device=device) * scale / 2) if related else torch.randn(n, v, device=device) * scale
    return s.to(dtype), t.to(dtype)


def rows_for(v):
    return 3 if v > 40000 else 6


def run_both(fn_kdk, fn_ref, s, t, labels, grad_rows, *, backend, teacher_grad=True):
    """Loss rows and the input gradients from kdkernels (poisoned outputs) and the float64 reference;
    the teacher's gradients are None unless ``teacher_grad``."""
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    inputs = [s1, t1] if teacher_grad else [s1]
    with _debug.poison_outputs():
        out = fn_kdk(s1, t1, labels, backend)
        gs, *gt = torch.autograd.grad(out, inputs, grad_rows if out.dim() else grad_rows.sum())
    s2, t2 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    ref = fn_ref(s2, t2, labels)
    rgs, rgt = torch.autograd.grad(ref, [s2, t2], grad_rows.double() if ref.dim() else grad_rows.sum().double(),
                                   allow_unused=True)  # alpha = 1: the teacher is unused
    rgt = torch.zeros_like(t2) if rgt is None else rgt
    return (out, gs, gt[0] if teacher_grad else None), (ref, rgs, rgt if teacher_grad else None)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(backend, device, V, dtype, kind, seed):
    N = rows_for(V)
    s, t = make_logits(N, V, dtype, device, related=bool(seed % 2))
    labels = torch.randint(0, V, (N,), device=device)
    labels[1] = -100
    T = [0.7, 2.0][seed % 2]
    beta = 0.3
    go = torch.rand(N, device=device) + 0.5  # grad_output != 1, different per row

    def kdk(s_, t_, lab, b):
        return kdkernels.softmax_kl(s_, t_, temperature=T, divergence=kind, beta=beta, labels=lab, reduction="none",
                                    backend=b)

    def ref(s_, t_, lab):
        return reference.softmax_kl(s_, t_, temperature=T, divergence=kind, beta=beta, labels=lab, reduction="none")

    (out, gs, gt), (r, rgs, rgt) = run_both(kdk, ref, s, t, labels, go, backend=backend)
    assert out.dtype == torch.float32
    assert gs.dtype == dtype and gt.dtype == dtype
    assert_close(out, r, dtype, f"loss seed={seed}")
    assert_close(gs, rgs, dtype, f"grad student seed={seed}")
    assert_close(gt, rgt, dtype, f"grad teacher seed={seed}")
    assert out[1].item() == 0.0 and gs[1].abs().sum().item() == 0.0 and gt[1].abs().sum().item() == 0.0


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("V", VOCABS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("T,alpha", [(2.0, 0.0), (1.0, 0.4)])
def test_student_gradient_only(backend, device, V, dtype, T, alpha, seed):
    """The common training call: forward KL (+ CE), frozen teacher; the C++ kernel's cached path."""
    if backend == "triton" and V > 40000:
        pytest.skip("covered by test_matches_reference; the interpreter is slow")
    N = rows_for(V)
    s, t = make_logits(N, V, dtype, device, related=bool(seed % 2))
    labels = torch.randint(0, V, (N,), device=device)
    labels[-1] = -100
    go = torch.rand(N, device=device) + 0.5

    def kdk(s_, t_, lab, b):
        return kdkernels.distill_loss(s_, t_, lab, temperature=T, alpha=alpha, reduction="none", backend=b)

    def ref(s_, t_, lab):
        return reference.distill_loss(s_, t_, lab, temperature=T, alpha=alpha, reduction="none")

    (out, gs, _), (r, rgs, _) = run_both(kdk, ref, s, t, labels, go, backend=backend, teacher_grad=False)
    assert_close(out, r, dtype, f"loss seed={seed}")
    assert_close(gs, rgs, dtype, f"grad student seed={seed}")
    assert (gs[-1] == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("reduction", ["mean", "sum", "batchmean"])
@pytest.mark.parametrize("grad_scale", [1.0, 0.37])
def test_reductions(backend, device, reduction, grad_scale, seed):
    N, V = 9, 517
    s, t = make_logits(N, V, torch.float32, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[::3] = -100
    s1 = s.clone().requires_grad_()
    with _debug.poison_outputs():
        out = kdkernels.softmax_kl(s1, t, temperature=1.5, labels=labels, reduction=reduction, backend=backend)
        (out * grad_scale).backward()
    s2 = s.double().requires_grad_()
    ref = reference.softmax_kl(s2, t.double(), temperature=1.5, labels=labels, reduction=reduction)
    (ref * grad_scale).backward()
    assert out.dim() == 0
    assert_close(out, ref, torch.float32, "loss")
    assert_close(s1.grad, s2.grad, torch.float32, "grad")


SHAPES = [(1000,), (6, 1000), (2, 16, 1000), (2, 3, 4, 257)]


def _kl_div_original(s, t, T, reduction, labels=None, ignore_index=-100):
    """"batchmean": PyTorch's own F.kl_div of log_softmax(s / T) and softmax(t / T), rows masked
    by labels (the sum over kept rows divided by s.size(0)); "mean": the mean over kept rows."""
    ls, pt = F.log_softmax(s / T, -1), F.softmax(t / T, -1)
    if labels is None and reduction == "batchmean":
        return F.kl_div(ls, pt, reduction="batchmean")
    keep = torch.ones(s.shape[:-1], dtype=torch.bool) if labels is None else labels != ignore_index
    rows = F.kl_div(ls, pt, reduction="none").sum(-1) * keep
    return rows.sum() / s.size(0) if reduction == "batchmean" else rows.sum() / keep.sum()


@pytest.mark.parametrize("backend,device", backend_device_params() + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_batchmean_is_pytorchs(backend, device, shape, dtype, with_labels, seed):
    """"batchmean" is the sum (over non-ignored rows) divided by student_logits.size(0), as
    F.kl_div's: on [B, L, V] logits B, not B * L; "mean" stays the mean over non-ignored rows."""
    T = 2.0
    s = (torch.randn(shape, device=device) * 3).to(dtype)
    t = (torch.randn(shape, device=device) * 3).to(dtype)
    labels = None
    if with_labels and len(shape) > 1:
        labels = torch.randint(0, shape[-1], shape[:-1], device=device)
        labels.view(-1)[::3] = -100
    for reduction in ("batchmean", "mean"):
        s1 = s.clone().requires_grad_()
        with _debug.poison_outputs():
            out = kdkernels.softmax_kl(s1, t, temperature=T, labels=labels, reduction=reduction, backend=backend)
            g, = torch.autograd.grad(out * 0.7, s1)
        s2 = s.double().requires_grad_()
        ref = _kl_div_original(s2, t.double(), T, reduction, labels)
        rg, = torch.autograd.grad(ref * 0.7, s2)
        assert out.dtype == torch.float32 and out.shape == ()
        assert_close(out, ref, dtype, f"{reduction} loss seed={seed}")
        assert_close(g, rg, dtype, f"{reduction} grad seed={seed}")
        if labels is None and dtype == torch.float32:  # the installed original itself, same inputs
            with torch.no_grad():
                theirs = F.kl_div(F.log_softmax(s.float() / T, -1), F.softmax(t.float() / T, -1),
                                  reduction="batchmean")
            if reduction == "batchmean":
                torch.testing.assert_close(out, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_distill_loss_batchmean(backend, device, seed):
    """Both terms of distill_loss summed over non-ignored positions of [B, L, V] and divided by B."""
    B, L, V, T, alpha = 2, 16, 301, 2.0, 0.3
    s, t = (torch.randn(B, L, V, device=device) * 2 for _ in range(2))
    labels = torch.randint(0, V, (B, L), device=device)
    labels[0, :5] = -100
    s1 = s.clone().requires_grad_()
    out = kdkernels.distill_loss(s1, t, labels, temperature=T, alpha=alpha, reduction="batchmean", backend=backend)
    g, = torch.autograd.grad(out, s1)
    s2 = s.double().requires_grad_()
    keep = labels != -100
    ce = F.cross_entropy(s2.reshape(-1, V), labels.reshape(-1), reduction="sum") / B
    kd = _kl_div_original(s2, t.double(), T, "batchmean", labels)
    ref = alpha * ce + (1 - alpha) * T * T * kd
    rg, = torch.autograd.grad(ref, s2)
    assert keep.sum() < B * L
    assert_close(out, ref, torch.float32, f"loss seed={seed}")
    assert_close(g, rg, torch.float32, f"grad seed={seed}")


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.5, 0.3), (3.0, 1.0), (2.0, 0.0)])
@pytest.mark.parametrize("V", [7, 1000, 32001])
def test_distill_loss(backend, device, kind, dtype, T, alpha, V, seed):
    N = 5
    s, t = make_logits(N, V, dtype, device)
    labels = torch.randint(0, V, (N,), device=device)
    labels[2] = -7
    go = torch.rand(N, device=device) + 0.5

    def kdk(s_, t_, lab, b):
        return kdkernels.distill_loss(s_, t_, lab, temperature=T, alpha=alpha, divergence=kind, ignore_index=-7,
                                      reduction="none", backend=b)

    def ref(s_, t_, lab):
        return reference.distill_loss(s_, t_, lab, temperature=T, alpha=alpha, divergence=kind, ignore_index=-7,
                                      reduction="none")

    (out, gs, gt), (r, rgs, rgt) = run_both(kdk, ref, s, t, labels, go, backend=backend)
    assert_close(out, r, dtype, f"loss seed={seed}")
    assert_close(gs, rgs, dtype, f"grad student seed={seed}")
    assert_close(gt, rgt, dtype, f"grad teacher seed={seed}")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_jsd_beta_endpoints(backend, device, seed):
    s, t = make_logits(4, 300, torch.float32, device)
    fwd = kdkernels.softmax_kl(s, t, divergence="forward", reduction="none", backend=backend)
    rev = kdkernels.softmax_kl(s, t, divergence="reverse", reduction="none", backend=backend)
    torch.testing.assert_close(kdkernels.softmax_kl(s, t, divergence="jsd", beta=0.0, reduction="none",
                                                    backend=backend), fwd)
    torch.testing.assert_close(kdkernels.softmax_kl(s, t, divergence="jsd", beta=1.0, reduction="none",
                                                    backend=backend), rev)
    # symmetric JSD is symmetric and bounded by log 2
    j1 = kdkernels.softmax_kl(s, t, divergence="jsd", beta=0.5, reduction="none", backend=backend)
    j2 = kdkernels.softmax_kl(t, s, divergence="jsd", beta=0.5, reduction="none", backend=backend)
    torch.testing.assert_close(j1, j2, rtol=1e-5, atol=1e-6)
    assert (j1 <= math.log(2) + 1e-6).all() and (j1 >= 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params() + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_float64(backend, device, kind):
    torch.manual_seed(0)
    s = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    t = torch.randn(3, 5, dtype=torch.float64, device=device, requires_grad=True)
    labels = torch.tensor([1, -100, 4], device=device)

    def f(s_, t_):
        return kdkernels.distill_loss(s_, t_, labels, temperature=1.7, alpha=0.4, divergence=kind, beta=0.35,
                                      reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (s, t), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile(device):
    torch.manual_seed(0)
    s, t = make_logits(8, 333, torch.float32, device)
    labels = torch.randint(0, 333, (8,), device=device)

    def step(s_, t_, lab):
        loss = kdkernels.distill_loss(s_ * 1.0, t_, lab, temperature=2.0, alpha=0.25)
        return loss * 2.0

    s1 = s.clone().requires_grad_()
    eager = step(s1, t, labels)
    eager.backward()
    s2 = s.clone().requires_grad_()
    compiled = torch.compile(step, fullgraph=True,
                             backend="aot_eager" if device == "cpu" else "inductor")(s2, t, labels)
    compiled.backward()
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(s2.grad, s1.grad)


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("V", [10, 5000])
@pytest.mark.parametrize("teacher_grad", [True, False])
def test_neg_inf_padding(backend, device, kind, V, teacher_grad):
    """Padded vocabulary entries (-inf in both models) give finite losses and zero gradients there,
    including a padded prefix longer than a tile (the running max stays -inf for a while)."""
    torch.manual_seed(1)
    s, t = make_logits(4, V, torch.float32, device)
    pad = torch.zeros(V, dtype=torch.bool, device=device)
    pad[V // 3::4] = True
    pad[-1] = True
    pad[: V // 2] = V > 4096
    s[:, pad] = -math.inf
    t[:, pad] = -math.inf
    go = torch.ones(4, device=device)

    def kdk(s_, t_, lab, b):
        return kdkernels.softmax_kl(s_, t_, temperature=1.3, divergence=kind, reduction="none", backend=b)

    def ref(s_, t_, lab):
        return reference.softmax_kl(s_, t_, temperature=1.3, divergence=kind, reduction="none")

    (out, gs, gt), (r, rgs, rgt) = run_both(kdk, ref, s, t, None, go, backend=backend, teacher_grad=teacher_grad)
    assert torch.isfinite(out).all() and torch.isfinite(gs).all()
    assert (gs[:, pad] == 0).all()
    assert_close(out, r, torch.float32, "loss")
    assert_close(gs, rgs, torch.float32, "grad student")
    if teacher_grad:
        assert torch.isfinite(gt).all() and (gt[:, pad] == 0).all()
        assert_close(gt, rgt, torch.float32, "grad teacher")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_nan_propagates_to_its_row(backend, device):
    s, t = make_logits(4, 3000, torch.float32, device)
    s[2, 1234] = math.nan
    t[0, 5] = math.nan
    s.requires_grad_()
    out = kdkernels.softmax_kl(s, t, reduction="none", backend=backend)
    assert torch.isnan(out[0]) and torch.isnan(out[2])
    assert torch.isfinite(out[1]) and torch.isfinite(out[3])
    assert torch.isnan(kdkernels.softmax_kl(s, t, backend=backend))


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_all_rows_ignored(backend, device):
    s, t = make_logits(5, 100, torch.bfloat16, device)
    s.requires_grad_()
    t.requires_grad_()
    labels = torch.full((5,), -100, device=device)
    for fn in (kdkernels.softmax_kl, kdkernels.distill_loss):
        kw = {"labels": labels} if fn is kdkernels.softmax_kl else {"labels": labels, "alpha": 0.5}
        with _debug.poison_outputs():
            loss = fn(s, t, backend=backend, **kw)
            gs, gt = torch.autograd.grad(loss, [s, t])
        assert loss.item() == 0.0
        assert (gs == 0).all() and (gt == 0).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_leading_dims_noncontiguous_and_mixed_dtypes(backend, device, seed):
    big_s = torch.randn(2, 5, 2 * 700, device=device)
    s = big_s[..., :700]  # row stride 1400: not contiguous
    t = torch.randn(2, 5, 700, device=device).to(torch.bfloat16)
    labels = torch.randint(0, 700, (2, 5), device=device)
    labels[0, 0] = -100
    s1 = s.clone().requires_grad_()  # same values, contiguous, for the reference
    sv = s.detach().requires_grad_()
    out = kdkernels.distill_loss(sv, t, labels, temperature=2.0, alpha=0.5, reduction="none", backend=backend)
    assert out.shape == (2, 5)
    gs, = torch.autograd.grad(out.sum(), sv)
    ref = reference.distill_loss(s1.double(), t.double(), labels, temperature=2.0, alpha=0.5, reduction="none")
    rgs, = torch.autograd.grad(ref.sum(), s1)
    assert gs.shape == s.shape and gs.dtype == torch.float32
    assert_close(out, ref, torch.bfloat16, "loss")
    assert_close(gs, rgs, torch.float32, "grad")


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_teacher_gradient_only_when_required(backend, device):
    s, t = make_logits(3, 50, torch.float32, device)
    s.requires_grad_()
    loss = kdkernels.softmax_kl(s, t, backend=backend)
    loss.backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        nograd = kdkernels.softmax_kl(s, t, backend=backend)
    assert not nograd.requires_grad
    torch.testing.assert_close(nograd, loss.detach())


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_backward_twice_with_retain_graph(backend, device):
    s, t = make_logits(3, 64, torch.float32, device)
    s.requires_grad_()
    loss = kdkernels.softmax_kl(s, t, backend=backend)
    g1, = torch.autograd.grad(loss * 3.0, s, retain_graph=True)
    g2, = torch.autograd.grad(loss, s, retain_graph=True)
    g3, = torch.autograd.grad(loss * 3.0, s)
    torch.testing.assert_close(g1, 3.0 * g2)
    torch.testing.assert_close(g1, g3)


@pytest.mark.parametrize("device", DEVICES)
def test_modules(device):
    s, t = make_logits(4, 40, torch.float32, device)
    labels = torch.randint(0, 40, (4,), device=device)
    m = kdkernels.nn.SoftmaxKL(temperature=2.0, divergence="reverse")
    torch.testing.assert_close(m(s, t), kdkernels.softmax_kl(s, t, temperature=2.0, divergence="reverse"))
    d = kdkernels.nn.DistillationLoss(temperature=2.0, alpha=0.3)
    torch.testing.assert_close(d(s, t, labels), kdkernels.distill_loss(s, t, labels, temperature=2.0, alpha=0.3))
    assert "temperature=2.0" in repr(d)


@pytest.mark.parametrize("device", DEVICES)
def test_drop_in_for_kl_div_of_log_softmax(device):
    """The README's replacement on Hugging Face-shaped [B, L, V] logits:
    F.kl_div(log_softmax(s/T), softmax(t/T), batchmean) == softmax_kl(s, t, T, reduction="batchmean")."""
    s, t = make_logits(32, 1000, torch.float32, device)
    s, t = s.reshape(2, 16, 1000).requires_grad_(), t.reshape(2, 16, 1000)
    T = 2.0
    eager = F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
    g_eager, = torch.autograd.grad(eager, s)
    fused = kdkernels.softmax_kl(s, t, temperature=T, reduction="batchmean")
    g_fused, = torch.autograd.grad(fused, s)
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fused, g_eager, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("reduction", ["mean", "batchmean", "sum", "none"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kldivloss_drop_in(device, reduction, log_target, dtype):
    x = torch.randn(7, 333, device=device).log_softmax(-1).to(dtype).requires_grad_()
    target = torch.randn(7, 333, device=device).softmax(-1)
    target[0, :10] = 0.0
    target = (target.log() if log_target else target).to(dtype)
    ours = kdkernels.nn.KLDivLoss(reduction=reduction, log_target=log_target)
    assert isinstance(ours, torch.nn.KLDivLoss)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about reduction="mean"
        theirs = torch.nn.KLDivLoss(reduction=reduction, log_target=log_target)(x, target)
    a = ours(x, target)
    ga, = torch.autograd.grad(a.sum() * 1.5, x)
    gb, = torch.autograd.grad(theirs.sum() * 1.5, x)
    assert a.dtype == theirs.dtype and a.shape == theirs.shape
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-3)
    torch.testing.assert_close(a, theirs, equal_nan=True, **tol)  # log_target with log(0): NaN like torch
    torch.testing.assert_close(ga, gb, equal_nan=True, **tol)


# ---------------------------------------------------------------------------------- bad input

def _bad_cases():
    s = torch.randn(4, 10)
    t = torch.randn(4, 10)
    lab = torch.randint(0, 10, (4,))
    f = kdkernels.softmax_kl
    d = kdkernels.distill_loss
    return [
        ("shape", lambda: f(s, torch.randn(4, 11)), ValueError, "different vocabulary sizes, 10 and 11"),
        ("dtype int", lambda: f(s.long(), t), TypeError, "student_logits"),
        ("dtype int teacher", lambda: f(s, t.int()), TypeError, "teacher_logits"),
        ("not a tensor", lambda: f(s.tolist(), t), TypeError, "student_logits"),
        ("0-d", lambda: f(torch.tensor(1.0), torch.tensor(1.0)), ValueError, "vocabulary"),
        ("V=0", lambda: f(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "V = 0"),
        ("temperature 0", lambda: f(s, t, temperature=0.0), ValueError, "temperature"),
        ("temperature <0", lambda: f(s, t, temperature=-1.0), ValueError, "temperature"),
        ("temperature nan", lambda: f(s, t, temperature=float("nan")), ValueError, "temperature"),
        ("temperature str", lambda: f(s, t, temperature="2"), TypeError, "temperature"),
        ("beta >1", lambda: f(s, t, divergence="jsd", beta=1.5), ValueError, "beta"),
        ("beta <0", lambda: f(s, t, divergence="jsd", beta=-0.1), ValueError, "beta"),
        ("alpha", lambda: d(s, t, lab, alpha=1.2), ValueError, "alpha"),
        ("alpha without labels", lambda: d(s, t, alpha=0.5), ValueError, "labels"),
        ("divergence", lambda: f(s, t, divergence="kl"), ValueError, "divergence"),
        ("reduction", lambda: f(s, t, reduction="avg"), ValueError, "reduction"),
        ("backend", lambda: f(s, t, backend="mps"), ValueError, "backend"),
        ("cuda backend", lambda: f(s, t, backend="cuda"), ValueError, "backend='cuda'"),
        ("labels shape", lambda: f(s, t, labels=torch.zeros(5, dtype=torch.long)), ValueError, "labels"),
        ("labels float", lambda: f(s, t, labels=torch.zeros(4)), TypeError, "labels"),
        ("labels range", lambda: f(s, t, labels=torch.tensor([0, 1, 10, 2])), ValueError, "labels"),
        ("labels negative", lambda: f(s, t, labels=torch.tensor([0, -1, 3, 2])), ValueError, "labels"),
        ("labels range distill", lambda: d(s, t, torch.tensor([0, 1, 99, 2]), alpha=0.5), ValueError, "labels"),
        ("ignore_index type", lambda: f(s, t, labels=lab, ignore_index=1.5), TypeError, "ignore_index"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        call()


def test_device_mismatch():
    other = "cuda" if torch.cuda.is_available() else "meta"  # any second device shows the check
    with pytest.raises(ValueError, match="same device"):
        kdkernels.softmax_kl(torch.randn(2, 3), torch.randn(2, 3, device=other))
    with pytest.raises(ValueError, match="labels must be on"):
        kdkernels.softmax_kl(torch.randn(2, 3), torch.randn(2, 3),
                             labels=torch.zeros(2, dtype=torch.long, device=other))


def test_empty_batch():
    s = torch.randn(0, 10, requires_grad=True)
    t = torch.randn(0, 10)
    assert kdkernels.softmax_kl(s, t).item() == 0.0
    assert kdkernels.softmax_kl(s, t, reduction="none").shape == (0,)
    # F.kl_div's batchmean divides the empty sum by size(0) = 0
    assert torch.isnan(F.kl_div(s.log_softmax(-1), t.softmax(-1), reduction="batchmean"))
    assert torch.isnan(kdkernels.softmax_kl(s, t, reduction="batchmean"))


# ------------------------------------------------------------------------------------ memory

MEMORY_PROBE = textwrap.dedent("""
    import sys, torch
    import torch.nn.functional as F
    import kdkernels
    torch.set_num_threads(1)
    which, N, V = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    s = torch.randn(N, V, requires_grad=True); t = torch.randn(N, V)
    tiny_s = torch.randn(2, 8, requires_grad=True)
    def eager(s, t):
        return F.kl_div(F.log_softmax(s / 2, -1), F.log_softmax(t / 2, -1), reduction="batchmean", log_target=True)
    def fused(s, t):
        return kdkernels.softmax_kl(s, t, temperature=2.0, backend="cpu")
    fn = fused if which == "fused" else eager
    fn(tiny_s, torch.randn(2, 8)).backward()  # load code paths before the baseline
    from kdkernels._core.memory import peak_extra_bytes  # the peak-RSS counter reset first
    print(peak_extra_bytes(lambda: fn(s, t).backward()))
""")


def _extra_bytes(which, N, V):
    out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, which, str(N), str(V)], capture_output=True,
                         text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return int(out.stdout.strip().splitlines()[-1])


def test_peak_memory_is_the_gradient_buffer():
    """The fused loss's peak extra memory is its gradient plus O(rows); eager needs several N x V."""
    N, V = 128, 131072
    grad_bytes = N * V * 4
    fused = _extra_bytes("fused", N, V)
    eager = _extra_bytes("eager", N, V)
    assert fused <= grad_bytes + 24 * 2**20, f"fused extra {fused / 2**20:.1f} MiB, " \
        f"gradient {grad_bytes / 2**20:.0f} MiB"
    assert eager >= 2 * grad_bytes, f"eager extra {eager / 2**20:.1f} MiB: the probe is not measuring"


@pytest.mark.parametrize("backend,device", backend_device_params())
def test_autocast(backend, device):
    """Inside torch.autocast the logits losses compute what they compute outside it (their kernels
    have no matmul): bf16 logits from an autocast model, a float32 loss."""
    s, t = make_logits(6, 1000, torch.bfloat16, device)
    labels = torch.randint(0, 1000, (6,), device=device)
    s1 = s.clone().requires_grad_()
    with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16):
        out = kdkernels.distill_loss(s1, t, labels, temperature=2.0, alpha=0.5, backend=backend)
        top = torch.log_softmax(t.float(), -1).topk(16, -1)
        k = kdkernels.topk_kl(s1, top.values, top.indices, backend=backend)
    g, = torch.autograd.grad(out, s1)
    assert out.dtype == k.dtype == torch.float32 and g.dtype == torch.bfloat16
    torch.testing.assert_close(out, kdkernels.distill_loss(s, t, labels, temperature=2.0, alpha=0.5, backend=backend))


@pytest.mark.parametrize("backend,device", backend_device_params() + [pytest.param("torch", "cpu", id="torch-cpu")])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_out_of_range_label_fails_visibly(backend, device, compiled):
    """Eager, a label outside [0, V) is a ValueError. Under torch.compile that check cannot run
    (it would read the labels on the host while tracing): the kernel makes the row's loss and
    gradients NaN instead of a wrong cross-entropy (50,000 at V = 1000 used to compute one), and
    the other rows are what they are with a valid label."""
    V = 1000
    s, t = make_logits(4, V, torch.float32, device)
    labels = torch.tensor([3, 50000, -100, 7], device=device)

    def step(s, t, labels, reduction):
        return kdkernels.distill_loss(s, t, labels, temperature=2.0, alpha=0.5, reduction=reduction, backend=backend)

    if not compiled:
        with pytest.raises(ValueError, match="labels must be in"):
            step(s, t, labels, "mean")
        return
    fn = torch.compile(step, fullgraph=True, backend="eager")
    s1 = s.clone().requires_grad_()
    rows = fn(s1, t, labels, "none")
    g, = torch.autograd.grad(rows.sum(), s1)
    assert torch.isnan(rows[1]) and torch.isnan(g[1]).all()
    ok = labels.clone()
    ok[1] = 0
    good = step(s, t, ok, "none")
    torch.testing.assert_close(rows[[0, 2, 3]], good[[0, 2, 3]])
    assert rows[2] == 0 and (g[2] == 0).all() and torch.isfinite(g[[0, 3]]).all()
    assert torch.isnan(fn(s, t, labels, "mean"))
    # without the cross-entropy a label only masks its row: any value but ignore_index keeps it
    kl = torch.compile(lambda s, t, lab: kdkernels.softmax_kl(s, t, labels=lab, reduction="none", backend=backend),
                       fullgraph=True, backend="eager")(s, t, labels)
    assert torch.isfinite(kl).all()


@pytest.mark.parametrize("backend,device", backend_device_params())
@pytest.mark.parametrize("teacher_shift", ["same", "other"])
def test_causal_shift_views_are_read_in_place(backend, device, teacher_shift, seed):
    """logits[:, :-1] (and the teacher's [:, 1:] or a plain [B, L-1, V] tensor) with labels[:, 1:]:
    the rows are read through their strides, nothing of the logits' size is allocated before the
    kernel, and loss and gradients (to the full tensors) are the float64 reference's."""
    from conftest import LargeOutputs

    B, L, V = 2, 9, 1000
    s_full = (torch.randn(B, L, V, device=device) * 3).requires_grad_()
    t_full = (torch.randn(B, L, V, device=device) * 3).requires_grad_()
    labels = torch.randint(0, V, (B, L), device=device)
    labels[0, 2] = -100
    s = s_full[:, :-1]
    t = t_full[:, :-1] if teacher_shift == "same" else t_full[:, 1:]
    assert not s.is_contiguous()
    with _debug.poison_outputs(), LargeOutputs(B * (L - 1) * V // 2) as big:
        out = kdkernels.distill_loss(s, t, labels[:, 1:], temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4,
                                     reduction="batchmean", backend=backend)
    assert big.seen == [], f"copies before the kernel: {big.seen}"
    gs, gt = torch.autograd.grad(out * 0.8, [s_full, t_full])
    s64, t64 = s_full.detach().double().requires_grad_(), t_full.detach().double().requires_grad_()
    tv = t64[:, :-1] if teacher_shift == "same" else t64[:, 1:]
    ref = reference.distill_loss(s64[:, :-1], tv, labels[:, 1:], temperature=2.0, alpha=0.3, divergence="jsd", beta=0.4,
                                 reduction="batchmean")
    rgs, rgt = torch.autograd.grad(ref * 0.8, [s64, t64])
    assert_close(out, ref, torch.float32, f"loss seed={seed}")
    assert_close(gs, rgs, torch.float32, f"grad student seed={seed}")
    assert_close(gt, rgt, torch.float32, f"grad teacher seed={seed}")
    assert (gs[:, -1] == 0).all()  # the last position of the full logits predicts nothing


SHIFT_PROBE = """
import sys, torch, kdkernels
B, L, V, which = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
s = torch.randn(B, L, V, requires_grad=True)
t = torch.randn(B, L, V)
labels = torch.randint(0, V, (B, L))
kdkernels.softmax_kl(torch.randn(2, 3, 8, requires_grad=True)[:, :-1], torch.randn(2, 2, 8),
                     labels=torch.zeros(2, 2, dtype=torch.long), backend="cpu").backward()  # warm-up
def forward():
    global loss
    loss = kdkernels.softmax_kl(s[:, :-1], t[:, :-1], labels=labels[:, 1:], temperature=2.0, backend="cpu")
def step():
    kdkernels.softmax_kl(s[:, :-1], t[:, :-1], labels=labels[:, 1:], temperature=2.0, backend="cpu").backward()
print(peak_extra(forward if which == "forward" else step))
"""


@pytest.mark.skipif(not HAS_PEAK_RSS_RESET, reason="needs Linux /proc peak-RSS reset")
@pytest.mark.skipif(not kdkernels.build_info()["extension"], reason="needs the C++ extension")
def test_causal_shift_costs_no_copy():
    """At 4 x 128 x 32768 fp32 (64 MiB per logits tensor): the forward of the shifted call allocates
    the gradient and nothing of the logits' size besides (a copy of each view was 2 x 63.5 MiB more);
    the whole step adds only autograd's own slice backward (one buffer of the full logits' size)."""
    from conftest import run_memory_probe

    B, L, V = 4, 128, 32768
    grad = B * (L - 1) * V * 4
    fwd = run_memory_probe(SHIFT_PROBE, B, L, V, "forward")
    step = run_memory_probe(SHIFT_PROBE, B, L, V, "step")
    assert fwd <= grad + 12 * 2**20, f"forward {fwd / 2**20:.1f} MiB, gradient {grad / 2**20:.1f} MiB"
    assert step <= grad + B * L * V * 4 + 12 * 2**20, f"step {step / 2**20:.1f} MiB"
