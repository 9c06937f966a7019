"""The build: the extension loads, CMake builds the same sources, and a build without it falls back."""

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

import kdkernels

ROOT = Path(__file__).resolve().parents[1]


def test_extension_is_built():
    info = kdkernels.build_info()
    assert info["extension"], f"kdkernels._C did not import: {info}"
    assert info["cpu_simd"] in ("avx2", "avx512", "neon", "generic")
    assert "cpu" in kdkernels.available_backends("cpu")


@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake not installed")
def test_cmake_build_matches_setup_py_build(tmp_path):
    """CMakeLists.txt compiles the same sources through Torch's CMake package into a working module."""
    build = tmp_path / "build"
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    subprocess.run(["cmake", "-S", str(ROOT), "-B", str(build), f"-DPython3_EXECUTABLE={sys.executable}", *gen],
                   check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(build), "-j", str(os.cpu_count() or 2)], check=True, capture_output=True)
    (so,) = list(build.glob("_C*.so")) or list(build.glob("_C*.pyd"))
    probe = textwrap.dedent(f"""
        import importlib.util, torch, kdkernels
        spec = importlib.util.spec_from_file_location("kdkernels._C", {str(so)!r})
        cm = importlib.util.module_from_spec(spec); spec.loader.exec_module(cm)
        from kdkernels import _C
        torch.manual_seed(0)
        s, t = torch.randn(4, 1000), torch.randn(4, 1000)
        one = torch.ones(())
        a = cm.softmax_kl_forward_cpu(s, t, None, one, 2.0, 0, 0.5, -100, 0.0, 1.0, True, False)
        b = _C.softmax_kl_forward_cpu(s, t, None, one, 2.0, 0, 0.5, -100, 0.0, 1.0, True, False)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]), "CMake and setup.py builds disagree"
        print(cm.cpu_simd(), _C.cpu_simd())
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    simd_cmake, simd_setup = out.stdout.split()
    assert simd_cmake == simd_setup


def test_wheel_without_extension(tmp_path):
    """KDK_NO_EXT=1 builds a pure-Python wheel (no compiler needed)."""
    env = {**os.environ, "KDK_NO_EXT": "1"}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", "-w",
                    str(tmp_path), str(ROOT)], check=True, env=env, capture_output=True)
    (whl,) = tmp_path.glob("kdkernels-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    # every family module and the core are packaged (and no module of an earlier layout lingers)
    for name in ("softmax_divergence", "topk_teacher", "fused_linear", "fused_linear_topk", "contrastive", "relational",
                 "projected_feature", "kl_div", "_core/fused_op", "_core/backends", "triton/_common"):
        assert f"kdkernels/{name}.py" in names, name
    assert "kdkernels/functional.py" not in names and not [n for n in names if n.startswith("kdkernels/ops/")]
    assert not [n for n in names if n.endswith((".so", ".pyd"))]


def test_falls_back_without_extension():
    """Without kdkernels._C the package imports, auto falls back with a warning, 'cpu' says how to build."""
    probe = textwrap.dedent("""
        import sys, warnings
        sys.modules["kdkernels._C"] = None  # as if built with KDK_NO_EXT=1
        import torch, kdkernels
        assert not kdkernels.build_info()["extension"]
        assert "cpu" not in kdkernels.available_backends("cpu")
        s, t = torch.randn(3, 11, requires_grad=True), torch.randn(3, 11)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            loss = kdkernels.softmax_kl(s, t)
        assert any("falls back to the plain PyTorch backend" in str(x.message) for x in w), [str(x.message) for x in w]
        ref = kdkernels.reference.softmax_kl(s.double(), t.double())
        assert abs(loss.item() - ref.item()) < 1e-5
        try:
            kdkernels.softmax_kl(s, t, backend="cpu")
        except RuntimeError as e:
            assert "pip install --no-build-isolation" in str(e), e
        else:
            raise AssertionError("backend='cpu' without the extension must raise")
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_is_cheap_and_lazy():
    """Importing kdkernels does not import triton (it is loaded on first use)."""
    out = subprocess.run([sys.executable, "-c", "import sys, kdkernels; print('triton' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_torch_version_floor():
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    assert (major, minor) >= (2, 4)


def _cuda_include():
    nvcc = shutil.which("nvcc")
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda",
             str(Path(os.path.realpath(nvcc)).parents[1]) if nvcc else None]
    for root in filter(None, roots):
        if (Path(root) / "include" / "cuda_runtime_api.h").exists():
            return Path(root) / "include"
    return None


@pytest.mark.skipif(_cuda_include() is None, reason="no CUDA toolkit headers")
def test_cuda_binding_compiles(tmp_path):
    """python/bindings.cpp with KDK_WITH_CUDA (the binding of csrc/cuda) compiles against torch's
    headers. A CPU build of torch ships c10/cuda without its generated cuda_cmake_macros.h, which
    holds only build-configuration macros: an empty one stands in for it here."""
    import sysconfig

    from torch.utils import cpp_extension

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    if not any((Path(p) / "c10/cuda/impl/cuda_cmake_macros.h").exists() for p in cpp_extension.include_paths()):
        (stub / "cuda_cmake_macros.h").write_text("#pragma once\n")
    cmd = [os.environ.get("CXX", "c++"), "-std=c++20", "-fsyntax-only", "-Wall", "-Wno-c++20-extensions",
           "-DKDK_WITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *[f"-I{p}" for p in cpp_extension.include_paths()], f"-I{sysconfig.get_paths()['include']}",
           f"-I{_cuda_include()}", f"-I{tmp_path}", str(ROOT / "python" / "bindings.cpp")]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    ours = [line for line in out.stderr.splitlines() if str(ROOT) in line and "warning" in line]
    assert not ours, "\n".join(ours)
