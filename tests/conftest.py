"""Shared test setup: device parametrization and the float64-reference comparator.

Without a CUDA GPU, Triton kernels run on CPU tensors under the Triton interpreter: the variable
must be set before triton is first imported, hence here.
"""

import math
import os
import random
import subprocess
import sys
import textwrap

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# relative tolerance on ||out - ref|| / ||ref|| per dtype
RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# ||ref|| is floored at FLOOR per row: a row's probabilities sum to 1, so its rounding errors are
# relative to O(1) even where the exact answer is 0 (V = 1, identical rows)
FLOOR = 0.1


def triton_ok() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def fused_backends(device: str):
    """The fused backends every test must cover on ``device``: on the CPU the C++ kernel, and the
    Triton kernel under the interpreter (set above when there is no GPU); on CUDA the Triton kernel
    and, in a build with KDK_CUDA, the CUDA C++ kernels (tests/test_cuda_emu.py runs those on the CPU)."""
    from kdkernels._core.backends import cuda_kernels_built, triton_interpreted

    if device == "cpu":
        return ["cpu"] + (["triton"] if triton_ok() and triton_interpreted() else [])
    return ["triton"] + (["cuda"] if cuda_kernels_built() else [])


def backend_device_params():
    return [pytest.param(b, d, id=f"{b}-{d}") for d in DEVICES for b in fused_backends(d)]


def loosest(*dtypes):
    return max(dtypes, key=lambda d: RTOL[d])


def vocab_sum_scale(V: int) -> float:
    """The tolerance factor of a gradient that sums over a vocabulary of V (the hidden states'
    gradient of an lm_head loss: sum_v g_v W_v). Its float32 rounding grows as sqrt(V) whoever
    computes it: eager PyTorch in float32 (logits materialized) against float64 measured 3.4e-6
    median relative error at V = 32001 and 6.6e-6 at V = 131073 (max 8.1e-6 over 5 seeds; H = 64),
    and kdkernels the same to two digits. Above V = 32768 the bound grows with sqrt(V)."""
    return max(1.0, math.sqrt(V / 32768))


def assert_close(out, ref, dtype, what="", scale=1.0):
    """||out - ref|| <= scale rtol max(||ref||, FLOOR sqrt(rows)), with ref computed in float64."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(out64).any(), f"{what}: NaN in output (unwritten element?)"
    err = (out64 - ref64).norm().item()
    rows = ref64.shape[0] if ref64.dim() else 1
    bound = scale * RTOL[dtype] * max(ref64.norm().item(), FLOOR * math.sqrt(max(1, rows)))
    assert err <= bound, f"{what}: ||out-ref|| = {err:.3e} > {bound:.3e} (||ref|| = {ref64.norm().item():.3e})"


@pytest.fixture
def seed():
    """A fresh seed per test, printed on failure so a failing case can be replayed."""
    s = random.randrange(2**31)
    torch.manual_seed(s)
    return s


# Peak-memory probes run in a fresh process: this prelude defines ``peak_extra(step)``, the bytes
# by which one call of ``step`` raises the peak RSS over the RSS just before it (the kernel's
# peak counter reset through /proc/self/clear_refs). ``run_memory_probe`` appends a probe body
# to it and runs it with every allocation of 64 KiB or more in its own mapping, so that freed
# tensors go back to the OS at once and the peak follows the live tensors.
PEAK_RSS_PRELUDE = "from kdkernels._core.memory import peak_extra_bytes as peak_extra\n"

HAS_PEAK_RSS_RESET = os.path.exists("/proc/self/clear_refs")


def run_memory_probe(body: str, *args, single_thread: bool = True) -> int:
    """Run PEAK_RSS_PRELUDE + ``body`` (which prints one integer last) with ``args`` in argv."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    if single_thread:
        env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_PRELUDE + textwrap.dedent(body), *map(str, args)],
                         capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


class LargeOutputs:
    """A TorchDispatchMode that records every ATen op called from Python (outside the kdkernels
    custom ops, whose kernels it does not see) that allocates an output of at least ``limit``
    elements (a storage none of its inputs has): a copy of a strided input made before the kernel
    shows up here, by op name and shape; views do not."""

    def __init__(self, limit: int):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        self.limit, self.seen = limit, []
        outer = self

        def storages(xs):
            return {x.untyped_storage().data_ptr() for x in tree_flatten(xs)[0] if isinstance(x, torch.Tensor)}

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if not str(func).startswith("kdkernels"):
                    inputs = storages((args, kwargs))
                    for x in tree_flatten(out)[0]:
                        if isinstance(x, torch.Tensor) and x.numel() >= outer.limit and \
                                x.untyped_storage().data_ptr() not in inputs:
                            outer.seen.append((str(func), tuple(x.shape)))
                return out

        self._mode = _Mode()

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def open_clip_loss_module():
    """open_clip's loss.py, loaded on its own (the package imports torchvision); None when absent."""
    import importlib.util

    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    if not os.path.exists(path):
        return None
    mod_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod
