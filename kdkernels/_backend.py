"""Backend discovery and selection (``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``)."""

from __future__ import annotations

import os
import warnings

import torch

from kdkernels import _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


_TRITON_UNCHECKED = object()
_triton_error = _TRITON_UNCHECKED


def triton_import_error() -> str | None:
    """None when triton imports, else why not (checked once)."""
    global _triton_error
    if _triton_error is _TRITON_UNCHECKED:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401

            _triton_error = None
        except Exception as exc:  # ImportError, or a broken install
            _triton_error = f"{type(exc).__name__}: {exc}"
    return _triton_error


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_kernels_built() -> bool:
    """Whether kdkernels._C was compiled with the CUDA C++ kernels (csrc/cuda)."""
    return _ext.available() and bool(_ext._C.built_with_cuda())


def available_backends(device: str | torch.device = "cpu", has_cuda_kernel: bool = True) -> list[str]:
    """The backends that can run on ``device``, in the order ``auto`` tries them (``"torch"`` last).

    On CUDA tensors Triton comes before the CUDA C++ kernels: ``auto`` switches to them only once
    a committed GPU benchmark (bench/results/) shows them correct and faster."""
    dev = torch.device(device)
    out = []
    if dev.type == "cpu":
        if _ext.available():
            out.append("cpu")
        # the interpreter flag first: picking a CPU backend does not import triton
        if triton_interpreted() and triton_import_error() is None:
            out.append("triton")
    elif dev.type == "cuda":
        if triton_import_error() is None:
            out.append("triton")
        if has_cuda_kernel and cuda_kernels_built():
            out.append("cuda")
    out.append("torch")
    return out


_warned_fallback = False


def resolve(backend: str, device: torch.device, op: str, has_cuda_kernel: bool = True) -> str:
    """Turn ``backend`` into the concrete backend for tensors on ``device``, or raise.
    ``has_cuda_kernel=False``: ``op`` has no CUDA C++ kernel, so ``auto`` never picks one."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        choice = available_backends(device, has_cuda_kernel)[0]
        if choice == "torch" and not _warned_fallback:
            _warned_fallback = True
            if device.type == "cpu":
                why = f"the extension kdkernels._C is not built ({_ext.HOW_TO_BUILD})"
            else:
                why = f"triton is not importable ({triton_import_error()}); `pip install triton`"
            warnings.warn(f"kdkernels: {op} falls back to the plain PyTorch backend on {device.type}: {why}",
                          RuntimeWarning, stacklevel=3)
        return choice
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs CPU tensors, got tensors on {device}")
        _ext.require(f"{op}(backend='cpu')")
    elif backend == "triton":
        err = triton_import_error()
        if err is not None:
            raise RuntimeError(f"{op}(backend='triton') needs triton ({err}); `pip install triton`")
        if device.type == "cpu" and not triton_interpreted():
            raise ValueError(f"{op}(backend='triton') runs CPU tensors only under the Triton interpreter: "
                             "set TRITON_INTERPRET=1 before importing triton, or use backend='cpu'")
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"{op}(backend='triton') runs CUDA tensors, got tensors on {device}")
    elif backend == "cuda":
        if device.type != "cuda":
            raise ValueError(f"{op}(backend='cuda') runs CUDA tensors, got tensors on {device}")
        _ext.require(f"{op}(backend='cuda')")
        if not cuda_kernels_built():
            raise RuntimeError(f"{op}(backend='cuda'): the CUDA extension was not built; reinstall with "
                               "`KDK_CUDA=1 pip install --no-build-isolation .` (needs a CUDA build of torch and "
                               "nvcc), or use backend='triton'")
    return backend


# ------------------------------------------------------------------------------ autocast

def autocast_dtype(device: torch.device):
    """The dtype autocast gives matmul operands on ``device`` (bfloat16 on the CPU by default), or
    None when autocast is off there."""
    kind = torch.device(device).type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except (TypeError, AttributeError, RuntimeError):  # torch < 2.4, or a device autocast does not know
        if kind == "cuda" and torch.is_autocast_enabled():
            return torch.get_autocast_gpu_dtype()
        if kind == "cpu" and torch.is_autocast_cpu_enabled():
            return torch.get_autocast_cpu_dtype()
        return None


def autocast_operands(device, *tensors):
    """``tensors`` as autocast would hand them to a matmul on ``device``: floating tensors other
    than float64 in the autocast dtype (None and float64 pass through). The identity when autocast
    is off. The fused losses call this on their matmul operands (hidden states, weights, biases,
    embeddings) and then run their kernels under :func:`no_autocast`, so their products still
    accumulate in float32 and are never rounded to the autocast dtype."""
    dtype = autocast_dtype(device)
    if dtype is None:
        return tensors
    return tuple(x.to(dtype) if x is not None and x.is_floating_point() and x.dtype not in (torch.float64, dtype)
                 else x for x in tensors)


def no_autocast(device):
    """A context in which ATen ops inside a kernel's launcher keep their operands' dtypes: autocast
    off on ``device`` (the ops cast their operands themselves, see :func:`autocast_operands`)."""
    return torch.autocast(device_type=torch.device(device).type, enabled=False)


def without_autocast(fn):
    """Decorate a kernel launcher: it runs under :func:`no_autocast` on the device of its first
    tensor argument, forward and backward alike (a backward may recompute tiles)."""
    import functools

    @functools.wraps(fn)
    def run(*args, **kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or autocast_dtype(x.device) is None:
            return fn(*args, **kwargs)
        with no_autocast(x.device):
            return fn(*args, **kwargs)

    return run
