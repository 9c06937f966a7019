"""topk_kl: forward KL to a teacher stored as its top-k entries, every backend against the float64
reference (which materializes the full teacher distribution)."""

import re

import pytest
import torch
from conftest import assert_close, fused_backends, loosest

import kdkernels
from kdkernels import reference
from kdkernels._core import debug as _debug

# the C++ kernel, the Triton kernel (under the interpreter when there is no GPU), the reference
BACKENDS = [b for b in fused_backends("cpu") if b != "cpu" or kdkernels.build_info()["extension"]] + ["torch"]
MODES = [("logprobs", "ignore"), ("logprobs", "uniform"), ("logits", "ignore")]


def teacher(N, V, k, values, dtype=torch.float32):
    t = torch.randn(N, V, dtype=torch.float64) * 3
    src = torch.log_softmax(t, -1) if values == "logprobs" else t
    top = src.topk(k, -1)
    return top.values.to(dtype), top.indices


def check(s, vals, idx, *, backend, values, tail, T, labels=None, reduction="none", what=""):
    go = torch.rand(s.shape[0]) + 0.5
    s1 = s.clone().requires_grad_()
    with _debug.poison_outputs():
        out = kdkernels.topk_kl(s1, vals, idx, topk_format=values, tail=tail, temperature=T, labels=labels,
                                reduction=reduction, backend=backend)
        (g,) = torch.autograd.grad(out, [s1], go if out.dim() else None)
    s2 = s.double().requires_grad_()
    ref = reference.topk_kl(s2, vals.double(), idx, topk_format=values, tail=tail, temperature=T, labels=labels,
                            reduction=reduction)
    (rg,) = torch.autograd.grad(ref, [s2], go.double() if ref.dim() else None)
    dt = loosest(s.dtype, vals.dtype if vals.dtype != torch.float64 else torch.float32)
    assert out.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert g.dtype == s.dtype
    assert_close(out, ref, dt, f"loss {what}")
    assert_close(g, rg, dt, f"grad {what}")
    return out, g


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,k", [(1, 1), (7, 3), (1000, 1000), (1000, 20), (32001, 64)])
@pytest.mark.parametrize("values,tail", MODES, ids=[f"{v}-{t}" for v, t in MODES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_matches_reference(backend, V, k, values, tail, dtype, seed):
    N = 6
    s = (torch.randn(N, V) * 3).to(dtype)
    vals, idx = teacher(N, V, k, values)
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    T = [1.0, 0.7, 2.0][seed % 3]
    out, g = check(s, vals, idx, backend=backend, values=values, tail=tail, T=T, labels=labels,
                   what=f"{backend} seed={seed} T={T}")
    assert out[2].item() == 0.0 and g[2].abs().sum().item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_reductions_leading_shape_bf16_values(backend, reduction, seed):
    s = torch.randn(2, 3, 500) * 2
    vals, idx = teacher(6, 500, 10, "logprobs", torch.bfloat16)
    vals, idx = vals.reshape(2, 3, 10), idx.reshape(2, 3, 10)
    labels = torch.randint(0, 500, (2, 3))
    labels[0, 1] = -100
    out = kdkernels.topk_kl(s, vals, idx, tail="uniform", temperature=1.5, labels=labels, reduction=reduction,
                            backend=backend)
    ref = reference.topk_kl(s.double(), vals.double(), idx, tail="uniform", temperature=1.5, labels=labels,
                            reduction=reduction)
    assert_close(out, ref, torch.float32, f"{reduction} seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_batchmean_is_pytorchs(backend, seed):
    """A top-k teacher with k = V is the full teacher: "batchmean" on [B, L, V] is F.kl_div's (sum / B)."""
    import torch.nn.functional as F

    B, L, V, T = 2, 5, 64, 1.5
    s, t = torch.randn(B, L, V) * 2, torch.randn(B, L, V) * 2
    top = torch.log_softmax(t, -1).topk(V, -1)
    s1 = s.clone().requires_grad_()
    out = kdkernels.topk_kl(s1, top.values, top.indices, temperature=T, reduction="batchmean", backend=backend)
    g, = torch.autograd.grad(out, s1)
    s2 = s.double().requires_grad_()
    ref = F.kl_div(F.log_softmax(s2 / T, -1), F.softmax(t.double() / T, -1), reduction="batchmean")
    rg, = torch.autograd.grad(ref, s2)
    assert_close(out, ref, torch.float32, f"loss seed={seed}")
    assert_close(g, rg, torch.float32, f"grad seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_topk_and_nan(backend):
    s = torch.randn(3, 300)
    vals, idx = teacher(3, 300, 8, "logprobs")
    vals[:, 6:] = float("-inf")  # fewer than k entries stored: padding
    out, g = check(s, vals, idx, backend=backend, values="logprobs", tail="uniform", T=1.0, what="padded")
    assert torch.isfinite(out).all() and torch.isfinite(g).all()
    s[1, 5] = float("nan")
    out = kdkernels.topk_kl(s, vals, idx, reduction="none", backend=backend)
    assert torch.isnan(out[1]) and torch.isfinite(out[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_gradcheck(backend):
    N, V = (2, 12) if backend == "triton" else (3, 40)  # interpreted Triton: about 80 ms a call
    s = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    vals, idx = teacher(N, V, 5, "logprobs", torch.float64)
    assert torch.autograd.gradcheck(lambda x: kdkernels.topk_kl(x, vals, idx, tail="uniform", temperature=1.3,
                                                                backend=backend), (s,))


def test_compiles_fullgraph():
    s = torch.randn(4, 100, requires_grad=True)
    vals, idx = teacher(4, 100, 5, "logprobs")
    fn = torch.compile(lambda x: kdkernels.topk_kl(x, vals, idx, temperature=2.0), fullgraph=True, backend="eager")
    assert torch.allclose(fn(s), kdkernels.topk_kl(s, vals, idx, temperature=2.0))


def _bad_cases():
    s = torch.randn(4, 10)
    vals, idx = teacher(4, 10, 3, "logprobs")
    f = kdkernels.topk_kl
    return [
        ("shape", lambda: f(s, vals[:3], idx[:3]), ValueError, "leading shape"),
        ("k > V", lambda: f(s, torch.randn(4, 11), torch.zeros(4, 11, dtype=torch.long)), ValueError, "k"),
        ("index range", lambda: f(s, vals, idx + 10), ValueError, "teacher_topk_indices must be in"),
        ("float index", lambda: f(s, vals, idx.float()), TypeError, "integer"),
        ("values kind", lambda: f(s, vals, idx, topk_format="probs"), ValueError, "topk_format must be"),
        ("tail", lambda: f(s, vals, idx, tail="spread"), ValueError, "tail must be"),
        ("logits + uniform", lambda: f(s, vals, idx, topk_format="logits", tail="uniform"), ValueError, "uniform"),
        ("temperature", lambda: f(s, vals, idx, temperature=0), ValueError, "temperature"),
        ("backend", lambda: f(s, vals, idx, backend="cuda"), ValueError, "topk_kl has no CUDA C++ kernel"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(name, call, exc, match):
    with pytest.raises(exc, match=re.escape(match)):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_index_fails_visibly_when_compiled(backend):
    """A top-k index outside [0, V) is a ValueError eagerly; under torch.compile (where that check
    cannot run) the kernel never reads past the row and gives that row a NaN loss and gradient."""
    s = torch.randn(3, 300, requires_grad=True)
    vals, idx = teacher(3, 300, 8, "logprobs")
    idx[1, 4] = 300
    with pytest.raises(ValueError, match="teacher_topk_indices must be in"):
        kdkernels.topk_kl(s, vals, idx, backend=backend)
    fn = torch.compile(lambda s: kdkernels.topk_kl(s, vals, idx, reduction="none", backend=backend), fullgraph=True,
                       backend="eager")
    rows = fn(s)
    g, = torch.autograd.grad(rows.sum(), s)
    assert torch.isnan(rows[1]) and torch.isnan(g[1]).all()
    assert torch.isfinite(rows[[0, 2]]).all() and torch.isfinite(g[[0, 2]]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_causal_shift_view_is_read_in_place(backend, seed):
    """logits[:, :-1] against a top-k teacher of the shifted positions: no copy of the student's
    logits before the kernel; loss and gradient (to the full logits) are the reference's."""
    from conftest import LargeOutputs

    B, L, V = 2, 6, 700
    s_full = (torch.randn(B, L, V) * 2).requires_grad_()
    top = torch.log_softmax(torch.randn(B, L - 1, V) * 2, -1).topk(12, -1)
    labels = torch.randint(0, V, (B, L - 1))
    labels[0, 1] = -100
    with LargeOutputs(B * (L - 1) * V // 2) as big:
        out = kdkernels.topk_kl(s_full[:, :-1], top.values, top.indices, tail="uniform", temperature=1.5,
                                labels=labels, reduction="sum", backend=backend)
    assert big.seen == [], f"copies before the kernel: {big.seen}"
    g, = torch.autograd.grad(out, s_full)
    s64 = s_full.detach().double().requires_grad_()
    ref = reference.topk_kl(s64[:, :-1], top.values.double(), top.indices, tail="uniform", temperature=1.5,
                            labels=labels, reduction="sum")
    rg, = torch.autograd.grad(ref, s64)
    assert_close(out, ref, torch.float32, f"loss seed={seed}")
    assert_close(g, rg, torch.float32, f"grad seed={seed}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,k", [(7, 3), (1000, 16), (9000, 64), (50, 50)])
@pytest.mark.parametrize("T", [1.0, 2.5])
def test_bucket_tail(backend, V, k, T, seed):
    """tail="bucket": a KL over k + 1 bins (the top-k and the mass outside them) against the
    reference's definition, loss and gradient, float64 and float32, and the fused-linear form."""
    s = torch.randn(5, V, dtype=torch.float64) * 3
    lp = torch.log_softmax(s + torch.randn(5, V, dtype=torch.float64) * 2, -1)
    vals, idx = lp.topk(k, -1)
    labels = torch.tensor([1, -100, 2, 3, 4])
    for dtype in (torch.float64, torch.float32):
        # the reference in float64 on the same (rounded) inputs: the tail bins 1 - Σ amplify input rounding
        v, s_in = vals.to(dtype), s.to(dtype)
        s1 = s_in.clone().requires_grad_()
        out = kdkernels.topk_kl(s1, v, idx, tail="bucket", temperature=T, labels=labels,
                                reduction="none", backend=backend)
        go = torch.rand(5, dtype=torch.float64) + 0.5
        (g,) = torch.autograd.grad(out, [s1], go.to(out.dtype))
        s2 = s_in.double().requires_grad_()
        ref = reference.topk_kl(s2, v.double(), idx, tail="bucket", temperature=T, labels=labels, reduction="none")
        (rg,) = torch.autograd.grad(ref, [s2], go)
        assert_close(out, ref, dtype, f"loss {dtype} seed={seed}")
        assert_close(g, rg, dtype, f"grad {dtype} seed={seed}")
    hs = torch.randn(5, 16, dtype=torch.float64).requires_grad_()
    Ws = torch.randn(V, 16, dtype=torch.float64).requires_grad_()
    out = kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, tail="bucket", temperature=T, labels=labels)
    grads = torch.autograd.grad(out, [hs, Ws])
    h2, W2 = hs.detach().clone().requires_grad_(), Ws.detach().clone().requires_grad_()
    ref = reference.fused_linear_topk_kl(h2, W2, vals, idx, tail="bucket", temperature=T, labels=labels)
    rgrads = torch.autograd.grad(ref, [h2, W2])
    assert_close(out, ref, torch.float64, "fused loss")
    for a, b in zip(grads, rgrads):
        assert_close(a, b, torch.float64, "fused grad")


def test_bucket_tail_needs_log_probabilities():
    s = torch.randn(2, 10)
    vals, idx = s.topk(3, -1)
    with pytest.raises(ValueError, match="tail='bucket' needs topk_format='logprobs'"):
        kdkernels.topk_kl(s, vals, idx, tail="bucket", topk_format="logits")
