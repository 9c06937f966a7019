"""kdkernels.compat: the peers' loss functions, same signatures and results.

Expected values come from the peers' definitions restated here in float64 (and, where the peer is
installed, from the peer itself)."""

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close, open_clip_loss_module

from kdkernels.compat import trl as ktrl


def trl_definition(s, t, labels=None, beta=0.5, temperature=1.0, reduction="batchmean", num_items_in_batch=None):
    """TRL 1.16 GKDTrainer.generalized_jsd_loss, restated (float64 in the tests)."""
    s = F.log_softmax(s / temperature, -1)
    t = F.log_softmax(t / temperature, -1)
    if beta == 0:
        jsd = F.kl_div(s, t, reduction="none", log_target=True)
    elif beta == 1:
        jsd = F.kl_div(t, s, reduction="none", log_target=True)
    else:
        b = torch.tensor(beta, dtype=s.dtype)
        m = torch.logsumexp(torch.stack([s + torch.log1p(-b), t + torch.log(b)]), 0)
        jsd = b * F.kl_div(m, t, reduction="none", log_target=True) + (1 - b) * F.kl_div(m, s, reduction="none",
                                                                                        log_target=True)
    if labels is not None:
        mask = labels != -100
        jsd = jsd[mask]
    if num_items_in_batch is not None:
        return jsd.sum() / num_items_in_batch
    if reduction == "batchmean":
        return jsd.sum() / (mask.sum().clamp_min(1) if labels is not None else max(jsd.size(0), 1))
    if reduction == "sum":
        return jsd.sum()
    if reduction == "mean":
        return jsd.mean()
    return jsd


def _trl():
    try:
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from trl.experimental.gkd.gkd_trainer import GKDTrainer
        return GKDTrainer.generalized_jsd_loss
    except Exception:
        return None


@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none", "items"])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("with_labels", [False, True], ids=["nolabels", "labels"])
def test_trl_generalized_jsd_loss(reduction, beta, with_labels, seed):
    B, T, V = 2, 5, 301
    s, t = torch.randn(B, T, V) * 2, torch.randn(B, T, V) * 2
    labels = None
    if with_labels:
        labels = torch.randint(0, V, (B, T))
        labels[0, :2] = -100
    kw = dict(labels=labels, beta=beta, temperature=1.7)
    if reduction == "items":
        kw["num_items_in_batch"] = torch.tensor(7)
    else:
        kw["reduction"] = reduction
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    out = ktrl.generalized_jsd_loss(s1, t1, **kw)
    s2, t2 = s.double().requires_grad_(), t.double().requires_grad_()
    ref = trl_definition(s2, t2, **kw)
    assert out.shape == ref.shape
    go = torch.rand_like(ref)
    g1 = torch.autograd.grad(out, [s1, t1], go.to(out.dtype))
    g2 = torch.autograd.grad(ref, [s2, t2], go)
    assert_close(out, ref, torch.float32, f"loss seed={seed}")
    assert_close(g1[0], g2[0], torch.float32, "grad student")
    assert_close(g1[1], g2[1], torch.float32, "grad teacher")
    peer = _trl()
    if peer is not None:
        theirs = peer(s, t, **kw)
        assert_close(out, theirs.double(), torch.float32, "against the installed TRL")


@pytest.mark.parametrize("dtypes", [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
                                    (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
                         ids=lambda d: f"{d[0]}-{d[1]}")
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "items"])
def test_trl_dtypes(dtypes, reduction):
    """The loss has TRL's dtype (it computes in the logits' promoted dtype), its value to that precision."""
    s = (torch.randn(2, 4, 1000) * 3).to(dtypes[0]).requires_grad_()
    t = (torch.randn(2, 4, 1000) * 3).to(dtypes[1])
    labels = torch.randint(0, 1000, (2, 4))
    labels[0, 0] = -100
    kw = dict(labels=labels, beta=0.5, temperature=2.0)
    kw.update(num_items_in_batch=torch.tensor(5)) if reduction == "items" else kw.update(reduction=reduction)
    out = ktrl.generalized_jsd_loss(s, t, **kw)
    g, = torch.autograd.grad(out, s)
    s64 = s.detach().double().requires_grad_()
    ref = trl_definition(s64, t.double(), **kw)
    rg, = torch.autograd.grad(ref, s64)
    assert out.dtype == torch.promote_types(*dtypes) and g.dtype == dtypes[0]
    tol = max(dtypes, key=lambda d: {torch.float64: 0, torch.float32: 1}.get(d, 2))
    assert_close(out, ref, tol if tol != torch.float64 else torch.float32, "loss")
    assert_close(g, rg, tol if tol != torch.float64 else torch.float32, "grad")
    peer = _trl()
    if peer is not None:
        assert peer(s.detach(), t, **kw).dtype == out.dtype


# ------------------------------------------------------------------------------ torchtune

from kdkernels.compat import torchtune as ktt  # noqa: E402


def tt_forward(s, t, labels, ignore_index=-100, normalize=True):
    """torchtune 0.6.1 ForwardKLLoss, restated: -sum p_t log p_s per row (student inf terms dropped)."""
    x = torch.masked_fill(F.softmax(t, -1) * F.log_softmax(s, -1), torch.isinf(s), 0).sum(-1).reshape(-1)
    mask = (labels != ignore_index).reshape(-1)
    total = -(x * mask).sum()
    if not normalize:
        return total
    return torch.zeros((), dtype=s.dtype) if mask.sum() == 0 else total / mask.sum()


def tt_reverse(s, t, labels, ignore_index=-100, normalize=True):
    """torchtune 0.6.1 ReverseKLLoss, restated: sum p_s (log p_s - log p_t) per row."""
    ps, ls, lt = F.softmax(s, -1), F.log_softmax(s, -1), F.log_softmax(t, -1)
    inf = torch.isinf(s) | torch.isinf(t)
    x = (torch.masked_fill(ps * lt, inf, 0) - torch.masked_fill(ps * ls, inf, 0)).sum(-1).reshape(-1)
    mask = (labels != ignore_index).reshape(-1)
    total = -(x * mask).sum()
    if not normalize:
        return total
    return torch.zeros((), dtype=s.dtype) if mask.sum() == 0 else total / mask.sum()


def tt_symmetric(s, t, labels, ratio, ignore_index=-100, normalize=True):
    return ratio * tt_forward(s, t, labels, ignore_index, normalize) + \
        (1 - ratio) * tt_reverse(s, t, labels, ignore_index, normalize)


def _check(out, ref, inputs, ref_inputs, what):
    assert out.shape == ref.shape == ()
    assert_close(out, ref, torch.float32, what)
    want = [x for x in inputs if x.requires_grad]
    if not want:
        return
    g = torch.autograd.grad(out, want)
    rg = torch.autograd.grad(ref, [x for x in ref_inputs if x.requires_grad])
    for a, b in zip(g, rg):
        assert_close(a, b, torch.float32, f"{what} grad")


def _inputs(B, T, V, teacher_grad):
    s = (torch.randn(B * T, V) * 2).requires_grad_()
    t = (torch.randn(B * T, V) * 2).requires_grad_(teacher_grad)
    labels = torch.randint(0, V, (B * T,))
    labels[:3] = -100
    return s, t, labels, s.detach().double().requires_grad_(), t.detach().double().requires_grad_(teacher_grad)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("teacher_grad", [False, True], ids=["frozen", "teacher_grad"])
@pytest.mark.parametrize("loss", ["forward", "reverse", "symmetric"])
def test_torchtune_losses(loss, teacher_grad, normalize, seed):
    s, t, labels, s2, t2 = _inputs(2, 6, 257, teacher_grad)
    if loss == "forward":
        out = ktt.ForwardKLLoss()(s, t, labels, normalize)
        ref = tt_forward(s2, t2, labels, normalize=normalize)
    elif loss == "reverse":
        out = ktt.ReverseKLLoss()(s, t, labels, normalize)
        ref = tt_reverse(s2, t2, labels, normalize=normalize)
    else:
        out = ktt.SymmetricKLLoss(sym_kd_ratio=0.3)(s, t, labels, normalize)
        ref = tt_symmetric(s2, t2, labels, 0.3, normalize=normalize)
    _check(out, ref, [s, t], [s2, t2], f"{loss} seed={seed}")


def test_torchtune_all_ignored_and_padded_vocabulary():
    s, t = torch.randn(4, 50), torch.randn(4, 50)
    assert ktt.ForwardKLLoss()(s, t, torch.full((4,), -100)).item() == 0.0
    s[:, 40:] = float("-inf")
    t[:, 40:] = float("-inf")  # padded vocabulary: both -inf, the term is dropped either way
    labels = torch.zeros(4, dtype=torch.long)
    for mine, ref in [(ktt.ForwardKLLoss(), tt_forward), (ktt.ReverseKLLoss(), tt_reverse)]:
        assert_close(mine(s, t, labels), ref(s.double(), t.double(), labels), torch.float32, "padded")
    with pytest.raises(ValueError, match="sym_kd_ratio"):
        ktt.SymmetricKLLoss(sym_kd_ratio=1.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_torchtune_loss_is_float32(dtype, seed):
    """torchtune computes its softmaxes with dtype=torch.float32: its losses are float32 for every
    logits dtype (float64 included), and so are the drop-ins'."""
    s, t, labels, _, _ = _inputs(2, 4, 101, False)
    s, t = s.detach().to(dtype).requires_grad_(), t.detach().to(dtype)
    for mine, ref in [(ktt.ForwardKLLoss(), tt_forward), (ktt.ReverseKLLoss(), tt_reverse)]:
        out = mine(s, t, labels)
        g, = torch.autograd.grad(out, s)
        assert out.dtype == torch.float32 and g.dtype == dtype
        s64 = s.detach().double().requires_grad_()
        r = ref(s64, t.double(), labels)
        assert_close(out, r, dtype if dtype != torch.float64 else torch.float32, f"{type(mine).__name__}")
        assert_close(g, torch.autograd.grad(r, s64)[0], dtype if dtype != torch.float64 else torch.float32, "grad")
    assert ktt.ForwardKLLoss()(s, t, torch.full_like(labels, -100)).dtype == torch.float32


@pytest.mark.parametrize("loss", ["forward", "reverse", "symmetric"])
def test_torchtune_chunked_output_losses(loss, seed):
    B, T, V, chunks = 2, 8, 129, 4
    s = (torch.randn(B, T, V) * 2).requires_grad_()
    t = torch.randn(B, T, V) * 2
    labels = torch.randint(0, V, (B, T))
    labels[0, :3] = -100
    mine = {"forward": ktt.ForwardKLWithChunkedOutputLoss(num_output_chunks=chunks),
            "reverse": ktt.ReverseKLWithChunkedOutputLoss(num_output_chunks=chunks),
            "symmetric": ktt.SymmetricKLWithChunkedOutputLoss(num_output_chunks=chunks, sym_kd_ratio=0.7)}[loss]
    out = mine(list(s.chunk(chunks, dim=1)), list(t.chunk(chunks, dim=1)), labels)
    s2 = s.detach().double().requires_grad_()
    flat_s, flat_t = s2.reshape(-1, V), t.double().reshape(-1, V)
    ref = {"forward": lambda: tt_forward(flat_s, flat_t, labels),
           "reverse": lambda: tt_reverse(flat_s, flat_t, labels),
           "symmetric": lambda: tt_symmetric(flat_s, flat_t, labels, 0.7)}[loss]()
    _check(out, ref, [s], [s2], f"chunked {loss} seed={seed}")


# ------------------------------------------------------------------------------ open_clip

from kdkernels.compat import open_clip as koc  # noqa: E402

OPEN_CLIP = open_clip_loss_module()


def oc_clip(img, txt, scale):
    """open_clip 3.3 ClipLoss (world_size 1), restated."""
    S = scale * img @ txt.t()
    y = torch.arange(img.shape[0])
    return (F.cross_entropy(S, y) + F.cross_entropy(scale * txt @ img.t(), y)) / 2


def oc_distill(img, txt, scale, t_img, t_txt, t_scale):
    """open_clip 3.3 DistillClipLoss (world_size 1), restated: (contrastive, distill)."""
    S, St = scale * img @ txt.t(), t_scale * t_img @ t_txt.t()
    soft_ce = lambda t, s: -(t.softmax(1) * s.log_softmax(1)).sum(1).mean(0)  # noqa: E731
    return oc_clip(img, txt, scale), (soft_ce(St, S) + soft_ce(St.t(), S.t())) / 2


def oc_siglip(img, txt, scale, bias):
    """open_clip 3.3 SigLipLoss (world_size 1), restated."""
    n = img.shape[0]
    z = 2 * torch.eye(n, dtype=img.dtype) - torch.ones(n, n, dtype=img.dtype)
    return -F.logsigmoid(z * (scale * img @ txt.t() + bias)).sum() / n


def _feats(n, d, grad=True):
    return F.normalize(torch.randn(n, d, dtype=torch.float64), dim=-1).float().requires_grad_(grad)


@pytest.mark.parametrize("n,d", [(1, 8), (37, 16), (300, 64)])
def test_open_clip_losses(n, d, seed):
    img, txt = _feats(n, d), _feats(n, d)
    scale = torch.tensor(14.0, requires_grad=True)
    t_img, t_txt = _feats(n, d + 8, grad=False), _feats(n, d + 8, grad=False)
    t_scale = torch.tensor(30.0)
    bias = torch.tensor(-5.0, requires_grad=True)
    ins = [img, txt, scale]
    r = [x.detach().double().requires_grad_() for x in ins]
    rb = bias.detach().double().requires_grad_()
    cases = [
        ("ClipLoss", koc.ClipLoss()(img, txt, scale), oc_clip(*r), ins, r),
        ("DistillClipLoss contrastive", koc.DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale)[0],
         oc_distill(*r, t_img.double(), t_txt.double(), t_scale.double())[0], ins, r),
        ("DistillClipLoss distill", koc.DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale)[1],
         oc_distill(*r, t_img.double(), t_txt.double(), t_scale.double())[1], ins, r),
        ("SigLipLoss", koc.SigLipLoss()(img, txt, scale, bias), oc_siglip(*r, rb), ins + [bias], r + [rb]),
    ]
    for name, out, ref, inputs, ref_inputs in cases:
        _check(out, ref, inputs, ref_inputs, f"{name} seed={seed}")
    if OPEN_CLIP is not None:  # the installed original gives the same numbers
        got = koc.DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale, output_dict=True)
        want = OPEN_CLIP.DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale, output_dict=True)
        for k in want:
            assert_close(got[k], want[k].detach(), torch.float32, f"installed open_clip {k}")
        assert_close(koc.SigLipLoss()(img, txt, scale, bias), OPEN_CLIP.SigLipLoss()(img, txt, scale, bias).detach(),
                     torch.float32, "installed open_clip SigLipLoss")


def test_open_clip_bad_arguments():
    """world_size > 1 needs a process group (tests/test_distributed.py runs it with one)."""
    img, txt = _feats(4, 8), _feats(4, 8)
    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        koc.ClipLoss(world_size=2)(img, txt, torch.tensor(10.0))
    with pytest.raises(ValueError, match="rank must be in"):
        koc.ClipLoss(rank=2, world_size=2)
    with pytest.raises(ValueError, match="use_horovod"):
        koc.DistillClipLoss(use_horovod=True)
    with pytest.raises(ValueError, match="dist_impl"):
        koc.SigLipLoss(dist_impl="ring")
