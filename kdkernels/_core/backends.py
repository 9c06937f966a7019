"""The backend registry: which op runs on which backend, and how ``backend=`` is resolved.

``backend="auto" | "triton" | "cuda" | "cpu" | "torch"``:

* ``"cpu"``: the C++ kernels of the compiled extension (csrc/cpu), CPU tensors;
* ``"triton"``: the Triton kernels (kdkernels/triton), CUDA tensors, or CPU tensors under
  ``TRITON_INTERPRET=1``;
* ``"cuda"``: the CUDA C++ kernels (csrc/cuda), CUDA tensors, when the extension was built with them;
* ``"torch"``: the memory-bounded PyTorch path of the op (row chunks or tiles), any device.

Every op registers the backends it has with :func:`register`; ``auto``, :func:`available_backends`
and the "not available, here is how to get it" errors all come from that one table.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from kdkernels._core import ext as _ext

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
KERNELS = ("cpu", "triton", "cuda", "torch")


@dataclass(frozen=True)
class OpBackends:
    """The backends an op has (``torch`` always: the PyTorch path), and a note on the ones it lacks."""

    name: str
    cpu: bool = True
    triton: bool = True
    cuda: bool = False
    torch: bool = True

    def has(self, backend: str) -> bool:
        return bool(getattr(self, backend))


REGISTRY: Dict[str, OpBackends] = {}


def register(name: str, *, cpu: bool = True, triton: bool = True, cuda: bool = False) -> OpBackends:
    """Declare the backends of the public op ``name`` (the name its errors use)."""
    entry = OpBackends(name, cpu=cpu, triton=triton, cuda=cuda)
    REGISTRY[name] = entry
    return entry


_TRITON_UNCHECKED = object()
_triton_error = _TRITON_UNCHECKED


def triton_import_error() -> Optional[str]:
    """None when triton imports, else why not (checked once, on first use: importing triton costs
    about 150 MiB resident, so the CPU path never does it unless the interpreter is on)."""
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


def _usable(backend: str, dev: torch.device) -> bool:
    if backend == "torch":
        return True
    if backend == "cpu":
        return dev.type == "cpu" and _ext.available()
    if backend == "triton":
        if dev.type == "cpu":  # the interpreter flag first: a CPU run does not import triton
            return triton_interpreted() and triton_import_error() is None
        return dev.type == "cuda" and triton_import_error() is None
    if backend == "cuda":
        return dev.type == "cuda" and cuda_kernels_built()
    return False


def available_backends(device="cpu", op: Optional[str] = None) -> list:
    """The backends that can run on ``device`` (of ``op``, a public loss's name, or of any op), in
    the order ``auto`` tries them, ``"torch"`` last.

    On CUDA tensors Triton comes before the CUDA C++ kernels: ``auto`` switches to them only once
    a committed GPU benchmark (bench/results/) shows them correct and faster."""
    dev = torch.device(device)
    entry = REGISTRY[op] if op is not None else OpBackends("any", cuda=True)
    order = ("cpu", "triton", "cuda", "torch") if dev.type == "cpu" else ("triton", "cuda", "cpu", "torch")
    return [b for b in order if entry.has(b) and _usable(b, dev)]


_warned_fallback = False


def _no_extension(call: str) -> str:
    return f"{call} needs the compiled extension kdkernels._C, which is not importable ({_ext.IMPORT_ERROR}); " \
           f"{_ext.HOW_TO_BUILD}"


def _missing(op: str, backend: str, device: torch.device) -> str:
    """Why ``op(backend=...)`` cannot run on ``device`` and how to get it (None when it can)."""
    entry = REGISTRY[op]
    call = f"{op}(backend={backend!r})"
    if not entry.has(backend):
        names = [repr(b) for b in ("auto", *KERNELS) if b == "auto" or entry.has(b)]
        alt = ", ".join(names[:-1]) + " or " + names[-1]
        what = {"cpu": "C++ CPU", "triton": "Triton", "cuda": "CUDA C++"}[backend]
        return f"{call}: {op} has no {what} kernel; use backend={alt}"
    if backend == "cpu":
        if device.type != "cpu":
            return f"{call} runs CPU tensors, got tensors on {device}"
        if not _ext.available():
            return _no_extension(call)
    elif backend == "triton":
        if device.type not in ("cpu", "cuda"):
            return f"{call} runs CUDA tensors, got tensors on {device}"
        err = triton_import_error() if device.type == "cuda" or triton_interpreted() else None
        if err is not None:
            return f"{call} needs triton ({err}); `pip install triton`"
        if device.type == "cpu" and not triton_interpreted():
            return (f"{call} runs CPU tensors only under the Triton interpreter: set TRITON_INTERPRET=1 before "
                    "importing triton, or use backend='cpu'")
    elif backend == "cuda":
        if device.type != "cuda":
            return f"{call} runs CUDA tensors, got tensors on {device}"
        if not _ext.available():
            return _no_extension(call)
        if not cuda_kernels_built():
            return (f"{call}: the CUDA extension was not built; reinstall with `KDK_CUDA=1 pip install "
                    "--no-build-isolation .` (needs a CUDA build of torch and nvcc), or use backend='triton'")
    return None


def resolve(backend: str, device: torch.device, op: str) -> str:
    """Turn ``backend`` into the concrete backend that runs ``op`` on tensors on ``device``, or raise:
    ``ValueError`` for a backend the op or the device does not have, ``RuntimeError`` for one that
    is missing from this installation (with how to get it)."""
    global _warned_fallback
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        choice = available_backends(device, op)[0]
        if choice == "torch" and not _warned_fallback and any(REGISTRY[op].has(b) for b in ("cpu", "triton")):
            _warned_fallback = True
            if device.type == "cpu":
                why = f"the extension kdkernels._C is not built ({_ext.HOW_TO_BUILD})"
            else:
                why = f"triton is not importable ({triton_import_error()}); `pip install triton`"
            warnings.warn(f"kdkernels: {op} falls back to the plain PyTorch backend on {device.type}: {why}",
                          RuntimeWarning, stacklevel=3)
        return choice
    why = _missing(op, backend, device)
    if why is not None:
        installed = ("not importable" in why or "not built" in why or "needs triton" in why)
        raise (RuntimeError if installed else ValueError)(why)
    return backend
