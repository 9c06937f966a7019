"""The options every token-level loss shares (kdkernels._core.logit_options): ``vocab_size`` (padded
vocabularies of different sizes), ``num_items_in_batch`` (the global token count under gradient
accumulation) and the logit transforms (``*_logit_scale``, ``*_softcap``), on every backend, against
the float64 reference, with gradients."""

import math

import pytest
import torch
from conftest import assert_close, fused_backends, vocab_sum_scale

import kdkernels
from kdkernels import reference

HAS_EXT = kdkernels.build_info()["extension"]
# the C++ kernels, the Triton kernels (under the interpreter without a GPU), the PyTorch paths
BACKENDS = [b for b in fused_backends("cpu") if b != "cpu" or HAS_EXT] + ["torch"]
KINDS = ["forward", "reverse", "jsd"]
TRANSFORMS = [
    dict(student_softcap=4.0, teacher_softcap=6.0),                 # Gemma 2/3
    dict(student_logit_scale=0.25, teacher_logit_scale=1.5),        # Cohere
    dict(student_softcap=5.0, student_logit_scale=2.0),             # both, student only
    dict(teacher_softcap=3.0, teacher_logit_scale=0.7),             # both, teacher only
]


def _tf_id(tf):
    return "-".join(f"{k.split('_')[0][0]}{k.split('_', 1)[1][:3]}{v}" for k, v in tf.items())


def _grads(out, tensors, go):
    tensors = [x for x in tensors if x is not None and x.requires_grad]
    return torch.autograd.grad(out, tensors, go)


def logits_pair(N, Vs, Vt, dtype, scale=4.0):
    s = (torch.randn(N, Vs, dtype=torch.float64) * scale).to(dtype)
    t = (torch.randn(N, Vt, dtype=torch.float64) * scale).to(dtype)
    return s, t


def check_logits(fn, ref_fn, s, t, dtype, *, teacher_grad=True, what="", **kw):
    """fn and the float64 reference on the same inputs: loss and both gradients (per-row losses
    with grad_output != 1 for reduction="none")."""
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_(teacher_grad)
    out = fn(s1, t1, **kw)
    go = torch.rand_like(out) + 0.5 if out.dim() else torch.tensor(0.7, dtype=out.dtype)
    g = _grads(out, [s1, t1], go)
    s2, t2 = s.double().requires_grad_(), t.double().requires_grad_(teacher_grad)
    ref = ref_fn(s2, t2, **kw)
    rg = _grads(ref, [s2, t2], go.double())
    assert_close(out, ref, dtype, f"loss {what}")
    for a, b, name in zip(g, rg, ("student", "teacher")):
        assert a.dtype == dtype and a.shape == b.shape
        assert_close(a, b, dtype, f"grad {name} {what}")
    return g


# ------------------------------------------------------------------------------ vocab_size

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("Vs,Vt,vocab", [(1000, 1032, 1000), (1064, 1000, 1000), (5003, 5120, 4999), (7, 9, 7)])
@pytest.mark.parametrize("kind", KINDS)
def test_vocab_size_logits(backend, Vs, Vt, vocab, kind, seed):
    s, t = logits_pair(5, Vs, Vt, torch.float32)
    labels = torch.randint(0, vocab, (5,))
    labels[2] = -100
    kw = dict(temperature=2.0, alpha=0.3, divergence=kind, vocab_size=vocab, labels=labels)
    gs, gt = check_logits(lambda a, b, **k: kdkernels.distill_loss(a, b, backend=backend, **k),
                          lambda a, b, **k: reference.distill_loss(a, b, **k), s, t, torch.float32, **kw)
    # the padded entries: no part in either softmax, exactly zero gradients
    assert gs[:, vocab:].abs().max().item() == 0.0 if Vs > vocab else True
    assert gt[:, vocab:].abs().max().item() == 0.0 if Vt > vocab else True


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_equals_sliced_call(backend, seed):
    """The loss with vocab_size is the loss of the sliced logits (the padding has no mass), in bf16
    and with [B, L, V] leading shapes."""
    s, t = logits_pair(6, 640, 700, torch.bfloat16)
    s, t = s.reshape(2, 3, 640), t.reshape(2, 3, 700)
    a = kdkernels.softmax_kl(s, t, vocab_size=600, backend=backend, reduction="none")
    b = kdkernels.softmax_kl(s[..., :600].contiguous(), t[..., :600].contiguous(), backend=backend,
                             reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_vocab_mismatch_is_a_clear_error():
    s, t = torch.randn(2, 32000), torch.randn(2, 32064)
    with pytest.raises(ValueError, match=r"32000 and 32064.*vocab_size=min\(\.\.\.\) = 32000"):
        kdkernels.softmax_kl(s, t)
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 32000\]"):
        kdkernels.softmax_kl(s, t, vocab_size=32001)
    with pytest.raises(TypeError, match="vocab_size must be an int"):
        kdkernels.softmax_kl(s, t, vocab_size=3.0)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 100\)"):
        kdkernels.distill_loss(s, t, torch.tensor([5, 100]), alpha=0.5, vocab_size=100)
    with pytest.raises(ValueError, match="leading shape"):
        kdkernels.softmax_kl(torch.randn(3, 10), torch.randn(2, 10))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_vocab_size_fused_linear(backend, teacher, seed):
    N, H, Ht, Vs, Vt, vocab = 9, 32, 48, 1100, 1000, 990
    hs = torch.randn(N, H, dtype=torch.float64).float().requires_grad_()
    Ws = (torch.randn(Vs, H, dtype=torch.float64) / 3).float().requires_grad_()
    bs = torch.randn(Vs, dtype=torch.float64).float().requires_grad_()
    t = {}
    if teacher == "hidden":
        t["teacher_hidden"] = torch.randn(N, Ht, dtype=torch.float64).float()
        t["teacher_weight"] = (torch.randn(Vt, Ht, dtype=torch.float64) / 3).float()
        t["teacher_bias"] = torch.randn(Vt, dtype=torch.float64).float()
    else:
        t["teacher_logits"] = (torch.randn(N, Vt, dtype=torch.float64) * 2).float().requires_grad_()
    labels = torch.randint(0, vocab, (N,))
    labels[[1, 4]] = -100
    kw = dict(temperature=1.5, alpha=0.2, labels=labels, vocab_size=vocab, divergence="jsd")
    out = kdkernels.fused_linear_kl(hs, Ws, student_bias=bs, backend=backend, **t, **kw)
    leaves = [hs, Ws, bs] + [x for x in t.values() if x.requires_grad]
    g = torch.autograd.grad(out, leaves)
    r_in = {k: v.detach().double().requires_grad_(v.requires_grad) for k, v in t.items()}
    r_leaves = [x.detach().double().requires_grad_() for x in (hs, Ws, bs)]
    ref = reference.fused_linear_kl(*r_leaves[:2], student_bias=r_leaves[2], **r_in, **kw)
    rg = torch.autograd.grad(ref, r_leaves + [x for x in r_in.values() if x.requires_grad])
    assert_close(out, ref, torch.float32, "loss")
    for a, b in zip(g, rg):
        assert_close(a, b, torch.float32, "grad", scale=vocab_sum_scale(vocab))
    assert g[1][vocab:].abs().max().item() == 0.0 and g[2][vocab:].abs().max().item() == 0.0


def test_vocab_mismatch_fused_linear_error():
    hs, ht = torch.randn(2, 8), torch.randn(2, 12)
    with pytest.raises(ValueError, match=r"\(100 and 128\), pass vocab_size=min\(\.\.\.\) = 100"):
        kdkernels.fused_linear_kl(hs, torch.randn(100, 8), ht, torch.randn(128, 12))
    with pytest.raises(ValueError, match=r"vocab_size=min\(\.\.\.\) = 100"):
        kdkernels.fused_linear_kl(hs, torch.randn(100, 8), teacher_logits=torch.randn(2, 128))
    with pytest.raises(ValueError, match=r"teacher_bias must be \[V\] = \[128\]"):
        kdkernels.fused_linear_kl(hs, torch.randn(100, 8), ht, torch.randn(128, 12), teacher_bias=torch.randn(100),
                                  vocab_size=100)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_size_topk(backend, seed):
    V, vocab, k = 1050, 1000, 16
    s = (torch.randn(4, V, dtype=torch.float64) * 3).float()
    lp = torch.log_softmax(torch.randn(4, vocab, dtype=torch.float64) * 3, -1)
    vals, idx = lp.topk(k, -1)
    for tail in ("ignore", "uniform"):
        s1 = s.clone().requires_grad_()
        out = kdkernels.topk_kl(s1, vals.float(), idx, tail=tail, vocab_size=vocab, temperature=2.0, backend=backend)
        (g,) = torch.autograd.grad(out, [s1])
        s2 = s.double().requires_grad_()
        ref = reference.topk_kl(s2, vals, idx, tail=tail, vocab_size=vocab, temperature=2.0)
        (rg,) = torch.autograd.grad(ref, [s2])
        assert_close(out, ref, torch.float32, f"loss {tail}")
        assert_close(g, rg, torch.float32, f"grad {tail}")
        assert g[:, vocab:].abs().max().item() == 0.0
    with pytest.raises(ValueError, match=r"teacher_topk_indices \(below vocab_size=1000\) must be in \[0, 1000\)"):
        kdkernels.topk_kl(s, vals.float(), torch.where(idx == idx[0, 0], 1020, idx), vocab_size=vocab)


# ------------------------------------------------------------------------------ num_items_in_batch

def _micro_batches(loss_fn, inputs, labels, split, num_items):
    """The summed losses and input gradients of the micro-batches [:split], [split:] with
    num_items_in_batch, and those of the whole batch (the same inputs)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    whole = loss_fn(*leaves, labels=labels, rows=slice(None))
    gw = torch.autograd.grad(whole, leaves, allow_unused=True)
    total, parts = 0.0, [torch.zeros_like(x) for x in inputs]
    for sl in (slice(0, split), slice(split, None)):
        leaves = [x.detach()[sl].clone().requires_grad_() if x.dim() > 1 and x.shape[0] == labels.shape[0]
                  else x.detach().clone().requires_grad_() for x in inputs]
        loss = loss_fn(*leaves, labels=labels[sl], num_items_in_batch=num_items, rows=sl)
        total = total + loss
        gs = torch.autograd.grad(loss, leaves, allow_unused=True)
        for i, (x, gi) in enumerate(zip(inputs, gs)):
            if gi is None:
                continue
            if x.dim() > 1 and x.shape[0] == labels.shape[0]:
                parts[i][sl] += gi
            else:
                parts[i] += gi
    return (total, parts), (whole, gw)


def _cases():
    V, H, k = 300, 16, 8
    tk = torch.log_softmax(torch.randn(12, V, dtype=torch.float64) * 2, -1).topk(k, -1)
    return {
        "softmax_kl": (lambda s, t, rows, **kw: kdkernels.softmax_kl(s, t, divergence="jsd", **kw),
                       [torch.randn(12, V, dtype=torch.float64) * 3, torch.randn(12, V, dtype=torch.float64) * 3]),
        "distill_loss": (lambda s, t, rows, **kw: kdkernels.distill_loss(s, t, alpha=0.4, temperature=2.0, **kw),
                         [torch.randn(12, V, dtype=torch.float64) * 3, torch.randn(12, V, dtype=torch.float64) * 3]),
        "topk_kl": (lambda s, rows, **kw: kdkernels.topk_kl(s, tk.values[rows], tk.indices[rows], **kw),
                    [torch.randn(12, V, dtype=torch.float64) * 3]),
        "fused_linear_kl": (lambda h, w, ht, wt, rows, **kw: kdkernels.fused_linear_kl(h, w, ht, wt, alpha=0.3, **kw),
                            [torch.randn(12, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64) / 3,
                             torch.randn(12, 24, dtype=torch.float64), torch.randn(V, 24, dtype=torch.float64) / 3]),
    }


@pytest.mark.parametrize("name", ["softmax_kl", "distill_loss", "topk_kl", "fused_linear_kl"])
@pytest.mark.parametrize("tensor", [False, True], ids=["int", "tensor"])
def test_num_items_micro_batches_equal_the_whole_batch(name, tensor, seed):
    """Two micro-batches with unequal numbers of ignored rows, each divided by the global count,
    sum to the whole batch's mean, loss and gradients (float64, so exactly to rounding)."""
    fn, inputs = _cases()[name]
    labels = torch.randint(0, 300, (12,))
    labels[[0, 1, 2, 9]] = -100  # 3 ignored in the first micro-batch of 5, 1 in the second of 7
    n = int((labels != -100).sum())
    num = torch.tensor(n) if tensor else n
    (total, parts), (whole, gw) = _micro_batches(fn, inputs, labels, 5, num)
    torch.testing.assert_close(total, whole, rtol=1e-12, atol=1e-12)
    for a, b in zip(parts, gw):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_num_items_against_reference(backend, seed):
    s, t = logits_pair(7, 500, 500, torch.float32)
    labels = torch.tensor([3, -100, 7, 9, -100, 1, 2])
    kw = dict(labels=labels, num_items_in_batch=13, temperature=2.0, alpha=0.5)
    check_logits(lambda a, b, **k: kdkernels.distill_loss(a, b, backend=backend, **k),
                 lambda a, b, **k: reference.distill_loss(a, b, **k), s, t, torch.float32, **kw)
    one = kdkernels.softmax_kl(s, t, labels=labels, num_items_in_batch=torch.tensor(13.0), backend=backend)
    rows = kdkernels.softmax_kl(s, t, labels=labels, reduction="none", backend=backend)
    torch.testing.assert_close(one, rows.sum() / 13)


def test_num_items_bad_input():
    s = torch.randn(2, 10)
    with pytest.raises(ValueError, match="leave reduction='mean'"):
        kdkernels.softmax_kl(s, s, num_items_in_batch=4, reduction="sum")
    with pytest.raises(ValueError, match="num_items_in_batch must be > 0"):
        kdkernels.softmax_kl(s, s, num_items_in_batch=0)
    with pytest.raises(TypeError, match="one-element"):
        kdkernels.softmax_kl(s, s, num_items_in_batch=torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="num_items_in_batch must be an int"):
        kdkernels.softmax_kl(s, s, num_items_in_batch="4")


# ------------------------------------------------------------------------------ logit transforms

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tf", TRANSFORMS, ids=_tf_id)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("V", [7, 1000, 9000])
def test_transforms_logits_float64(backend, tf, kind, V, seed):
    """Each transform against the reference in float64 (a whole row in registers at V <= 1024 and
    a streamed row above it, in the Triton kernel), CE at T != 1, both gradients."""
    s, t = logits_pair(4, V, V, torch.float64, scale=6.0)
    labels = torch.randint(0, V, (4,))
    labels[1] = -100
    kw = dict(temperature=2.0, alpha=0.3, divergence=kind, labels=labels, reduction="none", **tf)
    check_logits(lambda a, b, **k: kdkernels.distill_loss(a, b, backend=backend, **k),
                 lambda a, b, **k: reference.distill_loss(a, b, **k), s, t, torch.float64, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_softcap_realistic_scales(backend, dtype, scale, seed):
    """Gemma 2's cap (30) on logits of std 1 and 30 (where the cap bites), T = 1 and CE."""
    s, t = logits_pair(6, 3001, 3001, dtype, scale=scale)
    labels = torch.randint(0, 3001, (6,))
    kw = dict(alpha=0.5, labels=labels, student_softcap=30.0, teacher_softcap=30.0)
    check_logits(lambda a, b, **k: kdkernels.distill_loss(a, b, backend=backend, **k),
                 lambda a, b, **k: reference.distill_loss(a, b, **k), s, t, dtype, **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_softcap_neg_inf_padding(backend):
    """A -inf logit is -cap after the soft-cap (as the model computes it): finite loss, zero
    gradient there."""
    s, t = logits_pair(3, 50, 50, torch.float32)
    s[:, -5:] = -math.inf
    t[:, -3:] = -math.inf
    s1 = s.clone().requires_grad_()
    out = kdkernels.softmax_kl(s1, t, student_softcap=2.0, teacher_softcap=3.0, backend=backend)
    (g,) = torch.autograd.grad(out, [s1])
    ref = reference.softmax_kl(s.double(), t.double(), student_softcap=2.0, teacher_softcap=3.0)
    assert math.isfinite(out.item()) and torch.isfinite(g).all()
    assert_close(out, ref, torch.float32, "loss")
    assert g[:, -5:].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tf", TRANSFORMS[:3], ids=_tf_id)
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_transforms_fused_linear(backend, tf, teacher, seed):
    """Inside the tiles: the fused-linear loss of soft-capped / scaled models equals the reference on
    their materialized, transformed logits; every gradient (teacher ones included)."""
    N, H, Ht, V = 10, 32, 40, 2500
    hs = torch.randn(N, H, dtype=torch.float64).requires_grad_()
    Ws = (torch.randn(V, H, dtype=torch.float64) * 0.8).requires_grad_()
    if teacher == "hidden":
        t = dict(teacher_hidden=torch.randn(N, Ht, dtype=torch.float64).requires_grad_(),
                 teacher_weight=(torch.randn(V, Ht, dtype=torch.float64) * 0.8).requires_grad_())
    else:
        t = dict(teacher_logits=(torch.randn(N, V, dtype=torch.float64) * 5).requires_grad_())
    labels = torch.randint(0, V, (N,))
    labels[3] = -100
    kw = dict(temperature=2.0, alpha=0.25, labels=labels, **tf)
    out = kdkernels.fused_linear_kl(hs, Ws, backend=backend, **t, **kw)
    leaves = [hs, Ws, *t.values()]
    g = torch.autograd.grad(out, leaves)
    r_leaves = [x.detach().clone().requires_grad_() for x in leaves]
    rt = dict(zip(t.keys(), r_leaves[2:]))
    ref = reference.fused_linear_kl(r_leaves[0], r_leaves[1], **rt, **kw)
    rg = torch.autograd.grad(ref, r_leaves)
    assert_close(out, ref, torch.float64, "loss")
    for a, b, name in zip(g, rg, ["hs", "Ws", *t.keys()]):
        assert_close(a, b, torch.float64, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["ignore", "uniform"])
def test_transforms_topk(backend, tail, seed):
    V, k = 3000, 32
    s = torch.randn(5, V, dtype=torch.float64) * 8
    vals, idx = torch.log_softmax(torch.randn(5, V, dtype=torch.float64) * 3, -1).topk(k, -1)
    kw = dict(tail=tail, temperature=1.5, student_softcap=6.0, student_logit_scale=1.3)
    s1 = s.clone().requires_grad_()
    out = kdkernels.topk_kl(s1, vals, idx, backend=backend, reduction="none", **kw)
    go = torch.rand_like(out) + 0.5
    (g,) = torch.autograd.grad(out, [s1], go)
    s2 = s.clone().requires_grad_()
    ref = reference.topk_kl(s2, vals, idx, reduction="none", **kw)
    (rg,) = torch.autograd.grad(ref, [s2], go)
    assert_close(out, ref, torch.float64, "loss")
    assert_close(g, rg, torch.float64, "grad")

    # the fused-linear top-k loss, the transform inside its tiles
    hs = torch.randn(5, 24, dtype=torch.float64).requires_grad_()
    Ws = torch.randn(V, 24, dtype=torch.float64).requires_grad_()
    out = kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, **kw)
    g = torch.autograd.grad(out, [hs, Ws])
    h2, W2 = hs.detach().clone().requires_grad_(), Ws.detach().clone().requires_grad_()
    ref = reference.fused_linear_topk_kl(h2, W2, vals, idx, **kw)
    rg = torch.autograd.grad(ref, [h2, W2])
    assert_close(out, ref, torch.float64, "fused loss")
    for a, b in zip(g, rg):
        assert_close(a, b, torch.float64, "fused grad")


def test_transform_bad_input():
    s = torch.randn(2, 10)
    for bad, exc in ((0.0, ValueError), (-1.0, ValueError), (math.inf, ValueError), ("30", TypeError),
                     (True, TypeError)):
        with pytest.raises(exc, match="student_softcap must be"):
            kdkernels.softmax_kl(s, s, student_softcap=bad)
        with pytest.raises(exc, match="teacher_logit_scale must be"):
            kdkernels.softmax_kl(s, s, teacher_logit_scale=bad)


def test_compiles_fullgraph_with_options():
    s, t = torch.randn(4, 100, requires_grad=True), torch.randn(4, 120)
    labels = torch.tensor([1, -100, 3, 4])

    def f(s, t, n):
        return kdkernels.distill_loss(s, t, labels, alpha=0.5, vocab_size=100, num_items_in_batch=n,
                                      student_softcap=5.0, teacher_logit_scale=0.5)

    n = torch.tensor(7)
    eager = f(s, t, n)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(s, t, n)
    torch.testing.assert_close(compiled, eager)


def test_modules_take_the_options(seed):
    """The nn forms keep vocab_size and the transforms, and take num_items_in_batch per call."""
    import kdkernels.nn as knn

    s, t = torch.randn(4, 100, dtype=torch.float64), torch.randn(4, 108, dtype=torch.float64)
    labels = torch.tensor([1, -100, 3, 4])
    opts = dict(vocab_size=100, student_softcap=5.0, teacher_logit_scale=0.5)
    m = knn.DistillationLoss(2.0, alpha=0.3, **opts)
    assert "vocab_size=100" in repr(m) and "student_softcap=5.0" in repr(m)
    torch.testing.assert_close(m(s, t, labels, num_items_in_batch=7),
                               reference.distill_loss(s, t, labels, temperature=2.0, alpha=0.3, num_items_in_batch=7,
                                                      **opts))
    torch.testing.assert_close(knn.SoftmaxKL(**opts)(s, t, labels),
                               reference.softmax_kl(s, t, labels=labels, **opts))
    h, w, wt = torch.randn(4, 8, dtype=torch.float64), torch.randn(100, 8, dtype=torch.float64), \
        torch.randn(108, 8, dtype=torch.float64)
    fl = knn.FusedLinearDistillationLoss(**opts)
    torch.testing.assert_close(fl(h, w, h, wt, labels=labels, num_items_in_batch=5),
                               reference.fused_linear_kl(h, w, h, wt, labels=labels, num_items_in_batch=5, **opts))
    vals, idx = torch.log_softmax(t[:, :90], -1).topk(5, -1)
    topk = dict(vocab_size=95, student_softcap=5.0)
    torch.testing.assert_close(knn.TopkKLLoss(**topk)(s, vals, idx, labels, num_items_in_batch=5),
                               reference.topk_kl(s, vals, idx, labels=labels, num_items_in_batch=5, **topk))
    torch.testing.assert_close(knn.FusedLinearTopkKLLoss(**topk)(h, w, vals, idx, labels, num_items_in_batch=5),
                               reference.fused_linear_topk_kl(h, w, vals, idx, labels=labels, num_items_in_batch=5,
                                                              **topk))
