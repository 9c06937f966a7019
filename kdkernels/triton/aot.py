"""Ahead-of-time compile of the package's Triton kernels for real GPUs, with no GPU present.

``compile_cases`` compiles kernel variants for sm_80 / sm_90 with ``triton.compile`` and reads
each cubin's resource usage with the ``cuobjdump`` that triton's wheel ships: registers per
thread, stack (non-zero means register spills) and shared memory; ``occupancy`` turns those into
the resident warps per SM they allow. Used by ``tests/test_aot.py`` (no spills, on every CI run)
and by ``python -m bench.roofline``.

Kernels cannot be compiled while triton runs in interpreter mode (``TRITON_INTERPRET=1``, how the
tests run kernels on the CPU), so the compiles run in child processes started without it
(``python -m kdkernels.triton.aot``, jobs as JSON on stdin, one JSON line per result), spread over
the machine's cores.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

# kernel name -> (module, attribute) of the @triton.jit function
KERNELS = {"softmax_kl": ("kdkernels.triton.softmax_kl", "_softmax_kl_kernel"),
           "topk_kl": ("kdkernels.triton.topk_kl", "_topk_kl_kernel"),
           "fused_linear_kl_stats": ("kdkernels.triton.fused_linear_kl", "_stats_kernel"),
           "fused_linear_kl_grad": ("kdkernels.triton.fused_linear_kl", "_grad_kernel"),
           "similarity_stats": ("kdkernels.triton.similarity", "_stats_kernel"),
           "similarity_grad": ("kdkernels.triton.similarity", "_grad_kernel"),
           "similarity_sigmoid": ("kdkernels.triton.similarity", "_sigmoid_kernel"),
           "projected_feature": ("kdkernels.triton.projected_feature", "_hint_kernel")}

# per-SM limits: registers, max resident warps, max resident blocks, shared memory per SM (bytes)
SM_LIMITS = {80: (65536, 64, 32, 164 * 1024), 90: (65536, 64, 32, 228 * 1024)}


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def _source(fn, sig, flags):
    """ASTSource for this triton version; ':16' suffixes in ``sig`` become divisibility attributes."""
    import triton
    from triton.compiler import ASTSource

    version = tuple(int(x) for x in re.findall(r"\d+", triton.__version__)[:2])
    types = {k: v.split(":")[0] for k, v in sig.items()}
    div16 = [k for k, v in sig.items() if v.endswith(":16")]
    if version >= (3, 3):
        attrs = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k in div16}
        return ASTSource(fn, types, flags, attrs)
    # triton 3.2: constexpr arguments are not part of the signature; no alignment hints
    types = {k: v for k, v in types.items() if v != "constexpr"}
    return ASTSource(fn, types, flags)


def compile_case(kernel: str, sig: dict, flags: dict, num_warps: int, arch: int) -> dict:
    """Compile one variant in this process (triton must not be in interpreter mode)."""
    import triton
    from triton.backends.compiler import GPUTarget

    module, attr = KERNELS[kernel]
    fn = getattr(importlib.import_module(module), attr)
    out = {"reg": None, "stack": None, "shared": None, "error": None}
    try:
        compiled = triton.compile(_source(fn, sig, flags), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps})
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "kernel.cubin")
            with open(path, "wb") as f:
                f.write(compiled.asm["cubin"])
            dump = subprocess.run([cuobjdump_path(), "--dump-resource-usage", path],
                                  capture_output=True, text=True, check=True).stdout
        m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", dump)
        if m is None:
            out["error"] = "no REG/STACK/SHARED in cuobjdump output:\n" + dump
        else:
            out["reg"], out["stack"], out["shared"] = (int(g) for g in m.groups())
            out["shared"] = max(out["shared"], int(getattr(compiled.metadata, "shared", 0) or 0))
    except Exception as e:  # reported to whoever asked for this case
        out["error"] = f"{type(e).__name__}: {e}"
    return out


def compile_cases(jobs: list) -> list:
    """Compile ``[(kernel, sig, flags, num_warps, arch), ...]`` in child processes (one per core);
    returns one result dict per job, in order."""
    if not jobs:
        return []
    nproc = max(1, min(len(jobs), os.cpu_count() or 1))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in [env.get("PYTHONPATH")] if p])
    procs = []
    for k in range(nproc):
        mine = [(i, job) for i, job in enumerate(jobs) if i % nproc == k]
        p = subprocess.Popen([sys.executable, "-m", "kdkernels.triton.aot"], env=env, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        procs.append((p, json.dumps(mine), mine))
    results = [None] * len(jobs)
    for p, payload, mine in procs:
        out, err = p.communicate(payload)
        got = {}
        for line in out.splitlines():
            if line.startswith("{"):
                r = json.loads(line)
                got[r.pop("index")] = r
        for i, _ in mine:
            results[i] = got.get(i, {"reg": None, "stack": None, "shared": None,
                                     "error": f"compile worker failed:\n{err[-4000:]}"})
    return results


def occupancy(reg: int, shared: int, num_warps: int, arch: int) -> float:
    """Fraction of an SM's warp slots the kernel can fill, limited by registers, shared memory,
    warps and blocks (registers are allocated per warp in units of 256)."""
    regs_per_sm, max_warps, max_blocks, smem_per_sm = SM_LIMITS[arch]
    regs_per_warp = -(-max(reg, 1) * 32 // 256) * 256
    blocks = min(max_blocks, max_warps // num_warps, regs_per_sm // (regs_per_warp * num_warps))
    if shared:
        blocks = min(blocks, smem_per_sm // shared)
    return blocks * num_warps / max_warps


if __name__ == "__main__":
    # child process: [[index, [kernel, sig, flags, num_warps, arch]], ...] on stdin
    for index, (kernel, sig, flags, num_warps, arch) in json.load(sys.stdin):
        print(json.dumps({"index": index, **compile_case(kernel, sig, flags, num_warps, arch)}), flush=True)
