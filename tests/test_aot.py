"""Ahead-of-time compile of every softmax-KL Triton kernel variant the launcher uses, for sm_80
and sm_90, with no GPU: a compile error or a register spill (cuobjdump's STACK > 0) fails.

Run ``pytest -s tests/test_aot.py`` to see the REG / STACK table. The test session may run
Triton in interpreter mode (TRITON_INTERPRET=1, set by conftest.py without a GPU), where kernels
cannot be compiled; so the compiles run in child processes started without that variable (this
file is their entry point), all cases at once, spread over the machine's cores, the first time
a test asks for a result.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

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
    from kdkernels.triton import softmax_kl  # noqa: E402

    CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    _TRITON_VERSION = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    CASES = softmax_kl.aot_cases()
else:
    CUOBJDUMP, _TRITON_VERSION, CASES = "", (0, 0), []


def _case_id(case):
    sig, flags, num_warps = case
    dtypes = sig["s_ptr"].split(":")[0][1:] + "-" + sig["t_ptr"].split(":")[0][1:]
    feats = "".join(k[0] + k[1:].lower() for k in ("HAS_LABELS", "CE", "SAME_T", "GRAD_S", "GRAD_T") if flags[k])
    mode = "single" if flags["SINGLE_PASS"] else "stream"
    align = "a16" if sig["V"].endswith(":16") else "u"
    return f"{dtypes}-k{flags['KIND']}-{mode}{flags['BLOCK']}-w{num_warps}-{align}-{feats or 'plain'}"


def _source(fn, sig, flags):
    """ASTSource for this triton version; ':16' suffixes become divisibility attributes."""
    from triton.compiler import ASTSource

    types = {k: v.split(":")[0] for k, v in sig.items()}
    div16 = [k for k, v in sig.items() if v.endswith(":16")]
    if _TRITON_VERSION >= (3, 3):
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16}
        return ASTSource(fn, types, flags, attrs)
    # triton 3.2: constexpr arguments are not part of the signature; skip the alignment hints
    types = {k: v for k, v in types.items() if v != "constexpr"}
    return ASTSource(fn, types, flags)


def _compile_one(index, arch):
    """REG, STACK, error message or None; runs in a child process (not interpreted)."""
    from triton.backends.compiler import GPUTarget

    sig, flags, num_warps = CASES[index]
    try:
        compiled = triton.compile(_source(softmax_kl._softmax_kl_kernel, sig, flags),
                                  target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            out = subprocess.run([CUOBJDUMP, "--dump-resource-usage", path],
                                 capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)", out)
        if m is None:
            return None, None, "no REG/STACK in cuobjdump output:\n" + out
        return int(m.group(1)), int(m.group(2)), None
    except Exception as e:  # reported by the test that asks for this case
        return None, None, f"{type(e).__name__}: {e}"


_RESULTS = {}


def _results():
    if not _RESULTS:
        jobs = [f"{i}:{arch}" for i in range(len(CASES)) for arch in ARCHS]
        nproc = max(1, min(len(jobs), os.cpu_count() or 1))
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
        env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
        procs = [subprocess.Popen([sys.executable, os.path.abspath(__file__), *jobs[k::nproc]],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for k in range(nproc)]
        for k, proc in enumerate(procs):
            out, err = proc.communicate()
            got = {}
            for line in out.splitlines():
                if line.startswith("{"):
                    r = json.loads(line)
                    got[(r["index"], r["arch"])] = (r["reg"], r["stack"], r["error"])
            for job in jobs[k::nproc]:
                i, arch = map(int, job.split(":"))
                _RESULTS[(i, arch)] = got.get((i, arch), (None, None, f"compile worker failed:\n{err[-4000:]}"))
    return _RESULTS


@pytest.mark.skipif(triton is None or not os.path.exists(CUOBJDUMP), reason="needs triton and its cuobjdump")
@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: f"sm{a}")
@pytest.mark.parametrize("index", range(len(CASES)), ids=[_case_id(c) for c in CASES])
def test_softmax_kl_compiles_without_spills(index, arch):
    reg, stack, err = _results()[(index, arch)]
    name = _case_id(CASES[index])
    assert err is None, f"{name} sm_{arch}: {err}"
    print(f"\nsm_{arch} {name}: REG:{reg} STACK:{stack}", end="")
    assert stack == 0, f"{name} sm_{arch}: register spills, STACK:{stack} (REG:{reg})"


if __name__ == "__main__":
    # child process: compile "index:arch" jobs and print one JSON line per job
    for job in sys.argv[1:]:
        i, arch = map(int, job.split(":"))
        reg, stack, error = _compile_one(i, arch)
        print(json.dumps({"index": i, "arch": arch, "reg": reg, "stack": stack, "error": error}), flush=True)
