"""kdkernels.distributed on the CPU with the gloo backend and 2 processes: the vocab-parallel losses
(from logits slices, and from hidden states and weight slices) and their gradients equal the
unsharded ones (the float64 reference)."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _teardown():
    """The end of every worker, its results already saved: every rank done with every collective,
    the process group destroyed, then the process ends without the interpreter's teardown. CI runs
    aborted in that teardown twice ('terminate called without an active exception' from a gloo
    thread), once after a barrier was added; the parent reads the saved results either way."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


CASES = [  # (kind, beta, temperature, reduction, split of V between the 2 ranks[, the logit options])
    ("forward", 0.5, 1.0, "mean", (500, 501)),
    ("reverse", 0.5, 2.0, "sum", (300, 701)),
    ("jsd", 0.3, 0.7, "none", (1000, 1)),
    ("jsd", 0.0, 1.5, "batchmean", (512, 489)),
    ("jsd", 0.5, 2.0, "mean", (400, 601), dict(num_items_in_batch=9, student_softcap=3.0, teacher_softcap=5.0,
                                               teacher_logit_scale=0.5)),
    ("skew_forward", 0.5, 1.0, "none", (500, 501), dict(skew=0.2)),
    ("skew_reverse", 0.5, 2.0, "sum", (1, 1000), dict(skew=0.4)),
    ("tvd", 0.5, 1.5, "mean", (600, 401)),
]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import kdkernels
    from kdkernels.distributed import vocab_parallel_kl

    results = []
    for i, (kind, beta, T, reduction, split, *opts) in enumerate(CASES):
        opts = opts[0] if opts else {}
        g = torch.Generator().manual_seed(100 + i)
        N, V = 6, sum(split)
        s = torch.randn(N, V, generator=g) * 3
        t = torch.randn(N, V, generator=g) * 3
        labels = torch.randint(0, V, (N,), generator=g)
        labels[1] = -100
        go = torch.rand(N, generator=g) + 0.5
        lo = sum(split[:rank])
        s_loc = s[:, lo:lo + split[rank]].clone().requires_grad_()
        t_loc = t[:, lo:lo + split[rank]].clone().requires_grad_()
        out = vocab_parallel_kl(s_loc, t_loc, temperature=T, divergence=kind, beta=beta, labels=labels,
                                reduction=reduction, **opts)
        gs, gt = torch.autograd.grad(out, [s_loc, t_loc], go if out.dim() else None)
        s2, t2 = s.double().requires_grad_(), t.double().requires_grad_()
        ref = kdkernels.reference.softmax_kl(s2, t2, temperature=T, divergence=kind, beta=beta, labels=labels,
                                             reduction=reduction, **opts)
        rgs, rgt = torch.autograd.grad(ref, [s2, t2], go.double() if ref.dim() else None)
        # ||out - ref|| / max(||ref||, 0.1 sqrt(rows)): the comparator of tests/conftest.py
        rel = lambda a, b: ((a.double() - b).norm() / max(b.norm().item(), 0.1 * (b.shape[0] if b.dim() else 1)  # noqa: E731
                                                             ** 0.5)).item()
        results.append((rel(out, ref.detach()), rel(gs, rgs[:, lo:lo + split[rank]]),
                        rel(gt, rgt[:, lo:lo + split[rank]])))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    _teardown()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_vocab_parallel_kl_two_processes_match_the_unsharded_loss():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        for rank in range(2):
            for case, (loss_err, gs_err, gt_err) in zip(CASES, torch.load(os.path.join(d, f"rank{rank}.pt"))):
                assert loss_err < 1e-5 and gs_err < 1e-5 and gt_err < 1e-5, (rank, case, loss_err, gs_err, gt_err)


def test_vocab_parallel_kl_needs_a_process_group():
    from kdkernels.distributed import vocab_parallel_kl

    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="process group"):
        vocab_parallel_kl(torch.randn(2, 5), torch.randn(2, 5))


FL_CASES = [  # (kind, beta, temperature, reduction, split of V, teacher as "hidden" or "logits", teacher grad)
    ("forward", 0.5, 1.0, "mean", (500, 501), "hidden", True),
    ("reverse", 0.5, 2.0, "sum", (1001, 0), "hidden", False),   # one rank holds no vocabulary
    ("jsd", 0.3, 0.7, "none", (700, 301), "logits", True),
    ("forward", 0.5, 1.5, "batchmean", (1, 1000), "logits", False),
    ("forward", 0.5, 2.0, "mean", (600, 401), "hidden", True, dict(num_items_in_batch=11, student_softcap=4.0,
                                                                     teacher_softcap=6.0, student_logit_scale=1.5)),
    ("skew_forward", 0.5, 1.0, "mean", (500, 501), "hidden", True, dict(skew=0.3)),
    ("skew_reverse", 0.5, 2.0, "none", (700, 301), "logits", True, dict(skew=0.1)),
    ("tvd", 0.5, 1.0, "sum", (1001, 0), "hidden", False),
]


def _fl_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import kdkernels
    from kdkernels.distributed import vocab_parallel_fused_linear_kl

    results = []
    for i, (kind, beta, T, reduction, split, teacher, tgrad, *opts) in enumerate(FL_CASES):
        opts = opts[0] if opts else {}
        g = torch.Generator().manual_seed(200 + i)
        N, H, Ht, V = 7, 24, 17, sum(split)
        hs = torch.randn(N, H, generator=g, dtype=torch.float64)
        Ws = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.4
        bs = torch.randn(V, generator=g, dtype=torch.float64)
        ht = torch.randn(N, Ht, generator=g, dtype=torch.float64)
        Wt = torch.randn(V, Ht, generator=g, dtype=torch.float64) * 0.4
        zt = torch.randn(N, V, generator=g, dtype=torch.float64) * 2
        labels = torch.randint(0, V, (N,), generator=g)
        labels[2] = -100
        go = torch.rand(N, generator=g, dtype=torch.float64) + 0.5
        lo, hi = sum(split[:rank]), sum(split[:rank + 1])
        # float32 on the ranks; the reference in float64
        loc = {"hs": hs.float().requires_grad_(), "Ws": Ws[lo:hi].float().requires_grad_(),
               "bs": bs[lo:hi].float().requires_grad_()}
        if teacher == "hidden":
            loc.update(ht=ht.float().requires_grad_(tgrad), Wt=Wt[lo:hi].float().requires_grad_(tgrad))
        else:
            loc.update(zt=zt[:, lo:hi].float().requires_grad_(tgrad))
        out = vocab_parallel_fused_linear_kl(loc["hs"], loc["Ws"], loc.get("ht"), loc.get("Wt"),
                                             teacher_logits=loc.get("zt"), student_bias=loc["bs"], temperature=T,
                                             divergence=kind, beta=beta, labels=labels, reduction=reduction, **opts)
        names = [k for k, v in loc.items() if v.requires_grad]
        grads = torch.autograd.grad(out, [loc[k] for k in names], go.float() if out.dim() else None)
        full = {"hs": hs, "Ws": Ws, "bs": bs, "ht": ht, "Wt": Wt, "zt": zt}
        ref_in = {k: full[k].clone().requires_grad_() for k in names}
        get = lambda k: ref_in.get(k, full[k])  # noqa: E731
        ref = kdkernels.reference.fused_linear_kl(get("hs"), get("Ws"), get("ht") if teacher == "hidden" else None,
                                                  get("Wt") if teacher == "hidden" else None,
                                                  teacher_logits=get("zt") if teacher == "logits" else None,
                                                  student_bias=get("bs"), temperature=T, divergence=kind, beta=beta,
                                                  labels=labels, reduction=reduction, **opts)
        rgrads = torch.autograd.grad(ref, [ref_in[k] for k in names], go if ref.dim() else None)
        sl = {"Ws": slice(lo, hi), "bs": slice(lo, hi), "Wt": slice(lo, hi)}
        rel = lambda a, b: ((a.double() - b).norm() / max(b.norm().item(), 1e-2)).item()  # noqa: E731
        errs = {"loss": rel(out, ref.detach())}
        for k, gr, rg in zip(names, grads, rgrads):
            rg = rg[:, lo:hi] if k == "zt" else (rg[sl[k]] if k in sl else rg)
            errs[k] = rel(gr, rg)
        results.append(errs)
    torch.save(results, os.path.join(out_dir, f"fl_rank{rank}.pt"))
    _teardown()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_vocab_parallel_fused_linear_kl_two_processes_match_the_unsharded_loss():
    """Weight (and bias, teacher-logits) slices get their slice of the full gradient; the hidden
    states, replicated, get the full gradient on every rank."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_fl_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        for rank in range(2):
            for case, errs in zip(FL_CASES, torch.load(os.path.join(d, f"fl_rank{rank}.pt"))):
                assert max(errs.values()) < 1e-5, (rank, case, errs)
                assert "hs" in errs and ("ht" in errs or "zt" in errs or not case[6])



SIM_CASES = [  # (loss, options, local rows per rank): "mean" with equal local batches, "sum" with unequal ones
    ("info_nce", dict(temperature=0.1), (5, 5)),
    ("info_nce", dict(logit_scale=True, symmetric=False, reduction="sum"), (4, 7)),
    ("info_nce", dict(logit_scale=True, logit_bias=True, variant="sigmoid", reduction="sum"), (6, 3)),
    ("similarity_kd", dict(temperature=0.2, student_temperature=0.5), (5, 5)),           # self-similarity
    ("similarity_kd", dict(temperature=0.3, divergence="jsd", beta=0.3, cross=True, reduction="sum"), (4, 6)),
    ("similarity_kd", dict(temperature=0.3, divergence="reverse", cross=True, symmetric=False, normalize=False),
     (4, 4)),
]


def _sim_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import kdkernels
    from kdkernels import distributed as kd

    results = []
    for i, (name, opts, sizes) in enumerate(SIM_CASES):
        opts = dict(opts)
        g = torch.Generator().manual_seed(300 + i)
        N, D = sum(sizes), 12
        full = {k: torch.randn(N, D if k.startswith("s") else D + 4, generator=g, dtype=torch.float64)
                for k in ("sa", "sb", "ta", "tb")}
        lo, hi = sum(sizes[:rank]), sum(sizes[:rank + 1])
        scalars = {}
        if opts.pop("logit_scale", False):
            scalars["logit_scale"] = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
        if opts.pop("logit_bias", False):
            scalars["logit_bias"] = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
        cross = opts.pop("cross", False)
        loc = {k: v[lo:hi].clone().requires_grad_(k.startswith("s")) for k, v in full.items()}
        ref_in = {k: v.clone().requires_grad_(k.startswith("s")) for k, v in full.items()}
        ref_scalars = {k: v.detach().clone().requires_grad_() for k, v in scalars.items()}
        if name == "info_nce":
            out = kd.info_nce(loc["sa"], loc["sb"], **opts, **scalars)
            ref = kdkernels.reference.info_nce(ref_in["sa"], ref_in["sb"], **opts, **ref_scalars)
            keys = ["sa", "sb"]
        else:
            b = (loc["sb"], loc["tb"]) if cross else (None, None)
            out = kd.similarity_kd(loc["sa"], loc["ta"], *b, **opts)
            rb = (ref_in["sb"], ref_in["tb"]) if cross else (None, None)
            ref = kdkernels.reference.similarity_kd(ref_in["sa"], ref_in["ta"], *rb, **opts)
            keys = ["sa", "sb"] if cross else ["sa"]
        grads = torch.autograd.grad(out, [loc[k] for k in keys] + list(scalars.values()))
        rgrads = torch.autograd.grad(ref, [ref_in[k] for k in keys] + list(ref_scalars.values()))
        # "sum": the global loss is the sum of the ranks' values, and each rank's embedding gradients
        # (summed over the ranks' graphs by the gather's backward) are the global loss's. "mean" with
        # equal local batches: the global loss is the mean of the ranks' values and those gradients
        # are world x the global mean's (DistributedDataParallel divides them by world).
        mean = opts.get("reduction", "mean") == "mean"
        value = out.detach().clone()
        dist.all_reduce(value)
        value = value / world if mean else value
        rel = lambda a, b: ((a - b).abs().max() / max(b.abs().max().item(), 1e-3)).item()  # noqa: E731
        errs = {"loss": rel(value, ref.detach())}
        for k, gr, rg in zip(keys + list(scalars), grads, rgrads):
            if k in scalars:  # a replicated parameter: the ranks' gradients averaged (mean) or summed (sum)
                s = gr.detach().clone()
                dist.all_reduce(s)
                errs[k] = rel(s / world if mean else s, rg)
            else:
                errs[k] = rel(gr.detach() / (world if mean else 1), rg[lo:hi])
        results.append(errs)
    torch.save(results, os.path.join(out_dir, f"sim_rank{rank}.pt"))
    _teardown()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_global_batch_similarity_losses_two_processes():
    """kdkernels.distributed.info_nce / similarity_kd on 2 ranks equal the single-process loss of the
    whole batch (float64 reference), with the embeddings' and the scalars' gradients."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_sim_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        for rank in range(2):
            for case, errs in zip(SIM_CASES, torch.load(os.path.join(d, f"sim_rank{rank}.pt"))):
                assert max(errs.values()) < 1e-9, (rank, case, errs)


def _dtensor_worker(rank, world, init_file, out_dir):
    """DTensor weights: vocab-sharded with the same rows everywhere (the vocab-parallel path),
    Replicate / Shard(1) (gathered), different rows per rank (data parallel: gathered, the
    gradient averaged), FSDP2's fully_shard, and a top-k teacher; against the float64 reference."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor, init_device_mesh

    import kdkernels
    import kdkernels.distributed.sharded as sharded

    calls = []  # which calls took the vocab-parallel path
    vp = sharded.vocab_parallel_fused_linear_kl
    sharded.vocab_parallel_fused_linear_kl = lambda *a, **k: calls.append(1) or vp(*a, **k)
    mesh = init_device_mesh("cpu", (world,))
    ref_fl = kdkernels.reference.fused_linear_kl
    errs = {}
    rel = lambda a, b: ((a.double() - b).norm() / max(b.norm().item(), 1e-12)).item()  # noqa: E731

    def tensors(seed, N=7, H=12, Ht=10, V=1001):
        g = torch.Generator().manual_seed(seed)
        r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
        return r(N, H), r(V, H), r(V), r(N, Ht), r(V, Ht), torch.randint(0, V, (N,), generator=g)

    # 1. vocab-sharded weights, the same rows on both ranks: the vocab-parallel loss
    hs, Ws, bs, ht, Wt, labels = tensors(1)
    labels[2] = -100
    kw = dict(temperature=2.0, divergence="jsd", labels=labels, student_softcap=5.0, num_items_in_batch=9)
    Wd = distribute_tensor(Ws, mesh, [Shard(0)]).requires_grad_()
    bd = distribute_tensor(bs, mesh, [Shard(0)]).requires_grad_()
    h1 = hs.clone().requires_grad_()
    out = kdkernels.fused_linear_kl(h1, Wd, ht, distribute_tensor(Wt, mesh, [Shard(0)]), student_bias=bd, **kw)
    out.backward()
    r = [x.clone().requires_grad_() for x in (hs, Ws, bs)]
    ref = ref_fl(r[0], r[1], ht, Wt, student_bias=r[2], **kw)
    ref.backward()
    errs["shard0 loss"] = rel(out, ref.detach())
    errs["shard0 dW"] = rel(Wd.grad.full_tensor(), r[1].grad)
    errs["shard0 db"] = rel(bd.grad.full_tensor(), r[2].grad)
    errs["shard0 dh"] = rel(h1.grad, r[0].grad)
    errs["shard0 placement"] = float(tuple(Wd.grad.placements) != (Shard(0),))
    errs["shard0 took the vocab-parallel path"] = float(calls != [1])

    # 2. Replicate and Shard(1) weights with a CE term: gathered, gradients in each placement
    kw = dict(temperature=1.5, alpha=0.3, labels=labels)
    Wd = distribute_tensor(Ws, mesh, [Replicate()]).requires_grad_()
    Wtd = distribute_tensor(Wt, mesh, [Shard(1)]).requires_grad_()
    out = kdkernels.fused_linear_kl(hs, Wd, ht, Wtd, **kw)
    out.backward()
    r = [x.clone().requires_grad_() for x in (Ws, Wt)]
    ref = ref_fl(hs, r[0], ht, r[1], **kw)
    ref.backward()
    errs["gathered loss"] = rel(out, ref.detach())
    errs["gathered dW"] = rel(Wd.grad.full_tensor(), r[0].grad)
    errs["gathered dWt"] = rel(Wtd.grad.full_tensor(), r[1].grad)
    errs["gathered placement"] = float(tuple(Wtd.grad.placements) != (Shard(1),))

    # 3. different rows per rank (data parallel): gathered, the weight's gradient averaged over ranks
    hs_r, _, _, ht_r, _, lab_r = tensors(10 + rank)
    Wd = distribute_tensor(Ws, mesh, [Shard(0)]).requires_grad_()
    out = kdkernels.fused_linear_kl(hs_r, Wd, ht_r, Wt, labels=lab_r, divergence="skew_forward")
    out.backward()
    w = Ws.clone().requires_grad_()
    ref = ref_fl(hs_r, w, ht_r, Wt, labels=lab_r, divergence="skew_forward")
    ref.backward()
    mean = w.grad.clone()
    dist.all_reduce(mean)
    errs["dp loss"] = rel(out, ref.detach())
    errs["dp and Replicate gathered"] = float(calls != [1])
    errs["dp dW"] = rel(Wd.grad.full_tensor(), mean / world)

    # 4. FSDP2: the root's parameters are unsharded from its forward to its backward
    class Student(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.trunk = torch.nn.Linear(12, 12, dtype=torch.float64)
            self.lm_head = torch.nn.Linear(12, 1001, bias=False, dtype=torch.float64)

        def forward(self, x):
            return torch.tanh(self.trunk(x))

    torch.manual_seed(0)
    plain = Student()
    model = Student()
    model.load_state_dict(plain.state_dict())
    fully_shard(model, mesh=mesh)
    x = tensors(20 + rank)[0]
    out = kdkernels.fused_linear_kl(model(x), model.lm_head.weight, ht_r, Wt, labels=lab_r, temperature=2.0)
    out.backward()
    ref = ref_fl(plain(x), plain.lm_head.weight, ht_r, Wt, labels=lab_r, temperature=2.0)
    ref.backward()
    for name, p in plain.named_parameters():
        dist.all_reduce(p.grad)
        errs[f"fsdp2 d{name}"] = rel(dict(model.named_parameters())[name].grad.full_tensor(), p.grad / world)
    errs["fsdp2 loss"] = rel(out, ref.detach())

    # 5. a top-k teacher with a vocab-sharded weight (gathered)
    vals, idx = torch.log_softmax(torch.randn(7, 1001, dtype=torch.float64), -1).topk(8, -1)
    Wd = distribute_tensor(Ws, mesh, [Shard(0)]).requires_grad_()
    out = kdkernels.fused_linear_topk_kl(hs, Wd, vals, idx, tail="bucket")
    out.backward()
    w = Ws.clone().requires_grad_()
    ref = kdkernels.reference.fused_linear_topk_kl(hs, w, vals, idx, tail="bucket")
    ref.backward()
    errs["topk loss"] = rel(out, ref.detach())
    errs["topk dW"] = rel(Wd.grad.full_tensor(), w.grad)
    torch.save(errs, os.path.join(out_dir, f"dt_rank{rank}.pt"))
    _teardown()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_dtensor_weights_two_processes():
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dtensor_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        for rank in range(2):
            errs = torch.load(os.path.join(d, f"dt_rank{rank}.pt"))
            bad = {k: v for k, v in errs.items() if not v < 1e-10}
            assert not bad, (rank, bad)


def _oc_gather(x, local_loss, with_grad, rank, world):
    """open_clip 3.3's gather_features for one tensor, restated."""
    if with_grad:
        return torch.cat(torch.distributed.nn.functional.all_gather(x), 0)
    parts = [torch.zeros_like(x) for _ in range(world)]
    dist.all_gather(parts, x)
    if not local_loss:
        parts[rank] = x
    return torch.cat(parts, 0)


def _oc_losses(img, txt, scale, t_img, t_txt, t_scale, bias, local_loss, with_grad, rank, world):
    """open_clip 3.3's ClipLoss, DistillClipLoss (distill term) and SigLipLoss with world_size > 1,
    restated: logits materialized, torch.distributed's gathers."""
    import torch.nn.functional as F

    g = lambda x: _oc_gather(x, local_loss, with_grad, rank, world)  # noqa: E731
    n = img.shape[0]
    all_img, all_txt = g(img), g(txt)
    if local_loss:
        S_i, S_t = scale * img @ all_txt.t(), scale * txt @ all_img.t()
        y = torch.arange(n) + n * rank
    else:
        S_i = scale * all_img @ all_txt.t()
        S_t = S_i.t()
        y = torch.arange(S_i.shape[0])
    clip = (F.cross_entropy(S_i, y) + F.cross_entropy(S_t, y)) / 2
    out = {"clip": clip}
    if not local_loss:
        T_i = t_scale * g(t_img) @ g(t_txt).t()
        soft_ce = lambda t, s: -(t.softmax(1) * s.log_softmax(1)).sum(1).mean(0)  # noqa: E731
        out["distill"] = (soft_ce(T_i, S_i) + soft_ce(T_i.t(), S_t)) / 2
    everyone = torch.cat(torch.distributed.nn.functional.all_gather(txt), 0)
    z = -torch.ones(n, everyone.shape[0], dtype=img.dtype)
    z[torch.arange(n), torch.arange(n) + n * rank] = 1.0
    out["siglip"] = -F.logsigmoid(z * (scale * img @ everyone.t() + bias)).sum() / n
    return out


def _open_clip_worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import torch.nn.functional as F
    from conftest import open_clip_loss_module

    from kdkernels.compat import open_clip as koc

    original = open_clip_loss_module()
    errs = {}
    rel = lambda a, b: ((a.detach() - b.detach()).norm() / max(b.detach().norm().item(), 1e-12)).item()  # noqa: E731
    for local_loss in (False, True):
        for with_grad in (False, True):
            g = torch.Generator().manual_seed(7 + rank)
            f = lambda d: F.normalize(torch.randn(6, d, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
            base = dict(img=f(16), txt=f(16), t_img=f(24), t_txt=f(24))
            scale0, t_scale, bias0 = 12.0, torch.tensor(25.0, dtype=torch.float64), -4.0
            kw = dict(local_loss=local_loss, gather_with_grad=with_grad, rank=rank, world_size=world)

            def run(impl):
                img = base["img"].clone().requires_grad_()
                txt = base["txt"].clone().requires_grad_()
                scale = torch.tensor(scale0, dtype=torch.float64, requires_grad=True)
                bias = torch.tensor(bias0, dtype=torch.float64, requires_grad=True)
                if impl == "restated":
                    out = _oc_losses(img, txt, scale, base["t_img"], base["t_txt"], t_scale, bias, local_loss,
                                     with_grad, rank, world)
                else:
                    mod = koc if impl == "kdkernels" else original
                    out = {"clip": mod.ClipLoss(**kw)(img, txt, scale),
                           "siglip": mod.SigLipLoss(rank=rank, world_size=world)(img, txt, scale, bias)}
                    if not local_loss:
                        out["distill"] = mod.DistillClipLoss(**kw)(img, txt, scale, base["t_img"], base["t_txt"],
                                                                   t_scale)[1]
                grads = {}
                for name in sorted(out):
                    leaves = [img, txt, scale] + ([bias] if name == "siglip" else [])
                    gi, gt, gs, *gb = torch.autograd.grad(out[name], leaves, retain_graph=True)  # shared gathers
                    grads[name] = (out[name], gi, gt, gs, *gb)
                return grads

            ours = run("kdkernels")
            refs = {"restated": run("restated")}
            if original is not None:
                refs["open_clip"] = run("open_clip")
            for ref_name, ref in refs.items():
                for name in ours:
                    for i, (a, b) in enumerate(zip(ours[name], ref[name])):
                        errs[(ref_name, name, local_loss, with_grad, i)] = rel(a, b)
    torch.save(errs, os.path.join(out_dir, f"oc_rank{rank}.pt"))
    _teardown()


@pytest.mark.skipif(not dist.is_available() or sys.platform == "win32", reason="needs torch.distributed with gloo")
def test_open_clip_losses_world_size_two():
    """kdkernels.compat.open_clip with world_size 2 (local_loss, gather_with_grad both ways) against
    open_clip's definitions restated (and the installed open_clip when present): losses and the
    gradients of the features, logit_scale and logit_bias."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_open_clip_worker, args=(2, os.path.join(d, "init"), d), nprocs=2, join=True)
        for rank in range(2):
            errs = torch.load(os.path.join(d, f"oc_rank{rank}.pt"))
            assert len(errs) >= 4 * 2 * 4  # (local_loss, with_grad) x losses x (loss, 3 grads)
            bad = {k: v for k, v in errs.items() if not v < 1e-9}
            assert not bad, (rank, bad)
