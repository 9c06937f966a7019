"""Ahead-of-time compile, with no GPU: every csrc/cuda/*.cu with nvcc, and every softmax-KL Triton
kernel variant the launcher uses, for sm_80 and sm_90; a compile error or a register spill fails.

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


@pytest.mark.skipif(NVCC is None, reason="nvcc not found")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
@pytest.mark.parametrize("source", CUDA_SOURCES or [None], ids=lambda p: os.path.basename(p) if p else "none")
def test_cuda_sources_compile_without_spills(source, arch, tmp_path):
    """Every csrc/cuda/*.cu compiles on its own (raw CUDA, no ATen) with no register spills."""
    if source is None:
        pytest.skip("csrc/cuda has no .cu sources in this release")
    code = arch.replace("sm_", "compute_")
    out = subprocess.run([NVCC, "-std=c++17", "-O3", "-c", source, "-o", str(tmp_path / "k.o"),
                          f"-gencode=arch={code},code={arch}", "-Xptxas=-v,-warn-spills,-warn-lmem-usage",
                          f"-I{os.path.join(ROOT, 'csrc')}"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    spills = [line for line in out.stderr.splitlines() if re.search(r"[1-9]\d* bytes spill", line)]
    assert not spills, "\n".join(spills)


# ------------------------------------------------------------------ Triton kernels

if triton is not None:
    from kdkernels.triton import aot, softmax_kl  # noqa: E402

    CUOBJDUMP = aot.cuobjdump_path()
    CASES = softmax_kl.aot_cases()
else:
    CUOBJDUMP, CASES = "", []


def _case_id(case):
    sig, flags, num_warps = case
    dtypes = sig["s_ptr"].split(":")[0][1:] + "-" + sig["t_ptr"].split(":")[0][1:]
    feats = "".join(k[0] + k[1:].lower() for k in ("HAS_LABELS", "CE", "SAME_T", "GRAD_S", "GRAD_T") if flags[k])
    mode = "single" if flags["SINGLE_PASS"] else "stream"
    align = "a16" if sig["V"].endswith(":16") else "u"
    return f"{dtypes}-k{flags['KIND']}-{mode}{flags['BLOCK']}-w{num_warps}-{align}-{feats or 'plain'}"


_RESULTS = {}


def _results():
    """All cases for all archs, compiled once (in parallel child processes) on first use."""
    if not _RESULTS:
        keys = [(i, arch) for i in range(len(CASES)) for arch in ARCHS]
        jobs = [("softmax_kl", *CASES[i], arch) for i, arch in keys]
        _RESULTS.update(zip(keys, aot.compile_cases(jobs)))
    return _RESULTS


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_softmax_kl_compiles_without_spills(index, arch):
    r = _results()[(index, arch)]
    name = _case_id(CASES[index])
    assert r["error"] is None, f"{name} sm_{arch}: {r['error']}"
    occ = aot.occupancy(r["reg"], r["shared"], CASES[index][2], arch)
    print(f"\nsm_{arch} {name}: REG:{r['reg']} STACK:{r['stack']} SHARED:{r['shared']} occupancy {occ:.0%}", end="")
    assert r["stack"] == 0, f"{name} sm_{arch}: register spills, STACK:{r['stack']} (REG:{r['reg']})"
