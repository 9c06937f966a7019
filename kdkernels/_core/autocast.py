"""Autocast: the fused losses cast their matmul operands as autocast would, then run their kernels
with autocast off, so that products accumulate in float32 and are never rounded."""

from __future__ import annotations

import functools

import torch


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
    @functools.wraps(fn)
    def run(*args, **kwargs):
        x = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if x is None or autocast_dtype(x.device) is None:
            return fn(*args, **kwargs)
        with no_autocast(x.device):
            return fn(*args, **kwargs)

    return run
