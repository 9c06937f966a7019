"""kdkernels.compat.liger against Liger-Kernel 0.8.5: its definitions restated in float64 (values,
gradients, loss dtypes for every input dtype, 2-D and 3-D inputs, under autocast), and the
installed originals where they run on the CPU (LigerJSD and LigerFusedLinearJSD under the Triton
interpreter, the chunked LigerFusedLinearJSDLoss in PyTorch; LigerKLDIVLoss's kernel does not run
under triton 3.9's interpreter)."""

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close

from kdkernels.compat import liger as kl
from kdkernels.compat.liger import chunked_loss as klc

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BETAS = [0.0, 0.3, 0.5, 1.0]


def _peer(module, name):
    """The installed Liger-Kernel object, or None (not installed, or it cannot import here)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return getattr(importlib.import_module(module), name)
    except Exception:
        return None


# ------------------------------------------------------------------------------ definitions (float64)

def jsd_definition(X, Y, beta, labels=None, ignore_index=-100):
    """Liger's LigerJSD: pointwise in the log-probabilities given (X student, Y teacher), summed and
    divided by the non-ignored positions. Autograd of this expression is the gradient Liger returns."""
    P, Q = Y.exp(), X.exp()
    if beta == 0:
        terms = P * (Y - X)
    elif beta == 1:
        terms = Q * (X - Y)
    else:
        logM = (beta * P + (1 - beta) * Q).log()
        terms = beta * P * (Y - logM) + (1 - beta) * Q * (X - logM)
    rows = terms.sum(-1)
    if labels is None:
        return rows.sum() / rows.numel()
    keep = labels != ignore_index
    return (rows * keep).sum() / keep.sum().clamp_min(1)


def kl_div_definition(x, t, reduction, log_target, eps=1e-10):
    """Liger's LigerKLDIVLoss: t (log max(t, eps) - x), or e^t (t - x); torch's reductions."""
    terms = t.exp() * (t - x) if log_target else t * (t.clamp_min(eps).log() - x)
    if reduction == "none":
        return terms
    if reduction == "sum":
        return terms.sum()
    if reduction == "mean":
        return terms.sum() / terms.numel()
    return terms.sum() / x.shape[0]


def fused_jsd_definition(hs, Ws, ht, Wt, labels, beta, T, bs=None, bt=None, ignore_index=-100):
    """Liger's LigerFusedLinearJSD: jsd_definition of the log-softmaxes of the logits / T."""
    zs = hs @ Ws.t() + (0 if bs is None else bs)
    zt = (ht @ Wt.t() + (0 if bt is None else bt)).detach()
    return jsd_definition(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), beta, labels, ignore_index)


def chunked_definition(hs, Ws, ht, Wt, labels, bs=None, bt=None, *, wh=0.5, ws=0.5, beta=0.5, T=1.0,
                       ignore_index=-100):
    """Liger's chunked LigerFusedLinearJSDLoss: (loss, soft, hard)."""
    zs = hs @ Ws.t() + (0 if bs is None else bs)
    zt = (ht @ Wt.t() + (0 if bt is None else bt)).detach()
    valid = labels != ignore_index
    n = valid.sum().clamp_min(1)
    hard = F.cross_entropy(zs, labels, ignore_index=ignore_index, reduction="sum") / n
    if zt.shape[-1] > zs.shape[-1]:
        zs = torch.cat([zs, zs.new_zeros(zs.shape[0], zt.shape[-1] - zs.shape[-1])], -1)
    soft = jsd_definition(F.log_softmax(zs / T, -1), F.log_softmax(zt / T, -1), beta, labels, ignore_index)
    return wh * hard + ws * soft, soft, hard


def _log_probs(shape, dtype, perturb=True):
    """Log-probabilities; perturbed off the simplex so that a logits gradient and the pointwise
    derivative differ (they agree only on exact log-softmax outputs followed by a log_softmax)."""
    x = F.log_softmax(torch.randn(shape, dtype=torch.float64) * 2, -1)
    if perturb:
        x = x + 0.05 * torch.randn(shape, dtype=torch.float64)
    return x.to(dtype)


# ------------------------------------------------------------------------------ LigerJSD / liger_jsd

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("shape", [(12, 301), (2, 6, 301)], ids=["2d", "3d"])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_liger_jsd(dtype, beta, shape, with_labels, seed):
    X = _log_probs(shape, dtype).requires_grad_()
    Y = _log_probs(shape, dtype, perturb=False)
    labels = None
    if with_labels:
        labels = torch.randint(0, shape[-1], shape[:-1])
        labels.view(-1)[:3] = -100
    for out in (kl.LigerJSD(beta=beta)(X, Y, labels), kl.liger_jsd(X, Y, labels, beta=beta)):
        g, = torch.autograd.grad(out * 1.3, X)
        X64 = X.detach().double().requires_grad_()
        ref = jsd_definition(X64, Y.double(), beta, labels)
        rg, = torch.autograd.grad(ref * 1.3, X64)
        assert out.dtype == dtype and out.shape == ()  # Liger returns the loss in the input's dtype
        assert g.dtype == dtype
        assert_close(out, ref, dtype, f"loss beta={beta} seed={seed}")
        assert_close(g, rg, dtype, f"grad beta={beta} seed={seed}")
    peer = _peer("liger_kernel.transformers", "LigerJSD")
    if peer is not None and len(shape) == 2:  # Liger takes [BT, V]
        Xp = X.detach().clone().requires_grad_()
        theirs = peer(beta=beta)(Xp, Y, labels)
        tg, = torch.autograd.grad(theirs * 1.3, Xp)
        assert theirs.dtype == out.dtype
        tol = dtype if dtype != torch.float64 else torch.float32  # Liger's kernel computes in float32
        assert_close(out, theirs.double(), tol, "against the installed LigerJSD")
        assert_close(g, tg.double(), tol, "grad against the installed LigerJSD")


def test_liger_jsd_gradient_is_the_log_probability_derivative():
    """The issue's case: at beta = 0 the derivative with respect to log q is -p, while the logits
    gradient q - p has the opposite sign wherever q > p; after a log_softmax the two agree."""
    logits = torch.randn(4, 50, dtype=torch.float64, requires_grad=True)
    Y = F.log_softmax(torch.randn(4, 50, dtype=torch.float64), -1)
    X = F.log_softmax(logits, -1).detach().requires_grad_()
    g, = torch.autograd.grad(kl.LigerJSD(beta=0.0)(X, Y), X)
    torch.testing.assert_close(g, -Y.exp() / 4)
    g_logits, = torch.autograd.grad(kl.LigerJSD(beta=0.0)(F.log_softmax(logits, -1), Y), logits)
    torch.testing.assert_close(g_logits, (X.detach().exp() - Y.exp()) / 4)


def test_liger_jsd_padding_nan_and_bad_input():
    X, Y = _log_probs((3, 40), torch.float32, False), _log_probs((3, 40), torch.float32, False)
    X[:, 30:] = -math.inf
    Y[:, 30:] = -math.inf  # a padded vocabulary: zero probabilities contribute 0
    for beta in BETAS:
        x = X.clone().requires_grad_()
        out = kl.LigerJSD(beta=beta)(x, Y)
        g, = torch.autograd.grad(out, x)
        assert torch.isfinite(out) and torch.isfinite(g).all(), beta
    Xn = X.clone()
    Xn[1, 3] = math.nan
    assert torch.isnan(kl.LigerJSD(beta=0.5)(Xn, Y))
    with pytest.raises(ValueError, match="same shape"):
        kl.LigerJSD()(X, Y[:, :5])
    with pytest.raises(ValueError, match="beta"):
        kl.LigerJSD(beta=1.5)(X, Y)
    with pytest.raises(ValueError, match="shift_labels"):
        kl.LigerJSD()(X, Y, torch.zeros(5, dtype=torch.long))


# ------------------------------------------------------------------------------ LigerKLDIVLoss / liger_kl_div

@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                    (torch.bfloat16, torch.float32), (torch.float16, torch.float16),
                                    (torch.float64, torch.float64)], ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("shape", [(7, 333), (2, 4, 333)], ids=["2d", "3d"])
def test_liger_kl_div(dtypes, reduction, log_target, shape, seed):
    x = _log_probs(shape, dtypes[0], perturb=False).requires_grad_()
    t = F.softmax(torch.randn(shape, dtype=torch.float64), -1)
    t.view(-1, shape[-1])[0, :10] = 1e-12  # below eps: Liger's floor changes these terms
    t = (t.log() if log_target else t).to(dtypes[1])
    for out in (kl.LigerKLDIVLoss(reduction=reduction, log_target=log_target)(x, t),
                kl.liger_kl_div(x, t, reduction=reduction, log_target=log_target)):
        go = torch.rand_like(out) + 0.5
        g, = torch.autograd.grad(out, x, go)
        x64 = x.detach().double().requires_grad_()
        ref = kl_div_definition(x64, t.double(), reduction, log_target)
        rg, = torch.autograd.grad(ref, x64, go.double())
        assert out.dtype == torch.float32 and out.shape == ref.shape  # Liger's kernel writes float32
        assert g.dtype == dtypes[0]
        tol = dtypes[0] if dtypes[0] != torch.float64 else torch.float32
        assert_close(out, ref, tol, f"loss seed={seed}")
        assert_close(g, rg, tol, f"grad seed={seed}")
    assert isinstance(kl.LigerKLDIVLoss(), torch.nn.KLDivLoss)


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float64)],
                         ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean"])
def test_kdkernels_kldivloss_dtype_is_torchs(dtypes, reduction):
    """kdkernels.nn.KLDivLoss (torch's drop-in) promotes input and target as torch does: a bf16
    input and a float32 target give a float32 loss (0.99219 in bf16 before, against 0.99097)."""
    from kdkernels import nn as knn

    x = _log_probs((6, 500), dtypes[0], perturb=False).requires_grad_()
    t = F.softmax(torch.randn(6, 500, dtype=torch.float64), -1).to(dtypes[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.nn.KLDivLoss(reduction=reduction)(x, t)
    ours = knn.KLDivLoss(reduction=reduction)(x, t)
    assert ours.dtype == theirs.dtype == torch.promote_types(*dtypes)
    g1, = torch.autograd.grad(ours, x)
    g2, = torch.autograd.grad(theirs, x)
    assert g1.dtype == g2.dtype == dtypes[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = F.kl_div(x.detach().double(), t.double(), reduction=reduction)
    assert_close(ours, ref, max(dtypes, key=lambda d: {torch.float64: 0, torch.float32: 1}.get(d, 2)), "loss")


# ------------------------------------------------------------------------------ from hidden states

def _hidden(N, H, Ht, V, dtype, bias=False, pad=0):
    hs = torch.randn(N, H, dtype=torch.float64).to(dtype).requires_grad_()
    Ws = (torch.randn(V, H, dtype=torch.float64) * 0.2).to(dtype).requires_grad_()
    bs = torch.randn(V, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    ht = torch.randn(N, Ht, dtype=torch.float64).to(dtype)
    Wt = (torch.randn(V + pad, Ht, dtype=torch.float64) * 0.2).to(dtype)
    bt = torch.randn(V + pad, dtype=torch.float64).to(dtype) if bias else None
    labels = torch.randint(0, V, (N,))
    labels[:3] = -100
    return hs, Ws, bs, ht, Wt, bt, labels


def _d(*xs):
    return [None if x is None else x.detach().double().requires_grad_(x.requires_grad) for x in xs]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_liger_fused_linear_jsd(dtype, beta, seed):
    N, H, Ht, V, T = 12, 32, 24, 500, 2.0
    hs, Ws, _, ht, Wt, _, labels = _hidden(N, H, Ht, V, dtype)
    outs = [kl.LigerFusedLinearJSD(jsd_beta=beta, temperature=T)(hs, Ws, ht, Wt, labels),
            kl.liger_fused_linear_jsd(hs, Ws, ht, Wt, labels, jsd_beta=beta, temperature=T)]
    h64, W64 = _d(hs, Ws)
    ref = fused_jsd_definition(h64, W64, ht.double(), Wt.double(), labels, beta, T)
    rg = torch.autograd.grad(ref, [h64, W64])
    tol = dtype if dtype != torch.float64 else torch.float32
    for out in outs:
        g = torch.autograd.grad(out, [hs, Ws])
        assert out.dtype == torch.float32  # Liger's total_loss is float32 for every input dtype
        assert [x.dtype for x in g] == [dtype, dtype]
        assert_close(out, ref, tol, f"loss seed={seed}")
        for a, b in zip(g, rg):
            assert_close(a, b, tol, f"grad seed={seed}")
    peer = _peer("liger_kernel.transformers", "LigerFusedLinearJSD")
    if peer is not None and dtype in (torch.float32, torch.float64):
        theirs = peer(jsd_beta=beta, temperature=T)(hs.detach(), Ws.detach(), ht, Wt, labels)
        assert theirs.dtype == outs[0].dtype
        assert_close(outs[0], theirs.double(), torch.float32, "against the installed LigerFusedLinearJSD")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("pad", [0, 37], ids=["samevocab", "padded"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_liger_fused_linear_jsd_loss(dtype, beta, pad, bias, seed):
    if dtype in (torch.float16, torch.float64) and (pad or bias):
        pytest.skip("the dtype is covered without padding and bias")
    hs, Ws, bs, ht, Wt, bt, labels = _hidden(12, 32, 24, 500, dtype, bias, pad)
    kw = dict(weight_hard_loss=0.3, weight_soft_loss=0.7, beta=beta, temperature=1.5)
    mod = klc.LigerFusedLinearJSDLoss(**kw, return_soft_hard_loss=True)(hs, Ws, ht, Wt, labels, bs, bt)
    fn = klc.liger_fused_linear_jsd(hs, Ws, ht, Wt, labels, bs, bt, 0.3, 0.7, beta, -100, 1.5, True, 1024, True)
    inputs = [x for x in (hs, Ws, bs) if x is not None]
    d = _d(hs, Ws, bs)
    ref = chunked_definition(d[0], d[1], ht.double(), Wt.double(), labels, d[2], None if bt is None else bt.double(),
                             wh=0.3, ws=0.7, beta=beta, T=1.5)
    rgrads = torch.autograd.grad(ref[0], [x for x in d if x is not None])
    tol = dtype if dtype != torch.float64 else torch.float32
    for loss, soft, hard in (mod, fn):
        assert loss.dtype == soft.dtype == hard.dtype == torch.float32  # Liger's default-dtype accumulator
        grads = torch.autograd.grad(loss, inputs)
        assert [g.dtype for g in grads] == [x.dtype for x in inputs]
        assert_close(loss, ref[0], tol, f"loss seed={seed}")
        assert_close(soft, ref[1], tol, "soft")
        assert_close(hard, ref[2], tol, "hard")
        for g, r in zip(grads, rgrads):
            assert_close(g, r, tol, "grad")
    peer = _peer("liger_kernel.chunked_loss", "LigerFusedLinearJSDLoss")
    if peer is not None and dtype in (torch.float32, torch.float64):
        det = lambda x: None if x is None else x.detach()  # noqa: E731
        theirs = peer(**kw, compiled=False)(det(hs), det(Ws), ht, Wt, labels, det(bs), bt)
        assert theirs.dtype == mod[0].dtype
        assert_close(mod[0], theirs.double(), torch.float32, "against the installed Liger-Kernel")
    # the module's default return is the loss alone, the same number
    assert torch.equal(klc.LigerFusedLinearJSDLoss(**kw)(hs, Ws, ht, Wt, labels, bs, bt), mod[0])
    assert kl.LigerFusedLinearJSDLoss is klc.LigerFusedLinearJSDLoss


def test_liger_fused_3d_inputs_flatten():
    """[B, T, H] hidden states (Liger takes [B*T, H]) give the loss of the flattened call."""
    hs, Ws, _, ht, Wt, _, labels = _hidden(12, 16, 8, 100, torch.float32)
    flat = kl.liger_fused_linear_jsd(hs, Ws, ht, Wt, labels, jsd_beta=0.5)
    three = kl.liger_fused_linear_jsd(hs.reshape(3, 4, 16), Ws, ht.reshape(3, 4, 8), Wt, labels.reshape(3, 4))
    torch.testing.assert_close(three, flat)
    flat = klc.liger_fused_linear_jsd(hs, Ws, ht, Wt, labels)
    three = klc.liger_fused_linear_jsd(hs.reshape(3, 4, 16), Ws, ht.reshape(3, 4, 8), Wt, labels.reshape(3, 4))
    torch.testing.assert_close(three, flat)


@pytest.mark.parametrize("which", ["LigerFusedLinearJSD", "liger_fused_linear_jsd", "LigerFusedLinearJSDLoss",
                                   "chunked liger_fused_linear_jsd"])
@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_fused_under_autocast(which, weight_dtype, seed):
    """Under torch.autocast("cpu", bfloat16) with float32 parameters (and bf16 hidden states, as a
    model run under autocast gives them) every fused entry point runs, as the originals do; the
    result is the float64 definition on the bf16-rounded operands, to bf16 precision."""
    N, H, V = 10, 32, 300
    hs = torch.randn(N, H).bfloat16().requires_grad_()  # the output of an autocast model
    Ws = (torch.randn(V, H) * 0.2).to(weight_dtype).requires_grad_()
    ht, Wt = torch.randn(N, H).bfloat16(), torch.randn(V, H) * 0.2
    labels = torch.randint(0, V, (N,))
    labels[0] = -100
    calls = {
        "LigerFusedLinearJSD": lambda: kl.LigerFusedLinearJSD(jsd_beta=0.3)(hs, Ws, ht, Wt, labels),
        "liger_fused_linear_jsd": lambda: kl.liger_fused_linear_jsd(hs, Ws, ht, Wt, labels, jsd_beta=0.3),
        "LigerFusedLinearJSDLoss": lambda: klc.LigerFusedLinearJSDLoss(beta=0.3)(hs, Ws, ht, Wt, labels),
        "chunked liger_fused_linear_jsd": lambda: klc.liger_fused_linear_jsd(hs, Ws, ht, Wt, labels, beta=0.3),
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = calls[which]()
    g = torch.autograd.grad(out, [hs, Ws])
    assert out.dtype == torch.float32 and [x.dtype for x in g] == [torch.bfloat16, weight_dtype]
    h64, W64 = hs.detach().double().requires_grad_(), Ws.detach().bfloat16().double().requires_grad_()
    ht64, Wt64 = ht.double(), Wt.bfloat16().double()  # autocast hands the matmuls bf16 operands
    if "Loss" in which or "chunked" in which:
        ref = chunked_definition(h64, W64, ht64, Wt64, labels, beta=0.3)[0]
    else:
        ref = fused_jsd_definition(h64, W64, ht64, Wt64, labels, 0.3, 1.0)
    rg = torch.autograd.grad(ref, [h64, W64])
    assert_close(out, ref, torch.bfloat16, f"{which} seed={seed}")
    for a, b in zip(g, rg):
        assert_close(a, b, torch.bfloat16, f"{which} grad seed={seed}")


def test_liger_bad_vocab():
    with pytest.raises(ValueError, match="larger than the teacher"):
        klc.LigerFusedLinearJSDLoss()(torch.randn(2, 4), torch.randn(10, 4), torch.randn(2, 4), torch.randn(9, 4),
                                      torch.zeros(2, dtype=torch.long))


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_liger_jsd_pytorch_chunks_match_the_kernel(beta, dtype, monkeypatch, seed):
    """The row chunks of PyTorch operations (what runs on devices without the C++ kernel, here
    forced with chunks of 3 rows) give the definition's values and gradients too, padding included."""
    import kdkernels.kl_div as kl_div

    X = _log_probs((10, 301), dtype)
    Y = _log_probs((10, 301), dtype, perturb=False)
    X[:, 290:] = -math.inf  # a padded vocabulary: zero probabilities on both sides
    Y[:, 290:] = -math.inf
    X.requires_grad_()
    labels = torch.randint(0, 301, (10,))
    labels[[2, 7]] = -100
    kernel = kl.LigerJSD(beta=beta)(X, Y, labels)
    g_kernel, = torch.autograd.grad(kernel, X)
    monkeypatch.setattr(kl_div._ext, "available", lambda: False)
    monkeypatch.setattr(kl_div, "CHUNK_ELEMS", 3 * 301)
    chunks = kl.LigerJSD(beta=beta)(X, Y, labels)
    g_chunks, = torch.autograd.grad(chunks, X)
    X64 = X.detach()[:, :290].double().requires_grad_()  # the padding contributes 0, gets 0
    ref = jsd_definition(X64, Y[:, :290].double(), beta, labels)
    rg = torch.zeros(10, 301, dtype=torch.float64)
    rg[:, :290], = torch.autograd.grad(ref, X64)
    for out, g, what in ((kernel, g_kernel, "kernel"), (chunks, g_chunks, "chunks")):
        assert out.dtype == dtype
        assert_close(out, ref, dtype, f"{what} loss seed={seed}")
        assert_close(g, rg, dtype, f"{what} grad seed={seed}")
