"""fused_linear_topk_kl: the top-k teacher KL from the student's hidden states and lm_head weight,
against the float64 reference (which materializes the logits), with every gradient; and a memory
test showing that no [N, V] tensor is formed."""

import pytest
import torch
from conftest import HAS_PEAK_RSS_RESET, assert_close, run_memory_probe, vocab_sum_scale

import kdkernels
import kdkernels.fused_linear as FL
from kdkernels import reference

MODES = [("logprobs", "ignore"), ("logprobs", "uniform"), ("logits", "ignore")]


def make(N, H, V, k, dtype, values, bias=True):
    hs = torch.randn(N, H, dtype=torch.float64).to(dtype).requires_grad_()
    Ws = (torch.randn(V, H, dtype=torch.float64) / H ** 0.5).to(dtype).requires_grad_()
    bs = torch.randn(V, dtype=torch.float64).to(dtype).requires_grad_() if bias else None
    t = torch.randn(N, V, dtype=torch.float64) * 3
    top = (torch.log_softmax(t, -1) if values == "logprobs" else t).topk(k, -1)
    return hs, Ws, bs, top.values.float(), top.indices


def compare(hs, Ws, bs, vals, idx, dtype, *, what="", **kw):
    out = kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, student_bias=bs, **kw)
    go = torch.rand_like(out) + 0.5
    inputs = [x for x in (hs, Ws, bs) if x is not None]
    grads = torch.autograd.grad(out, inputs, go)
    ref_in = [x.detach().double().requires_grad_() for x in inputs]
    ref = reference.fused_linear_topk_kl(ref_in[0], ref_in[1], vals.double(), idx,
                                         student_bias=ref_in[2] if bs is not None else None, **kw)
    rgrads = torch.autograd.grad(ref, ref_in, go.double())
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(out, ref, dtype, f"loss {what}")
    for name, g, r, x in zip(("hidden", "weight", "bias"), grads, rgrads, inputs):
        assert g.dtype == x.dtype
        scale = vocab_sum_scale(Ws.shape[0]) if name == "hidden" else 1.0
        assert_close(g, r, dtype, f"grad {name} {what}", scale=scale)
    return out


@pytest.mark.parametrize("V,H,k", [(1, 64, 1), (1000, 64, 20), (1000, 1000, 1000), (32001, 64, 64),
                                   (131073, 64, 32)])
@pytest.mark.parametrize("values,tail", MODES, ids=[f"{v}-{t}" for v, t in MODES])
def test_matches_reference(V, H, k, values, tail, seed):
    N = 5 if V < 100000 else 3
    hs, Ws, bs, vals, idx = make(N, H, V, k, torch.float32, values)
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    T = [1.0, 2.0][seed % 2]
    out = compare(hs, Ws, bs, vals, idx, torch.float32, topk_format=values, tail=tail, temperature=T, labels=labels,
                  reduction="none", what=f"seed={seed} T={T}")
    assert out[1].item() == 0.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none", "batchmean"])
def test_dtypes_tiles_and_row_chunks(dtype, reduction, seed, monkeypatch):
    """Several vocabulary tiles (the last partial), row blocks of 3 and top-k gathers of 2 rows."""
    monkeypatch.setattr(FL, "V_TILE", 97)
    monkeypatch.setattr(FL, "TILE_ELEMENTS", 97 * 3)
    hs, Ws, bs, vals, idx = make(8, 24, 1001, 6, dtype, "logprobs")
    labels = torch.randint(0, 1001, (8,))
    labels[[0, 5]] = -100
    compare(hs, Ws, bs, vals, idx, dtype, tail="uniform", temperature=1.3, labels=labels, reduction=reduction,
            what=f"seed={seed}")


def test_leading_shape_no_bias_and_frozen_weight(seed):
    hs = torch.randn(2, 3, 16, requires_grad=True)
    Ws = torch.randn(300, 16) * 0.3
    t = torch.log_softmax(torch.randn(2, 3, 300) * 2, -1).topk(10, -1)
    out = kdkernels.fused_linear_topk_kl(hs, Ws, t.values, t.indices, tail="uniform", reduction="none")
    assert out.shape == (2, 3)
    ref = reference.topk_kl(hs.double() @ Ws.double().t(), t.values.double(), t.indices, tail="uniform",
                            reduction="none")
    assert_close(out, ref, torch.float32, "leading shape")
    (g,) = torch.autograd.grad(out.sum(), [hs])
    hs64 = hs.detach().double().requires_grad_()
    (rg,) = torch.autograd.grad(reference.topk_kl(hs64 @ Ws.double().t(), t.values.double(), t.indices,
                                                  tail="uniform", reduction="none").sum(), [hs64])
    assert_close(g, rg, torch.float32, "grad hidden")


def test_all_rows_ignored():
    hs, Ws, bs, vals, idx = make(3, 8, 50, 4, torch.float32, "logprobs")
    out = kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, student_bias=bs, labels=torch.full((3,), -100))
    out.backward()
    assert out.item() == 0.0 and hs.grad.abs().sum() == 0 and Ws.grad.abs().sum() == 0 and bs.grad.abs().sum() == 0


def test_bad_input():
    hs, Ws, bs, vals, idx = make(3, 8, 50, 4, torch.float32, "logprobs")
    f = kdkernels.fused_linear_topk_kl
    with pytest.raises(ValueError, match=r"student_weight must be \[V, H\]"):
        f(hs, Ws[:, :5], vals, idx)
    with pytest.raises(ValueError, match="teacher_topk_values and teacher_topk_indices"):
        f(hs, Ws, vals[:2], idx[:2])
    with pytest.raises(ValueError, match=r"teacher_topk_indices must be in \[0, 50\)"):
        f(hs, Ws, vals, idx + 50)
    with pytest.raises(ValueError, match="tail='uniform' needs topk_format='logprobs'"):
        f(hs, Ws, vals, idx, topk_format="logits", tail="uniform")
    with pytest.raises(ValueError, match="backend='cpu'"):
        f(hs, Ws, vals, idx, backend="cpu")


MEMORY_PROBE = """
    import sys, torch, kdkernels
    torch.set_num_threads(1)
    N, H, V, k = (int(x) for x in sys.argv[1:5])
    hs = torch.randn(N, H, requires_grad=True); Ws = (torch.randn(V, H) * 0.1).requires_grad_()
    top = torch.log_softmax(torch.randn(N, 4096), -1).topk(k, -1)
    vals, idx = top.values, top.indices * (V // 4096)
    kdkernels.fused_linear_topk_kl(hs[:2], Ws, vals[:2], idx[:2], tail="uniform").backward()  # load code paths
    hs.grad = Ws.grad = None
    extra = peak_extra(lambda: kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, tail="uniform",
                                                              temperature=2.0).backward())
    print(extra - (hs.grad.numel() + Ws.grad.numel()) * 4)
"""


@pytest.mark.skipif(not HAS_PEAK_RSS_RESET, reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_does_not_grow_with_V():
    def extra(V):
        return run_memory_probe(MEMORY_PROBE, 512, 64, V, 64)

    small, large = extra(16384), extra(131072)
    msg = f"extra beyond the gradients: {small / 2**20:.1f} MiB at V=16384, {large / 2**20:.1f} MiB at V=131072"
    assert large - small < 8 * 2**20, msg  # one [512, 131072] fp32 logits tensor would be 256 MiB
    assert large < 64 * 2**20, msg


def test_modules(seed):
    """The nn.Module forms give what their functions give."""
    hs, Ws, bs, vals, idx = make(4, 16, 200, 8, torch.float32, "logprobs")
    labels = torch.randint(0, 200, (4,))
    mod = kdkernels.nn.FusedLinearTopkKLLoss(tail="uniform", temperature=2.0)
    got = mod(hs, Ws, vals, idx, labels, student_bias=bs)
    want = kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, student_bias=bs, tail="uniform", temperature=2.0,
                                          labels=labels)
    assert torch.equal(got, want)
    logits = (hs @ Ws.t() + bs).detach()
    got = kdkernels.nn.TopkKLLoss(tail="uniform", temperature=2.0)(logits, vals, idx, labels)
    assert torch.allclose(got, want, rtol=1e-5)
    ht, Wt = torch.randn(4, 12), torch.randn(200, 12)
    got = kdkernels.nn.FusedLinearDistillationLoss(temperature=2.0, alpha=0.2)(hs, Ws, ht, Wt, labels=labels)
    want = kdkernels.fused_linear_kl(hs, Ws, ht, Wt, temperature=2.0, alpha=0.2, labels=labels)
    assert torch.equal(got, want)
    assert "tail='uniform'" in repr(mod)


def test_out_of_range_index_fails_visibly_when_compiled():
    hs, Ws, bs, vals, idx = make(3, 8, 50, 4, torch.float32, "logprobs")
    idx[2, 0] = -3
    with pytest.raises(ValueError, match="teacher_topk_indices must be in"):
        kdkernels.fused_linear_topk_kl(hs, Ws, vals, idx, student_bias=bs)
    # not fullgraph: this loss is an autograd.Function with data-dependent tiles, a graph break
    fn = torch.compile(lambda h: kdkernels.fused_linear_topk_kl(h, Ws, vals, idx, student_bias=bs, reduction="none"),
                       backend="eager")
    rows = fn(hs)
    g, = torch.autograd.grad(rows.sum(), hs)
    assert torch.isnan(rows[2]) and torch.isnan(g[2]).all() and torch.isfinite(rows[:2]).all()


def test_causal_shift_view(seed):
    """hidden[:, :-1] with a top-k teacher: the same loss and hidden-state gradient as the copied rows."""
    hs_full = torch.randn(2, 6, 16, requires_grad=True)
    Ws = (torch.randn(300, 16) * 0.3).requires_grad_()
    t = torch.log_softmax(torch.randn(2, 5, 300) * 2, -1).topk(10, -1)
    out = kdkernels.fused_linear_topk_kl(hs_full[:, :-1], Ws, t.values, t.indices, tail="uniform")
    g = torch.autograd.grad(out, [hs_full, Ws])
    hs2 = hs_full.detach().clone().requires_grad_()
    ref = kdkernels.fused_linear_topk_kl(hs2[:, :-1].contiguous(), Ws, t.values, t.indices, tail="uniform")
    rg = torch.autograd.grad(ref, [hs2, Ws])
    torch.testing.assert_close(out, ref)
    for a, b in zip(g, rg):
        torch.testing.assert_close(a, b)
