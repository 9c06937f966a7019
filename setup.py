"""Build of kdkernels and its compiled extension kdkernels._C.

Environment switches:
  KDK_NO_EXT=1            build no extension (pure Python; the Triton and torch backends remain)
  KDK_CUDA=auto|0|1       compile csrc/cuda/*.cu: auto (default) when torch has CUDA and nvcc is
                          found, 1 requires it (fails otherwise), 0 never. In auto mode a CUDA
                          compile error falls back to a CPU-only extension.
  KDK_CPU_ARCH=native|generic
                          native (default) compiles the CPU kernels for the AVX2/FMA/F16C units of
                          an x86-64 build machine that has them; generic uses the compiler's defaults.
  TORCH_CUDA_ARCH_LIST    CUDA targets, as for any torch extension (e.g. "8.0;9.0a").
  MAX_JOBS                parallel compile jobs (ninja).
"""

import glob
import os
import platform
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _env(name, default):
    return os.environ.get(name, default).strip().lower()


def _x86_simd_flags():
    if _env("KDK_CPU_ARCH", "native") == "generic" or platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return []


def _extensions():
    if _env("KDK_NO_EXT", "0") in ("1", "true", "yes"):
        print("kdkernels: KDK_NO_EXT set, building without the compiled extension", file=sys.stderr)
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cpu_sources = sorted(glob.glob("csrc/cpu/*.cpp")) + sorted(glob.glob("python/*.cpp"))
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"] + _x86_simd_flags()
    link = ["-fopenmp"]

    mode = _env("KDK_CUDA", "auto")
    if mode not in ("auto", "0", "1"):
        raise SystemExit(f"KDK_CUDA must be auto, 0 or 1, got {mode!r}")
    have_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if mode == "1" and not have_cuda:
        raise SystemExit("KDK_CUDA=1 but torch has no CUDA or nvcc was not found (set CUDA_HOME)")
    use_cuda = mode != "0" and have_cuda and bool(cuda_sources)
    if mode != "0" and not use_cuda:
        reason = "no csrc/cuda sources" if have_cuda else "torch has no CUDA or nvcc was not found"
        print(f"kdkernels: building the CPU kernels only ({reason})", file=sys.stderr)

    def make(with_cuda):
        if with_cuda:
            return cpp_extension.CUDAExtension(
                "kdkernels._C", cpu_sources + cuda_sources,
                extra_compile_args={"cxx": cxx + ["-DKDK_WITH_CUDA"],
                                    "nvcc": ["-O3", "-std=c++17", "-DKDK_WITH_CUDA", "--use_fast_math"]},
                extra_link_args=link)
        return cpp_extension.CppExtension("kdkernels._C", cpu_sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=link)

    class BuildExt(cpp_extension.BuildExtension):
        """Falls back to a CPU-only extension when the optional CUDA part fails to compile."""

        def build_extensions(self):
            try:
                super().build_extensions()
            except Exception as exc:  # noqa: BLE001 - any compiler failure
                if not (use_cuda and mode == "auto"):
                    raise
                print(f"kdkernels: the CUDA kernels failed to build ({exc}); building the CPU kernels only",
                      file=sys.stderr)
                self.extensions = [make(False)]
                super().build_extensions()

    return [make(use_cuda)], {"build_ext": BuildExt.with_options(use_ninja=True)}


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
