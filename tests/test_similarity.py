"""info_nce and similarity_kd against the float64 references (which materialize the N x N
matrices), losses and every gradient including logit_scale and logit_bias, on every backend (the
Triton kernels under the interpreter when there is no GPU); the PyTorch-loop tiles forced small so
that rows, labels and maxima fall in different tiles (the interpreted Triton kernels use 16 x 256
tiles and 3 column splits, so N = 257 and 4096 cross tiles there); a memory test in subprocesses."""

import pytest
import torch
from conftest import HAS_PEAK_RSS_RESET, assert_close, run_memory_probe, triton_ok

import kdkernels
import kdkernels.contrastive as SIM
from kdkernels import reference
from kdkernels._core.backends import triton_interpreted

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# the C++ sweeps per tile, the Triton kernels (under the interpreter when there is no GPU), and the
# same tiles in PyTorch operations
BACKENDS = (["cpu"] if kdkernels.build_info()["extension"] else []) + \
    (["triton"] if triton_ok() and triton_interpreted() else []) + ["torch"]


def grads_vs_reference(fn, ref_fn, tensors, dtype, what, **kw):
    """Loss and the gradients of every tensor that requires grad, against ref_fn on float64 copies."""
    out = fn(*tensors, **kw)
    go = torch.rand_like(out) + 0.5
    leaves = [t for t in tensors if t is not None and t.requires_grad]
    extra = [v for v in kw.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    grads = torch.autograd.grad(out, leaves + extra, go)
    r_t = [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]
    r_kw = {k: (v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
                and v.is_floating_point() else v) for k, v in kw.items() if k != "backend"}
    ref = ref_fn(*r_t, **r_kw)
    r_leaves = [t for t in r_t if t is not None and t.requires_grad]
    r_extra = [v for v in r_kw.values() if isinstance(v, torch.Tensor) and v.requires_grad]
    rgrads = torch.autograd.grad(ref, r_leaves + r_extra, go.double())
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, f"loss {what}")
    for i, (g, r) in enumerate(zip(grads, rgrads)):
        assert_close(g.reshape(-1) if g.dim() == 0 else g, r.reshape(-1) if r.dim() == 0 else r, dtype,
                     f"grad {i} {what}")
    return out


def skip_slow_interpreted(backend, N):
    if backend == "triton" and triton_interpreted() and N >= 4096:
        pytest.skip("interpreted Triton at N = 4096 costs 50-160 s a case (measured); N = 257 already crosses its "
                    "16 x 256 tiles and 2 column splits")


def emb(n, d, dtype, grad=True, scale=1.0):
    x = torch.nn.functional.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1) * scale
    return x.to(dtype).requires_grad_(grad)


@pytest.mark.parametrize("N,D", [(1, 8), (3, 100), (257, 768), (4096, 8), (257, 100)])
@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_matches_reference(backend, N, D, kind, seed):
    skip_slow_interpreted(backend, N)
    a, b = emb(N, D, torch.float32), emb(N, D, torch.float32)
    # N = 1, softmax: every exact gradient is 0 and fp32 leaves O(eps |S|): keep the scale at 1 there
    ls = torch.tensor(0.0 if N == 1 else 2.3, requires_grad=True)
    kw = dict(logit_scale=ls, variant=kind, backend=backend)
    if kind == "sigmoid":
        kw["logit_bias"] = torch.tensor(-3.0, requires_grad=True)
    grads_vs_reference(kdkernels.info_nce, reference.info_nce, [a, b], torch.float32, f"seed={seed}", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind,symmetric", [("softmax", True), ("softmax", False), ("sigmoid", True)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_info_nce_dtypes_labels_tiles(backend, dtype, kind, symmetric, reduction, seed, monkeypatch):
    """Tiles of 7 x 11, more b rows than a rows, labels with repeats."""
    monkeypatch.setattr(SIM, "ROW_TILE", 7)
    monkeypatch.setattr(SIM, "COL_TILE", 11)
    a, b = emb(30, 16, dtype), emb(41, 16, dtype)
    labels = torch.randint(0, 41, (30,))
    labels[3] = labels[4]
    kw = dict(temperature=0.1, labels=labels, symmetric=symmetric, variant=kind, reduction=reduction, backend=backend)
    grads_vs_reference(kdkernels.info_nce, reference.info_nce, [a, b], dtype, f"seed={seed}", **kw)


def test_info_nce_is_clip():
    """Equal to the textbook CLIP loss written with cross_entropy."""
    a, b = emb(64, 32, torch.float64, grad=False), emb(64, 32, torch.float64, grad=False)
    S = a @ b.t() / 0.07
    y = torch.arange(64)
    want = 0.5 * (torch.nn.functional.cross_entropy(S, y) + torch.nn.functional.cross_entropy(S.t(), y))
    assert torch.allclose(kdkernels.info_nce(a, b, temperature=0.07), want, rtol=1e-12)


@pytest.mark.parametrize("N,Ds,Dt", [(1, 8, 8), (3, 8, 100), (257, 100, 768), (4096, 8, 8)])
@pytest.mark.parametrize("cross", [False, True], ids=["self", "cross"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_kd_matches_reference(backend, N, Ds, Dt, cross, kind, seed):
    skip_slow_interpreted(backend, N)
    if N == 4096 and kind != "forward":
        pytest.skip("N = 4096 once per direction is enough (the float64 reference holds 4 N x N matrices)")
    # N = 1: one-element rows, whose exact gradient is 0; fp32 leaves O(eps |S|), so keep |S| small there.
    # Unnormalized similarities stay below 4.5 (student) and 7.2 (teacher): at 18 and 20, reverse KL's
    # gradient (a difference of log-ratios) exceeded the fp32 bound in about 1 run in 30 on every
    # backend, at 8 and 11 in about 1 in 700
    k = 1.5 if N > 1 else 1.0
    sa, ta = emb(N, Ds, torch.float32, scale=k), emb(N, Dt, torch.float32, grad=False, scale=1.2)
    sb = emb(N, Ds, torch.float32, scale=k) if cross else None
    tb = emb(N, Dt, torch.float32, grad=False) if cross else None
    kw = dict(temperature=0.2, student_temperature=0.5, divergence=kind, beta=0.3, normalize=bool(seed % 2),
              backend=backend)
    grads_vs_reference(kdkernels.similarity_kd, reference.similarity_kd, [sa, ta, sb, tb], torch.float32,
                       f"seed={seed}", **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cross,symmetric", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_similarity_kd_dtypes_tiles(backend, dtype, cross, symmetric, reduction, seed, monkeypatch):
    monkeypatch.setattr(SIM, "ROW_TILE", 5)
    monkeypatch.setattr(SIM, "COL_TILE", 8)
    n = 23
    sa, ta = emb(n, 12, dtype), emb(n, 20, dtype, grad=False)
    sb, tb = (emb(n, 12, dtype), emb(n, 20, dtype, grad=False)) if cross else (None, None)
    kw = dict(temperature=0.3, divergence="jsd", beta=0.4, symmetric=symmetric, reduction=reduction, backend=backend)
    grads_vs_reference(kdkernels.similarity_kd, reference.similarity_kd, [sa, ta, sb, tb], dtype,
                       f"seed={seed}", **kw)


def test_similarity_kd_identical_models_give_zero():
    x = emb(50, 16, torch.float64, grad=False)
    assert abs(kdkernels.similarity_kd(x, x.clone(), temperature=0.5).item()) < 1e-14


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N", [1, 30, 257])
@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_distill_matches_reference(backend, N, dtype, seed, monkeypatch):
    """open_clip's DistillClipLoss fused (both losses from the same tiles): each loss with its own
    upstream gradient, against the float64 reference; 7 x 11 tiles, teacher width != student's."""
    monkeypatch.setattr(SIM, "ROW_TILE", 7)
    monkeypatch.setattr(SIM, "COL_TILE", 11)
    img, txt = emb(N, 16, dtype), emb(N, 16, dtype)
    t_img, t_txt = emb(N, 24, dtype, grad=False), emb(N, 24, dtype, grad=False)
    # N = 1: the exact losses and gradients are 0 and fp32 leaves O(eps |S|): keep the scale at 1 there
    ls = torch.tensor(0.0 if N == 1 else 2.6, dtype=torch.float64 if dtype == torch.float64 else torch.float32,
                      requires_grad=True)
    out = kdkernels.clip_distill(img, txt, t_img, t_txt, ls, 30.0, backend=backend)
    go = torch.rand(2, dtype=torch.float64) + 0.5
    grads = torch.autograd.grad(out[0] * go[0] + out[1] * go[1], [img, txt, ls])
    r = [x.detach().double().requires_grad_() for x in (img, txt, ls)]
    ref = reference.clip_distill(r[0], r[1], t_img.double(), t_txt.double(), r[2], 30.0)
    rgrads = torch.autograd.grad(ref[0] * go[0] + ref[1] * go[1], r)
    for name, g, w in (("contrastive", out[0], ref[0]), ("distill", out[1], ref[1])):
        assert_close(g, w, dtype, f"{name} N={N} seed={seed}")
    for name, g, w in zip(("d image", "d text", "d log_scale"), grads, rgrads):
        assert g.dtype == (dtype if name != "d log_scale" else ls.dtype)
        assert_close(g.reshape(-1), w.reshape(-1), dtype, f"{name} N={N} seed={seed}")


def test_clip_distill_only_the_contrastive_loss_used():
    """A loss left out of the graph passes no gradient (None upstream), the other is unchanged."""
    img, txt = emb(20, 8, torch.float64), emb(20, 8, torch.float64)
    t_img, t_txt = emb(20, 8, torch.float64, grad=False), emb(20, 8, torch.float64, grad=False)
    ls = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    contrastive, _ = kdkernels.clip_distill(img, txt, t_img, t_txt, ls, 10.0)
    got = torch.autograd.grad(contrastive, [img, txt, ls])
    want = torch.autograd.grad(kdkernels.info_nce(img, txt, logit_scale=ls), [img, txt, ls])
    for g, w in zip(got, want):
        assert torch.allclose(g, w, rtol=1e-12, atol=1e-14)


def test_modules():
    a, b = emb(20, 8, torch.float32), emb(20, 8, torch.float32)
    ls = torch.nn.Parameter(torch.tensor(2.0))
    assert torch.equal(kdkernels.nn.InfoNCELoss(temperature=0.1)(a, b), kdkernels.info_nce(a, b, temperature=0.1))
    clip = kdkernels.nn.ClipLoss()
    assert torch.equal(clip(a, b, ls), kdkernels.info_nce(a, b, logit_scale=ls))
    ta = emb(20, 12, torch.float32, grad=False)
    assert torch.equal(kdkernels.nn.SimilarityKDLoss(temperature=0.5)(a, ta),
                       kdkernels.similarity_kd(a, ta, temperature=0.5))


def _bad():
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    f, g = kdkernels.info_nce, kdkernels.similarity_kd
    return [
        ("no scale", lambda: f(a, b), ValueError, "exactly one of temperature"),
        ("two scales", lambda: f(a, b, temperature=0.1, logit_scale=torch.tensor(1.0)), ValueError, "exactly one"),
        ("dims", lambda: f(a, torch.randn(4, 7), temperature=0.1), ValueError, "b must be [N, 8]"),
        ("bias softmax", lambda: f(a, b, temperature=0.1, logit_bias=torch.tensor(0.0)), ValueError, "sigmoid"),
        ("labels range", lambda: f(a, b, temperature=0.1, labels=torch.tensor([0, 1, 2, 4])), ValueError,
         "labels must be in [0, N_b = 4)"),
        ("few b", lambda: f(a, b[:3], temperature=0.1), ValueError, "b needs at least N_a = 4 rows"),
        ("variant", lambda: f(a, b, temperature=0.1, variant="hinge"), ValueError, "variant must be"),
        ("backend", lambda: f(a, b, temperature=0.1, backend="gpu"), ValueError, "backend must be one of"),
        ("backend cuda", lambda: f(a, b, temperature=0.1, backend="cuda"), ValueError, "no CUDA C++ kernel"),
        ("DistillClipLoss rows", lambda: kdkernels.clip_distill(a, b[:3], a, b, torch.tensor(1.0), 10.0),
         ValueError, "must have the same rows"),
        ("kd rows", lambda: g(a, torch.randn(5, 8)), ValueError, "same rows"),
        ("kd half b", lambda: g(a, a, b, None), ValueError, "give both student_b and teacher_b"),
        ("kd sym rows", lambda: g(a, a, torch.randn(6, 8), torch.randn(6, 8)), ValueError, "same number of rows"),
        ("kd temperature", lambda: g(a, a, temperature=0.0), ValueError, "temperature"),
    ]


@pytest.mark.parametrize("name,call,exc,match", _bad(), ids=[c[0] for c in _bad()])
def test_bad_input(name, call, exc, match):
    import re

    with pytest.raises(exc, match=re.escape(match)):
        call()


MEMORY_PROBE = """
    import sys, torch, kdkernels
    which, N, D = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    a = torch.randn(N, D, requires_grad=True); b = torch.randn(N, D, requires_grad=True)
    ls = torch.tensor(2.0, requires_grad=True)
    ta, tb = torch.randn(N, D), torch.randn(N, D)
    def step(n):
        if which == "clip":
            kdkernels.info_nce(a[:n], b[:n], logit_scale=ls).backward()
        elif which == "distill_clip":
            c, d = kdkernels.clip_distill(a[:n], b[:n], ta[:n], tb[:n], ls, 50.0)
            (c + d).backward()
        else:
            kdkernels.similarity_kd(a[:n], ta[:n], b[:n], tb[:n], temperature=0.1).backward()
    step(64)
    a.grad = b.grad = None
    print(peak_extra(lambda: step(N)))
"""


@pytest.mark.skipif(not HAS_PEAK_RSS_RESET, reason="needs Linux /proc peak-RSS reset")
@pytest.mark.parametrize("which", ["clip", "distill_clip", "similarity_kd"])
def test_peak_memory_is_linear_in_N(which):
    """N = 4096 and 16384 at D = 64 (CLIP; 2048 and 8192 for similarity_kd): an N x N fp32 matrix
    would be 64 MiB and 1 GiB at the first pair; the tiled loss needs its tiles (fixed) plus O(N D)
    (the gradients, normalized copies). Measured here with the C++ backend: CLIP 21 MiB at
    N = 4096, 30 MiB at 16384."""
    def extra(N):
        return run_memory_probe(MEMORY_PROBE, which, N, 64, single_thread=False)

    n1, n2 = (4096, 16384) if which != "similarity_kd" else (2048, 8192)  # the second costs ~30 s in torch ops at 16384
    small, large = extra(n1), extra(n2)
    msg = f"{which}: peak extra {small / 2**20:.1f} MiB at N={n1}, {large / 2**20:.1f} MiB at N={n2}"
    per_row = 64 * 4 * 12  # a generous O(N D) allowance: a dozen fp32 [N, D] tensors
    assert large - small < (n2 - n1) * per_row + 8 * 2**20, msg
    assert large < 200 * 2**20, msg



@pytest.mark.parametrize("backend", BACKENDS)
def test_autocast(backend, seed):
    """Under torch.autocast("cpu", bfloat16) the embeddings enter the tiles in bf16 (as a matmul
    under autocast gets them), the products accumulate in float32, the gradients keep the inputs'
    dtypes: info_nce, similarity_kd and the fused DistillClipLoss all run."""
    from kdkernels.compat import open_clip as koc

    n, d = 40, 24
    a, b = (torch.nn.functional.normalize(torch.randn(n, d), dim=-1).requires_grad_() for _ in range(2))
    ta, tb = torch.randn(n, 32), torch.randn(n, 32)
    scale = torch.tensor(2.3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        clip = kdkernels.info_nce(a, b, logit_scale=scale, backend=backend)
        kd = kdkernels.similarity_kd(a, ta, b, tb, temperature=0.5, backend=backend)
        c, dist = koc.DistillClipLoss()(a, b, scale.exp(), ta, tb, 10.0)
    assert all(x.dtype == torch.float32 for x in (clip, kd, c, dist))
    g = torch.autograd.grad(clip, [a, b, scale])
    assert all(x.dtype == torch.float32 for x in g)
    r = [x.detach().bfloat16().double().requires_grad_() for x in (a, b)]
    rs = scale.detach().double().requires_grad_()
    ref = reference.info_nce(r[0], r[1], logit_scale=rs)
    rg = torch.autograd.grad(ref, [*r, rs])
    assert_close(clip, ref, torch.float32, f"info_nce seed={seed}")
    for x, y, name in zip(g, rg, ("a", "b", "logit_scale")):
        assert_close(x, y, torch.bfloat16, f"info_nce grad {name} seed={seed}")
    torch.autograd.grad(kd + c + dist, [a, b, scale])
