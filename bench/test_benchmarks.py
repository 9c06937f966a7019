"""`pytest bench/ --benchmark-only`: every registered family's quick cases, every provider,
through pytest-benchmark (pip install .[bench]). The same registry as `python -m bench`; use that
for interleaved timing, memory and the results files."""

import pytest
import torch

from bench import common

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.bfloat16)


def _cases():
    for name in common.family_names():
        family = common.load_family(name)
        for provider in family.providers(DEVICE, notes=[]):
            for shape in family.quick_shapes:
                for dtype in DTYPES:
                    yield pytest.param(family, provider, shape, dtype,
                                       id=f"{name}-{family.shape_label(shape)}-{common.DTYPE_NAMES[dtype]}-{provider.name}")


@pytest.mark.parametrize("family,provider,shape,dtype", list(_cases()))
def test_forward_backward(benchmark, family, provider, shape, dtype):
    inputs = family.make_inputs(shape, dtype, DEVICE)
    provider.new_case()

    def step():
        common.zero_grads(inputs)
        provider.step(inputs)
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    step()  # first call: compilation / JIT
    benchmark.extra_info.update(family=family.name, case=family.shape_label(shape), provider=provider.name,
                                dtype=common.DTYPE_NAMES[dtype], min_bytes=family.min_bytes(shape, dtype))
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
