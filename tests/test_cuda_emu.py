"""The CUDA C++ softmax-KL kernels (csrc/cuda) against the float64 reference, without a GPU.

The kernel source is compiled for the host and run under the CPU emulation of the CUDA execution
model in tests/cuda_emu/emu.h (threads as fibers, __syncthreads / warp shuffles / cluster
barriers as fiber barriers, distributed shared memory as the peer block's buffer), behind the same
argument handling as the real binding (python/softmax_kl_device.h). Every plan the launcher can
pick is covered: streaming (vector and scalar), staged in one block, and staged across a cluster
of blocks (sm_90), with empty segments, padded and strided rows. The emulation also counts the
bytes the kernels move in global memory, checked against what softmax_kl.cuh documents.

On a machine with a CUDA GPU and a CUDA build, the last tests run the real kernels in every plan.
"""

import os
import random

import pytest
import torch
from conftest import RTOL, assert_close

from kdkernels import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = {0: "forward", 1: "reverse", 2: "jsd", 3: "skew_forward", 4: "skew_reverse", 5: "tvd"}
IDENTITY = (1.0, 0.0, 1.0, 0.0)  # (student scale, student cap, teacher scale, teacher cap): no transform
CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}
H100 = (9, 227 * 1024, 16, 227 * 1024 // 3)  # cc major, max shared / block, max cluster, target shared
A100 = (8, 163 * 1024, 1, 163 * 1024 // 3)


@pytest.fixture(scope="module")
def emu():
    from torch.utils.cpp_extension import load

    build = os.path.join(ROOT, "build", "cuda_emu")
    os.makedirs(build, exist_ok=True)
    return load(name="kdk_cuda_emu", sources=[os.path.join(ROOT, "tests", "cuda_emu", "softmax_kl_emu.cpp")],
                extra_include_paths=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "python"),
                                     os.path.join(ROOT, "tests", "cuda_emu")],
                extra_cflags=["-O1"], build_directory=build, verbose=False)


def limits(target_kib=None, gpu=H100):
    cc, smem, cluster, target = gpu
    return cc, smem, cluster, target if target_kib is None else target_kib * 1024


def run(emu, s, t, labels=None, *, kind=0, beta=0.5, T=1.0, ce=0.0, kd=1.0, grad_t=True, gscale=0.37,
        gpu=limits(), force=(-1, 0, 0), seed=1, tf=IDENTITY):
    g = torch.tensor(gscale, dtype=torch.float32)
    loss, gs, gt, plan = emu.softmax_kl_forward_emu(s, t, labels, g, T, kind, beta, -100, ce, kd, True, grad_t,
                                                    *tf, *gpu, *force, seed)
    return loss, gs, gt, plan


def reference_of(s, t, labels, *, kind, beta, T, ce, kd, gscale, tf=IDENTITY):
    """The float64 reference of one kernel call; ``beta`` is the kernel's mixture weight (for the
    skew KL: ``skew`` for kind 3, ``1 - skew`` for kind 4)."""
    s64 = s.detach().double().requires_grad_()
    t64 = t.detach().double().requires_grad_()
    skew = {3: beta, 4: 1.0 - beta}.get(kind, 0.1)
    rows = reference.softmax_kl_rows(s64, t64, labels, temperature=T, divergence=KINDS[kind], beta=beta, skew=skew,
                                     ignore_index=-100, ce_weight=ce, kd_weight=kd, student_logit_scale=tf[0],
                                     student_softcap=tf[1] or None, teacher_logit_scale=tf[2],
                                     teacher_softcap=tf[3] or None)
    g = float(torch.tensor(gscale, dtype=torch.float32))  # the kernel reads grad_scale as float32
    gs, gt = torch.autograd.grad(rows.sum() * g, [s64, t64], allow_unused=True)
    return rows.detach(), gs, (torch.zeros_like(t64) if gt is None else gt)


def check(emu, s, t, labels=None, *, kind=0, beta=0.5, T=1.0, ce=0.0, kd=1.0, gpu=limits(), force=(-1, 0, 0),
          what="", tf=IDENTITY):
    gscale = random.uniform(0.2, 2.0)
    loss, gs, gt, plan = run(emu, s, t, labels, kind=kind, beta=beta, T=T, ce=ce, kd=kd, gscale=gscale, gpu=gpu,
                             force=force, tf=tf)
    r, rgs, rgt = reference_of(s, t, labels, kind=kind, beta=beta, T=T, ce=ce, kd=kd, gscale=gscale, tf=tf)
    loose = max(s.dtype, t.dtype, key=lambda d: RTOL[d])
    assert loss.dtype == (torch.float64 if s.dtype == torch.float64 else torch.float32)
    assert gs.dtype == s.dtype and gt.dtype == t.dtype
    tag = f"{what} plan={plan}"
    assert_close(loss, r, loose, f"loss {tag}")
    assert_close(gs, rgs, loose, f"grad student {tag}")
    assert_close(gt, rgt, loose, f"grad teacher {tag}")
    if labels is not None:
        ignored = labels == -100
        assert (loss[ignored] == 0).all() and (gs[ignored] == 0).all() and (gt[ignored] == 0).all()
    return plan


DTYPE_PAIRS = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16),
               (torch.bfloat16, torch.float32), (torch.float32, torch.float16), (torch.float64, torch.float64)]

# (name, V, limits, force, expected (mode, fewest blocks per row, most blocks per row))
PLANS = [
    ("staged-1", 1000, limits(), (-1, 0, 0), (1, 1, 1)),
    ("staged-cluster", 4096, limits(target_kib=7), (-1, 0, 0), (1, 4, 16)),  # 4 (16-bit), 8 (fp32), 16 (fp64)
    ("staged-cluster16-empty-blocks", 40, limits(), (1, 16, 64), (1, 16, 16)),
    ("stream-vector", 2048, limits(), (0, 0, 0), (0, 1, 1)),
    ("stream-scalar-oddV", 1001, limits(), (-1, 0, 0), (0, 1, 1)),
    ("sm80-stream-bigrow", 4096, limits(target_kib=4, gpu=(8, 12 * 1024, 1, 4 * 1024)), (-1, 0, 0), (0, 1, 1)),
]


@pytest.mark.parametrize("plan_name,V,gpu,force,expect", PLANS, ids=[p[0] for p in PLANS])
@pytest.mark.parametrize("dtypes", DTYPE_PAIRS, ids=lambda d: f"{str(d[0])[6:]}-{str(d[1])[6:]}")
@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4, 5], ids=list(KINDS.values()))
def test_matches_reference(emu, plan_name, V, gpu, force, expect, dtypes, kind, seed):
    N = 5
    sd, td = dtypes
    s = torch.randn(N, V, dtype=torch.float64) * 3
    t = s + torch.randn(N, V, dtype=torch.float64) * 1.5 if seed % 2 else torch.randn(N, V, dtype=torch.float64) * 3
    s, t = s.to(sd), t.to(td)
    labels = torch.randint(0, V, (N,))
    labels[1] = -100
    T = [1.0, 0.7, 2.0][seed % 3]  # T == 1: the CE shares the KL's log-sum-exp
    ce = [0.0, 0.4][(seed >> 2) % 2]
    plan = check(emu, s, t, labels, kind=kind, beta=0.3, T=T, ce=ce, kd=1.0 - ce, gpu=gpu, force=force,
                 what=f"seed={seed} T={T} ce={ce}")
    mode, fewest, most = expect
    assert plan[0] == mode and fewest <= plan[1] <= most, f"{plan_name}: plan {plan}"


# (student scale, student cap, teacher scale, teacher cap): Gemma's soft-cap on both sides, a Cohere
# style scale on the student, both, and a cap on one side only
TRANSFORMS = [(1.0, 30.0, 1.0, 30.0), (0.0625, 0.0, 1.0, 0.0), (1.7, 4.0, 0.8, 0.0), (1.0, 0.0, 1.0, 2.5)]


@pytest.mark.parametrize("plan_name,V,gpu,force,expect", PLANS, ids=[p[0] for p in PLANS])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                    (torch.float64, torch.float64)], ids=["fp32", "bf16-fp32", "fp64"])
def test_logit_transforms(emu, plan_name, V, gpu, force, expect, dtypes, seed):
    """Scale and soft-cap (the XF kernels) in every plan, on both sides, CE included, against the
    float64 reference through the same transforms."""
    N = 5
    rng = random.Random(seed)
    tf, kind = rng.choice(TRANSFORMS), rng.randrange(6)
    s = torch.randn(N, V, dtype=torch.float64) * 8
    t = s + torch.randn(N, V, dtype=torch.float64) * 4
    s, t = s.to(dtypes[0]), t.to(dtypes[1])
    labels = torch.randint(0, V, (N,))
    labels[2] = -100
    T, ce = rng.choice([1.0, 2.0]), rng.choice([0.0, 0.3])
    plan = check(emu, s, t, labels, kind=kind, beta=0.3, T=T, ce=ce, kd=1.0 - ce, gpu=gpu, force=force, tf=tf,
                 what=f"seed={seed} kind={kind} tf={tf} T={T} ce={ce}")
    mode, fewest, most = expect
    assert plan[0] == mode and fewest <= plan[1] <= most, f"{plan_name}: plan {plan}"


def test_soft_cap_of_padded_and_nan_logits(emu):
    """A soft-cap sends -inf logits to -cap, as c tanh(z / c) does (the reference agrees), and keeps
    NaN: the row's loss is NaN."""
    V = 64
    s, t = torch.randn(3, V) * 50, torch.randn(3, V) * 50
    s[0, :10] = float("-inf")
    t[1, 5:9] = float("-inf")
    tf = (1.0, 30.0, 1.0, 30.0)
    for kind in (0, 2):
        check(emu, s, t, kind=kind, tf=tf, what=f"padded kind={kind}")
    s[2, 3] = float("nan")
    loss, _, _, _ = run(emu, s, t, kind=0, tf=tf)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[:2]).all()


@pytest.mark.parametrize("V", [1, 2, 7, 8, 33])
@pytest.mark.parametrize("force", [(-1, 0, 0), (0, 0, 32)], ids=["auto", "stream32"])
def test_tiny_vocabularies(emu, V, force, seed):
    s, t = torch.randn(3, V), torch.randn(3, V)
    for kind in KINDS:
        check(emu, s, t, kind=kind, beta=0.6, T=1.3, force=force, what=f"V={V} kind={kind} seed={seed}")


def test_identical_rows_give_zero(emu):
    s = torch.randn(4, 512)
    for kind in KINDS:
        loss, gs, gt, _ = run(emu, s, s.clone(), kind=kind, beta=0.5)
        assert loss.abs().max().item() < 1e-6, kind
        assert gs.abs().max().item() < 1e-6 and gt.abs().max().item() < 1e-6, kind


def test_padded_vocabulary_and_nan(emu):
    """-inf logits (padded vocabulary) give finite losses and gradients; a NaN poisons its own row."""
    V = 1024
    s, t = torch.randn(4, V), torch.randn(4, V)
    s[:, 1000:] = float("-inf")
    t[:, 1000:] = float("-inf")
    for gpu, force in [(limits(), (-1, 0, 0)), (limits(target_kib=4), (-1, 0, 0)), (limits(), (0, 0, 0))]:
        for kind in KINDS:
            loss, gs, gt, plan = run(emu, s, t, kind=kind, gpu=gpu, force=force)
            assert torch.isfinite(loss).all() and torch.isfinite(gs).all() and torch.isfinite(gt).all(), plan
            ref, _, _ = reference_of(s, t, None, kind=kind, beta=0.5, T=1.0, ce=0.0, kd=1.0, gscale=0.37)
            assert_close(loss, ref, torch.float32, f"padded kind={kind} plan={plan}")
            assert (gs[:, 1000:] == 0).all() and (gt[:, 1000:] == 0).all()
    s[2, 17] = float("nan")
    loss, _, _, _ = run(emu, s, t, kind=0)
    assert torch.isnan(loss[2]) and torch.isfinite(loss[[0, 1, 3]]).all()


def test_out_of_range_label_gives_a_nan_row(emu):
    """With CE on, a label outside [0, V) that is not ignore_index (unchecked under torch.compile)
    makes its row's loss and gradients NaN in every plan, and no logit past the row is read; the
    other rows are untouched. Without CE a label only masks rows, whatever its value."""
    V = 1024
    s, t = torch.randn(4, V), torch.randn(4, V)
    labels = torch.tensor([3, 50000, -100, -7])
    for gpu, force in [(limits(), (-1, 0, 0)), (limits(target_kib=4), (-1, 0, 0)), (limits(), (0, 0, 0))]:
        loss, gs, gt, plan = run(emu, s, t, labels, kind=0, ce=0.5, kd=0.5, gpu=gpu, force=force)
        assert torch.isnan(loss[[1, 3]]).all() and torch.isnan(gs[[1, 3]]).all() and torch.isnan(gt[[1, 3]]).all()
        assert torch.isfinite(loss[0]) and loss[2] == 0 and (gs[2] == 0).all(), plan
        ok = torch.tensor([3, 0, -100, 0])
        ref, _, _ = run(emu, s, t, ok, kind=0, ce=0.5, kd=0.5, gpu=gpu, force=force)[:3]
        assert loss[0] == ref[0], plan
        loss, _, _, _ = run(emu, s, t, labels, kind=0, ce=0.0, kd=1.0, gpu=gpu, force=force)
        assert torch.isfinite(loss).all(), plan


def test_strided_and_offset_rows(emu):
    """Rows with a stride != V (vector-aligned: staged) and rows starting off a 16-byte boundary
    (streaming with scalar accesses)."""
    base_s, base_t = torch.randn(6, 1100, dtype=torch.float64).float(), torch.randn(6, 1100).float()
    s, t = base_s[:, :1024], base_t[:, 8:1032]  # stride 1100 (aligned: multiple of 4 floats)
    assert s.stride(0) == 1100
    plan = check(emu, s, t, kind=0, T=2.0, what="strided")
    assert plan[0] == 1
    s, t = base_s[:, 1:1025], base_t[:, 3:1027]  # start 4 / 12 bytes into a 16-byte vector
    plan = check(emu, s, t, kind=2, beta=0.5, what="offset")
    assert plan[0] == 0


def test_causal_shift_rows_through_their_strides(emu):
    """[B, L, V] rows of a causal-shift view (logits[:, :-1], logits[:, 1:]) read in place: every
    plan, student and teacher laid out differently, against the same rows made contiguous."""
    B, L, V = 3, 9, 1024
    base_s, base_t = torch.randn(B, L + 1, V), torch.randn(B, L + 1, V)
    s, t = base_s[:, :-1], base_t[:, 1:]
    labels = torch.randint(0, V, (B * L,))
    labels[4] = -100
    for gpu, force in [(limits(), (-1, 0, 0)), (limits(target_kib=4), (-1, 0, 0)), (limits(), (0, 0, 0))]:
        got = run(emu, s, t, labels, kind=2, beta=0.3, T=2.0, ce=0.4, kd=0.6, gpu=gpu, force=force)
        want = run(emu, s.reshape(-1, V), t.reshape(-1, V).contiguous(), labels, kind=2, beta=0.3, T=2.0, ce=0.4,
                   kd=0.6, gpu=gpu, force=force)
        assert got[3] == want[3], (got[3], want[3])
        for a, b in zip(got[:3], want[:3]):
            assert a.shape == b.shape and torch.equal(a, b), got[3]
    # the teacher as a 2-D matrix, the student as [B, L, V] rows: the same rows again
    got = run(emu, s, t.reshape(-1, V), labels, kind=0)
    want = run(emu, s.reshape(-1, V), t.reshape(-1, V), labels, kind=0)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))
    # both two-level with different L (the grid follows one of them: the other is made one-level)
    t9 = torch.randn(L, B + 1, V)[:, :-1]  # [9, 3, V] rows, strided
    got = run(emu, s, t9, labels, kind=1, ce=0.2, kd=0.8)
    want = run(emu, s.reshape(-1, V), t9.reshape(-1, V), labels, kind=1, ce=0.2, kd=0.8)
    assert all(torch.equal(a, b) for a, b in zip(got[:3], want[:3]))


def test_loss_only_and_student_only(emu):
    s, t = torch.randn(3, 4096).bfloat16(), torch.randn(3, 4096).bfloat16()
    g = torch.tensor(1.0)
    for kind in (0, 2):
        loss, gs, gt, _ = emu.softmax_kl_forward_emu(s, t, None, g, 1.5, kind, 0.5, -100, 0.0, 1.0, False, False,
                                                     *IDENTITY, *limits(), -1, 0, 0, 1)
        assert gs is None and gt is None
        ref, _, _ = reference_of(s, t, None, kind=kind, beta=0.5, T=1.5, ce=0.0, kd=1.0, gscale=1.0)
        assert_close(loss, ref, torch.float32, f"loss only kind={kind}")


def test_rejects_bad_arguments(emu):
    s, t, g = torch.randn(2, 8), torch.randn(2, 8), torch.tensor(1.0)
    with pytest.raises(RuntimeError, match=r"the same \[N, V\] rows"):
        emu.softmax_kl_forward_emu(s, torch.randn(2, 9), None, g, 1.0, 0, 0.5, -100, 0.0, 1.0, True, False,
                                   *IDENTITY, *limits(), -1, 0, 0, 1)
    with pytest.raises(RuntimeError, match="float64 logits pair"):
        emu.softmax_kl_forward_emu(s.double(), t, None, g, 1.0, 0, 0.5, -100, 0.0, 1.0, True, False,
                                   *IDENTITY, *limits(), -1, 0, 0, 1)
    with pytest.raises(RuntimeError, match="staged plan is impossible"):
        emu.softmax_kl_forward_emu(torch.randn(2, 7), torch.randn(2, 7), None, g, 1.0, 0, 0.5, -100, 0.0, 1.0, True,
                                   False, *IDENTITY, *limits(), 1, 0, 0, 1)
    for kind, beta, tf, match in [(6, 0.5, IDENTITY, "kind must be"), (3, 0.0, IDENTITY, "need 0 < beta < 1"),
                                  (0, 0.5, (0.0, 0.0, 1.0, 0.0), "scales must be > 0"),
                                  (0, 0.5, (1.0, -1.0, 1.0, 0.0), "soft-caps >= 0")]:
        with pytest.raises(RuntimeError, match=match):
            emu.softmax_kl_forward_emu(s, t, None, g, 1.0, kind, beta, -100, 0.0, 1.0, True, False, *tf, *limits(),
                                       -1, 0, 0, 1)
    with pytest.raises(RuntimeError, match="ce_weight > 0 needs labels"):
        emu.softmax_kl_forward_emu(s, t, None, g, 1.0, 0, 0.5, -100, 0.5, 0.5, True, False, *IDENTITY, *limits(),
                                   -1, 0, 0, 1)


# ---------------------------------------------------------------- plans and traffic

def test_plans_for_llm_vocabularies(emu):
    """What an H100 and an A100 get at LLM vocabularies (rows at aligned addresses)."""
    bf16, fp32 = CODES[torch.bfloat16], CODES[torch.float32]
    # bf16 128k: 8 blocks of 16k logits (64 KiB + scratch each: three per SM), read once
    assert emu.plan(131072, bf16, bf16, 0, *H100)[:4] == (1, 8, 512, 16384)
    # bf16 256k and fp32 128k: 16 blocks (a non-portable cluster size, tried first, halved if refused)
    assert emu.plan(262144, bf16, bf16, 0, *H100)[:2] == (1, 16)
    assert emu.plan(131072, fp32, fp32, 0, *H100)[:2] == (1, 16)
    # fp32 256k: 16 blocks of 128 KiB (one per SM)
    assert emu.plan(262144, fp32, fp32, 0, *H100)[:2] == (1, 16)
    # sm_80 has no clusters: one block holds rows up to ~40k bf16 logits, larger rows stream
    assert emu.plan(32000, bf16, bf16, 0, *A100)[:2] == (1, 1)
    assert emu.plan(131072, bf16, bf16, 0, *A100)[:2] == (0, 1)


def documented_bytes(plan, kind, V, bs, bt, grad_s, grad_t):
    reads = 1 if plan[0] == 1 else (3 if kind >= 2 else 2)
    if not (grad_s or grad_t) and plan[0] == 0:
        reads -= 1
    return reads * (bs + bt) * V, (bs * grad_s + bt * grad_t) * V


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("kind,tf", [(0, IDENTITY), (2, IDENTITY), (5, IDENTITY), (3, (1.0, 30.0, 1.0, 30.0))],
                         ids=["forward", "jsd", "tvd", "skew-forward-softcap"])
@pytest.mark.parametrize("mode", ["staged", "staged-cluster", "stream"])
def test_traffic_matches_documentation(emu, dtype, kind, tf, mode):
    """Bytes moved in global memory per row element, counted by the emulation: staged plans read
    each logit once (bf16: 4 B read + 2 B gradient = 6 B, the minimum); streaming reads twice
    (forward) or three times (JSD, skew KL, TVD); the logit transforms move nothing more. Per-row
    scalars (label, grad_scale, loss) come on top."""
    N, V = 4, 4096
    s, t = torch.randn(N, V).to(dtype), torch.randn(N, V).to(dtype)
    labels = torch.randint(0, V, (N,))
    gpu = {"staged": limits(), "staged-cluster": limits(target_kib=6), "stream": limits()}[mode]
    force = (0, 0, 0) if mode == "stream" else (-1, 0, 0)
    emu.take_traffic()
    _, _, _, plan = run(emu, s, t, labels, kind=kind, grad_t=False, gpu=gpu, force=force, tf=tf)
    read, written = emu.take_traffic()
    b = s.element_size()
    doc_r, doc_w = documented_bytes(plan, kind, V, b, b, True, False)
    per_row = 8 + 4 + 4  # label, grad_scale, loss
    assert plan[0] == (0 if mode == "stream" else 1) and (plan[1] > 1) == (mode == "staged-cluster"), plan
    assert written == N * (doc_w + 4), (written, doc_w)
    assert N * doc_r <= read <= N * (doc_r + per_row * plan[1]), (read / (N * V), doc_r / V)
    if mode != "stream":
        assert (read + written) / (N * V) < 3 * b + 0.1  # the minimum: read s, read t, write grad_s


# ---------------------------------------------------------------- the emulation itself

def test_emulation_catches_a_missing_barrier(emu):
    """Without __syncthreads a thread reads its neighbour's slot before the neighbour wrote it."""
    assert emu.selftest("synced", 128) == 128
    assert emu.selftest("unsynced", 128) < 128


def test_emulation_reports_deadlock(emu):
    with pytest.raises(RuntimeError, match="deadlock"):
        emu.selftest("half_barrier", 64)


# ---------------------------------------------------------------- the real kernels on a GPU

def _cuda_build():
    from kdkernels._core import backends as _backend

    return torch.cuda.is_available() and _backend.cuda_kernels_built()


@pytest.mark.skipif(not _cuda_build(), reason="needs a CUDA GPU and kdkernels built with KDK_CUDA=1")
@pytest.mark.parametrize("spec", ["stream", "staged", "staged:2", "staged:8", "stream/64"])
@pytest.mark.parametrize("V", [1000, 4096, 32000, 131072])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gpu_every_plan(spec, V, dtype, monkeypatch, seed):
    import kdkernels

    monkeypatch.setenv("KDK_CUDA_SOFTMAX_KL_PLAN", spec)
    N = 4
    s = (torch.randn(N, V, device="cuda") * 3).to(dtype)
    t = (torch.randn(N, V, device="cuda") * 3).to(dtype)
    labels = torch.randint(0, V, (N,), device="cuda")
    labels[0] = -100
    # every kind; the skew KL and TVD soft-capped (the XF kernels), the skew KL at skew 0.2
    for kind, cap in [("forward", None), ("reverse", None), ("jsd", None), ("skew_forward", 3.0),
                      ("skew_reverse", None), ("tvd", 3.0)]:
        opts = dict(temperature=2.0, alpha=0.3, divergence=kind, beta=0.4, skew=0.2, student_softcap=cap,
                    teacher_softcap=cap)
        s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
        try:
            out = kdkernels.distill_loss(s1, t1, labels, **opts, backend="cuda")
        except RuntimeError as e:  # a plan this GPU cannot hold (shared memory, cluster size)
            if "impossible" in str(e) or "cannot be resident" in str(e):
                pytest.skip(str(e))
            raise
        out.backward()
        s2, t2 = s.double().requires_grad_(), t.double().requires_grad_()
        ref = reference.distill_loss(s2, t2, labels, **opts)
        ref.backward()
        assert_close(out, ref, dtype, f"{spec} {kind} loss")
        assert_close(s1.grad, s2.grad, dtype, f"{spec} {kind} grad student")
        assert_close(t1.grad, t2.grad, dtype, f"{spec} {kind} grad teacher")
