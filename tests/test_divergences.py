"""DistiLLM's skew KL (``skew_forward``, ``skew_reverse``) and the total variation (``tvd``) in the
softmax-KL and fused-linear losses, every backend against the float64 reference written from
their definitions (kdkernels.reference.kl_rows), with gradients; the gradient formulas are derived in
kdkernels._core.divergences."""

import math

import pytest
import torch
from conftest import assert_close, fused_backends, vocab_sum_scale

import kdkernels
from kdkernels import reference

BACKENDS = [b for b in fused_backends("cpu") if b != "cpu" or kdkernels.build_info()["extension"]] + ["torch"]
NEW = [("skew_forward", 0.1), ("skew_forward", 0.6), ("skew_reverse", 0.1), ("skew_reverse", 0.6), ("tvd", 0.1)]


def _id(case):
    return f"{case[0]}-{case[1]}" if case[0] != "tvd" else "tvd"


def _check(fn, ref_fn, s, t, dtype, what, **kw):
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = fn(s1, t1, **kw)
    go = torch.rand_like(out) + 0.5 if out.dim() else torch.tensor(0.8, dtype=out.dtype)
    gs, gt = torch.autograd.grad(out, [s1, t1], go)
    s2, t2 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = ref_fn(s2, t2, **kw)
    rgs, rgt = torch.autograd.grad(ref, [s2, t2], go.double())
    assert_close(out, ref, dtype, f"loss {what}")
    assert_close(gs, rgs, dtype, f"grad student {what}")
    assert_close(gt, rgt, dtype, f"grad teacher {what}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NEW, ids=_id)
@pytest.mark.parametrize("V", [1, 7, 1000, 9000])
def test_logits_float64(backend, case, V, seed):
    """Rows in registers and streamed (V = 9000 in the Triton kernel), CE at T != 1, per-row
    grad_output."""
    divergence, skew = case
    s = torch.randn(5, V, dtype=torch.float64) * 3
    t = s + torch.randn(5, V, dtype=torch.float64) * 2
    labels = torch.randint(0, V, (5,))
    labels[2] = -100
    kw = dict(divergence=divergence, skew=skew, temperature=1.7, alpha=0.2, labels=labels, reduction="none")
    _check(lambda a, b, **k: kdkernels.distill_loss(a, b, backend=backend, **k),
           lambda a, b, **k: reference.distill_loss(a, b, **k), s, t, torch.float64, f"{case} V={V}", **kw)


def _untie(s, t, T, dtype):
    """Moves the teacher's logit up wherever p_s and p_t agree to within what ``dtype`` resolves.
    TVD's gradient takes sign(p_s - p_t): at such a near-tie the sign (and through K1 every
    element's gradient) is set by rounding, in any float32 computation, eager PyTorch's included
    (seen at V = 32001: |log p_s - log p_t| = 4e-7 gave 2x the tolerance on every backend)."""
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    lps = torch.log_softmax(s.double() / T, -1)
    lpt = torch.log_softmax(t.double() / T, -1)
    near = (lps - lpt).abs() < tol
    return torch.where(near, t.double() + 4 * tol * T, t.double()).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NEW[::2], ids=_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("V", [1000, 32001])
def test_logits_half_precision(backend, case, dtype, V, seed):
    divergence, skew = case
    s = (torch.randn(3, V) * 3).to(dtype)
    t = (torch.randn(3, V) * 3).to(dtype)
    if divergence == "tvd":
        t = _untie(s, t, 2.0, dtype)
    _check(lambda a, b, **k: kdkernels.softmax_kl(a, b, backend=backend, **k),
           lambda a, b, **k: reference.softmax_kl(a, b, **k), s, t, dtype, str(case),
           divergence=divergence, skew=skew, temperature=2.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["skew_forward", "skew_reverse", "tvd"])
def test_neg_inf_padding_and_identical_rows(backend, divergence):
    s = torch.randn(4, 300)
    s[:, 250:] = -math.inf
    t = s.clone()
    t[:2] = torch.randn(2, 300)
    t[:, 280:] = -math.inf
    s1 = s.clone().requires_grad_()
    out = kdkernels.softmax_kl(s1, t, divergence=divergence, skew=0.3, reduction="none", backend=backend)
    (g,) = torch.autograd.grad(out.sum(), [s1])
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    assert out[2:].abs().max().item() < 1e-6  # identical rows: D = 0
    ref = reference.softmax_kl(s.double(), t.double(), divergence=divergence, skew=0.3, reduction="none")
    assert_close(out, ref, torch.float32, "loss")


@pytest.mark.parametrize("backend", BACKENDS)
def test_skew_zero_is_plain_kl(backend, seed):
    s, t = torch.randn(4, 500), torch.randn(4, 500)
    for skewed, plain in (("skew_forward", "forward"), ("skew_reverse", "reverse")):
        a = kdkernels.softmax_kl(s, t, divergence=skewed, skew=0.0, backend=backend)
        b = kdkernels.softmax_kl(s, t, divergence=plain, backend=backend)
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", NEW, ids=_id)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_fused_linear(backend, case, teacher, seed):
    divergence, skew = case
    N, H, Ht, V = 9, 32, 20, 3000
    hs = torch.randn(N, H, dtype=torch.float64).requires_grad_()
    Ws = (torch.randn(V, H, dtype=torch.float64) * 0.5).requires_grad_()
    bs = torch.randn(V, dtype=torch.float64).requires_grad_()
    if teacher == "hidden":
        t = dict(teacher_hidden=torch.randn(N, Ht, dtype=torch.float64).requires_grad_(),
                 teacher_weight=(torch.randn(V, Ht, dtype=torch.float64) * 0.5).requires_grad_())
    else:
        t = dict(teacher_logits=(torch.randn(N, V, dtype=torch.float64) * 2).requires_grad_())
    labels = torch.randint(0, V, (N,))
    labels[4] = -100
    kw = dict(divergence=divergence, skew=skew, temperature=2.0, alpha=0.3, labels=labels)
    leaves = [hs, Ws, bs, *t.values()]
    out = kdkernels.fused_linear_kl(hs, Ws, student_bias=bs, backend=backend, **t, **kw)
    g = torch.autograd.grad(out, leaves)
    r = [x.detach().clone().requires_grad_() for x in leaves]
    ref = reference.fused_linear_kl(r[0], r[1], student_bias=r[2], **dict(zip(t.keys(), r[3:])), **kw)
    rg = torch.autograd.grad(ref, r)
    assert_close(out, ref, torch.float64, "loss")
    for a, b, name in zip(g, rg, ["hs", "Ws", "bs", *t.keys()]):
        assert_close(a, b, torch.float64, f"grad {name}", scale=vocab_sum_scale(V))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_linear_float32_skew(backend, seed):
    N, H, V = 16, 64, 5000
    hs = torch.randn(N, H).requires_grad_()
    Ws = (torch.randn(V, H) * 0.3).requires_grad_()
    ht, Wt = torch.randn(N, 48), torch.randn(V, 48) * 0.3
    out = kdkernels.fused_linear_kl(hs, Ws, ht, Wt, divergence="skew_forward", skew=0.1, backend=backend)
    g = torch.autograd.grad(out, [hs, Ws])
    r = [x.detach().double().requires_grad_() for x in (hs, Ws)]
    ref = reference.fused_linear_kl(r[0], r[1], ht.double(), Wt.double(), divergence="skew_forward", skew=0.1)
    rg = torch.autograd.grad(ref, r)
    assert_close(out, ref, torch.float32, "loss")
    for a, b in zip(g, rg):
        assert_close(a, b, torch.float32, "grad", scale=vocab_sum_scale(V))


def test_bad_skew():
    s = torch.randn(2, 10)
    with pytest.raises(ValueError, match=r"skew must be in \[0.0, 1.0\]"):
        kdkernels.softmax_kl(s, s, divergence="skew_forward", skew=1.5)
    with pytest.raises(ValueError, match=r"skew must be in \[0, 1\)"):
        kdkernels.softmax_kl(s, s, divergence="skew_forward", skew=1.0)
    with pytest.raises(TypeError, match="skew must be a real number"):
        kdkernels.fused_linear_kl(torch.randn(2, 4), torch.randn(10, 4), teacher_logits=s, skew="0.1")
    with pytest.raises(ValueError, match="divergence must be one of"):
        kdkernels.softmax_kl(s, s, divergence="skew")
    with pytest.raises(ValueError, match="divergence must be one of"):  # the similarity losses keep KL and JSD
        kdkernels.similarity_kd(torch.randn(4, 3), torch.randn(4, 5), divergence="tvd")
