"""kdkernels.distributed on the CPU with the gloo backend and 2 processes: the vocab-parallel loss
and gradients equal the unsharded ones (the float64 reference)."""

import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CASES = [  # (kind, beta, temperature, reduction, split of V between the 2 ranks)
    ("forward", 0.5, 1.0, "mean", (500, 501)),
    ("reverse", 0.5, 2.0, "sum", (300, 701)),
    ("jsd", 0.3, 0.7, "none", (1000, 1)),
    ("jsd", 0.0, 1.5, "batchmean", (512, 489)),
]


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    import kdkernels
    from kdkernels.distributed import vocab_parallel_kl

    results = []
    for i, (kind, beta, T, reduction, split) in enumerate(CASES):
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
        out = vocab_parallel_kl(s_loc, t_loc, temperature=T, kind=kind, beta=beta, labels=labels,
                                reduction=reduction)
        gs, gt = torch.autograd.grad(out, [s_loc, t_loc], go if out.dim() else None)
        s2, t2 = s.double().requires_grad_(), t.double().requires_grad_()
        ref = kdkernels.reference.softmax_kl(s2, t2, temperature=T, kind=kind, beta=beta, labels=labels,
                                             reduction=reduction)
        rgs, rgt = torch.autograd.grad(ref, [s2, t2], go.double() if ref.dim() else None)
        # ||out - ref|| / max(||ref||, 0.1 sqrt(rows)): the comparator of tests/conftest.py
        rel = lambda a, b: ((a.double() - b).norm() / max(b.norm().item(), 0.1 * (b.shape[0] if b.dim() else 1)  # noqa: E731
                                                             ** 0.5)).item()
        results.append((rel(out, ref.detach()), rel(gs, rgs[:, lo:lo + split[rank]]),
                        rel(gt, rgt[:, lo:lo + split[rank]])))
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


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
