"""Ahead-of-time compile, with no GPU: every csrc/cuda/*.cu with nvcc, and every Triton kernel
variant the launchers use (softmax-KL, fused-linear KL, top-k KL) for sm_80 and sm_90; a compile
error or a register spill fails.

Run ``pytest -s tests/test_aot.py`` to see the REG / STACK / SHARED / occupancy table. The Triton
compiles run in child processes (kdkernels.triton.aot) because the test session may run Triton in
interpreter mode.
"""

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

try:
    import triton
except ImportError:
    triton = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ARCHS = (80, 90)

# ------------------------------------------------------------------ CUDA C++ sources (nvcc)

CUDA_SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc") or (os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
                                if os.environ.get("CUDA_HOME") else None)


CUDA_ARCHS = ["sm_80", "sm_90a"]
_NVCC_RESULTS = {}


def _nvcc(source, tmp_dir):
    """Compile ``source`` for every arch in one nvcc call (the archs in parallel), with the flags of
    the real build (setup.py); returns (returncode, ptxas output)."""
    if source not in _NVCC_RESULTS:
        gencodes = [f"-gencode=arch={a.replace('sm_', 'compute_')},code={a}" for a in CUDA_ARCHS]
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS  # what torch's CUDAExtension adds

        out = subprocess.run([NVCC, "-std=c++17", "-O3", "--use_fast_math", *COMMON_NVCC_FLAGS, "--threads", "0",
                              "-c", source,
                              "-o", os.path.join(tmp_dir, "k.o"), *gencodes,
                              "-Xptxas=-v,-warn-spills,-warn-lmem-usage", f"-I{os.path.join(ROOT, 'csrc')}"],
                             capture_output=True, text=True)
        _NVCC_RESULTS[source] = (out.returncode, out.stderr)
    return _NVCC_RESULTS[source]


def ptxas_table(output: str, arch: str) -> list:
    """(kernel, registers, stack bytes, spill-store bytes) per entry function compiled for ``arch``."""
    rows, name, frame = [], None, (0, 0)
    for line in output.splitlines():
        m = re.search(r"Compiling entry function '(\w+)' for '(\w+)'", line)
        if m:
            name = m.group(1) if m.group(2) == arch else None
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m:
            frame = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and name:
            rows.append((name, int(m.group(1)), *frame))
            name = None
    return rows


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", CUDA_ARCHS)
@pytest.mark.parametrize("source", CUDA_SOURCES or [None], ids=lambda p: os.path.basename(p) if p else "none")
def test_cuda_sources_compile_without_spills(source, arch, tmp_path_factory):
    """Every csrc/cuda/*.cu compiles on its own (raw CUDA, no ATen) with no register spills and no
    local memory."""
    if source is None:
        pytest.skip("csrc/cuda has no .cu sources in this release")
    rc, output = _nvcc(source, str(tmp_path_factory.mktemp("nvcc")))
    assert rc == 0, output[-4000:]
    table = ptxas_table(output, arch)
    assert table, f"no kernels compiled for {arch}"
    for name, reg, stack, spill in table:
        print(f"\n{arch} {name}: REG:{reg} STACK:{stack} SPILL:{spill}", end="")
    bad = [line for line in output.splitlines() if "ptxas warning" in line or "warning" in line.lower()]
    assert not [r for r in table if r[2] or r[3]], f"{arch}: stack or spills in " + \
        ", ".join(f"{n} (STACK {st}, spill {sp})" for n, _, st, sp in table if st or sp)
    assert not bad, "\n".join(bad)


# ------------------------------------------------------------------ Triton kernels

if triton is not None:
    from kdkernels.triton import aot, fused_linear_kl, softmax_kl  # noqa: E402

    CUOBJDUMP = aot.cuobjdump_path()
    CASES = softmax_kl.aot_cases()
    FL_CASES = fused_linear_kl.aot_cases()
else:
    CUOBJDUMP, CASES, FL_CASES = "", [], []


def _case_id(case):
    sig, flags, num_warps = case
    dtypes = sig["s_ptr"].split(":")[0][1:] + "-" + sig["t_ptr"].split(":")[0][1:]
    feats = "".join(k[0] + k[1:].lower() for k in ("HAS_LABELS", "CE", "SAME_T", "GRAD_S", "GRAD_T") if flags[k])
    mode = "single" if flags["SINGLE_PASS"] else "stream"
    align = "a16" if sig["V"].endswith(":16") else "u"
    return f"{dtypes}-k{flags['KIND']}-{mode}{flags['BLOCK']}-w{num_warps}-{align}-{feats or 'plain'}"


_RESULTS = {}


def _fl_case_id(case):
    kernel, sig, flags, num_warps = case
    what = kernel.split("_")[-1] + (f"-phase{flags['PHASE']}" if kernel.endswith("stats") else "")
    teacher = "tlogits" if flags["TEACHER_LOGITS"] else "thidden"
    return (f"{sig['hs_ptr'].split(':')[0][1:]}-{what}-k{flags['KIND']}-{teacher}-{flags['PREC']}-"
            f"{flags['BLOCK_N']}x{flags['BLOCK_V']}x{flags['BLOCK_K']}-w{num_warps}")


def _results():
    """All cases (softmax-KL, then fused-linear) for all archs, compiled once (in parallel child
    processes) on first use; keyed by (kernel family, index, arch)."""
    if not _RESULTS:
        keys = [("softmax_kl", i, arch) for i in range(len(CASES)) for arch in ARCHS]
        jobs = [("softmax_kl", *CASES[i], arch) for _, i, arch in keys]
        fl_keys = [("fused_linear_kl", i, arch) for i in range(len(FL_CASES)) for arch in ARCHS]
        jobs += [(*FL_CASES[i], arch) for _, i, arch in fl_keys]
        _RESULTS.update(zip(keys + fl_keys, aot.compile_cases(jobs)))
    return _RESULTS


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_softmax_kl_compiles_without_spills(index, arch):
    r = _results()[("softmax_kl", index, arch)]
    name = _case_id(CASES[index])
    assert r["error"] is None, f"{name} sm_{arch}: {r['error']}"
    occ = aot.occupancy(r["reg"], r["shared"], CASES[index][2], arch)
    print(f"\nsm_{arch} {name}: REG:{r['reg']} STACK:{r['stack']} SHARED:{r['shared']} occupancy {occ:.0%}", end="")
    assert r["stack"] == 0, f"{name} sm_{arch}: register spills, STACK:{r['stack']} (REG:{r['reg']})"


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("index", range(len(FL_CASES)), ids=[_fl_case_id(c) for c in FL_CASES])
def test_fused_linear_kl_compiles_without_spills(index, arch):
    """The fused-linear statistics and gradient kernels (tl.dot tiles) for every operand dtype and
    precision: compiled for real hardware, no register spills."""
    r = _results()[("fused_linear_kl", index, arch)]
    name = _fl_case_id(FL_CASES[index])
    assert r["error"] is None, f"{name} sm_{arch}: {r['error']}"
    occ = aot.occupancy(r["reg"], r["shared"], FL_CASES[index][3], arch)
    print(f"\nsm_{arch} {name}: REG:{r['reg']} STACK:{r['stack']} SHARED:{r['shared']} occupancy {occ:.0%}", end="")
    assert r["stack"] == 0, f"{name} sm_{arch}: register spills, STACK:{r['stack']} (REG:{r['reg']})"


if triton is not None:
    from kdkernels.triton import topk_kl  # noqa: E402

    TOPK_CASES = topk_kl.aot_cases()
else:
    TOPK_CASES = []


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
def test_topk_kl_compiles_without_spills():
    """The top-k teacher kernel for every student dtype and tail, sm_80 and sm_90: no spills."""
    def name(k, sig, flags, w):
        tail = "uniform" if flags["UNIFORM"] else "bucket" if flags["BUCKET"] else "ignore"
        return f"{sig['s_ptr'].split(':')[0][1:]}-{tail}-{'softcap-' if flags['XF'] else ''}V{flags['BLOCK_V']}"

    _compile_without_spills("topk", [("topk_kl", *case) for case in TOPK_CASES], name)


def _compile_without_spills(label, cases, case_id):
    """Compile every (kernel, sig, flags, num_warps) case for each arch in ARCHS: each compiles, and
    none uses stack (spills); prints the registers, shared memory and occupancy."""
    jobs = [(*case, arch) for case in cases for arch in ARCHS]
    bad = []
    for (kernel, sig, flags, warps, arch), r in zip(jobs, aot.compile_cases(jobs)):
        name = case_id(kernel, sig, flags, warps)
        assert r["error"] is None, f"{name} sm_{arch}: {r['error']}"
        occ = aot.occupancy(r["reg"], r["shared"], warps, arch)
        print(f"\nsm_{arch} {label} {name}: REG:{r['reg']} STACK:{r['stack']} SHARED:{r['shared']} occupancy {occ:.0%}",
              end="")
        if r["stack"]:
            bad.append(f"{name} sm_{arch} STACK:{r['stack']}")
    assert not bad, bad


if triton is not None:
    from kdkernels.triton import similarity  # noqa: E402

    SIM_CASES = similarity.aot_cases()
else:
    SIM_CASES = []


def _sim_case_id(case):
    kernel, sig, flags, num_warps = case
    what = kernel.split("_")[-1]
    mode = {0: "infonce", 1: "kd", 2: "xent"}.get(flags.get("MODE"), "siglip")
    extra = (f"-phase{flags['PHASE']}" if "PHASE" in flags else "") + (f"-k{flags['KIND']}" if "KIND" in flags else "")
    return f"{sig['x_ptr'].split(':')[0][1:]}-{what}-{mode}{extra}-{flags['BLOCK_N']}x{flags['BLOCK_V']}-w{num_warps}"


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
def test_similarity_compiles_without_spills():
    """The InfoNCE / similarity_kd / DistillClipLoss / SigLIP kernels (statistics, gradients, the
    one-pass sigmoid kernel) for each operand dtype, sm_80 and sm_90: compiled, no spills."""
    _compile_without_spills("similarity", SIM_CASES, lambda *case: _sim_case_id(case))


if triton is not None:
    from kdkernels.triton import projected_feature  # noqa: E402

    HINT_CASES = projected_feature.aot_cases()
else:
    HINT_CASES = []


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
def test_projected_feature_compiles_without_spills():
    """The hint-loss kernel (smooth-L1 with every gradient, cosine statistics, cosine gradient) for
    each operand dtype, sm_80 and sm_90: compiled, no spills."""
    _compile_without_spills("hint", HINT_CASES,
                            lambda k, sig, flags, w: f"{sig['x_ptr'].split(':')[0][1:]}-k{flags['KIND']}-phase"
                                                     f"{flags['PHASE']}-{flags['BLOCK_N']}x{flags['BLOCK_V']}-w{w}")
