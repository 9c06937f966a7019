"""Peak memory of one ``--task lm`` distillation step, ``fused_linear_kl`` against eager PyTorch.

On CUDA: ``torch.cuda.max_memory_allocated`` over the step, above what was allocated before it,
in this process. On a CPU: the peak resident set of a fresh process (``python -m
kdkernels.train.memory``) that builds the teacher and student at the run's sizes, runs the step once
on a tiny batch (one-time costs: thread pools, lazy initialization), then resets the kernel's peak
counter (``/proc/self/clear_refs``) and runs the step on a real batch; the peak (``VmHWM``) minus
the resident set before the step. glibc is told to return every block above 64 KiB to the system
when it is freed (``MALLOC_MMAP_THRESHOLD_=65536``), so the peak follows the live tensors. Linux
only; elsewhere the CPU numbers are None. The weights are random: memory does not depend on them.

Both numbers include the gradients the step writes (the student's parameters).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

__all__ = ["step_peak_mib"]

MIB = 2 ** 20


def _models(spec, device):
    from kdkernels.train.lm import TinyLM

    torch.manual_seed(0)
    teacher = TinyLM(spec["vocab"], spec["teacher_dim"], spec["teacher_layers"], spec["context"]).to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = TinyLM(spec["vocab"], spec["student_dim"], spec["student_layers"], spec["context"]).to(device)
    return teacher, student


def _batch(spec, rows, device):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(spec["vocab"], (rows, spec["context"] + 1), generator=g)
    return ids[:, :-1].to(device), ids[:, 1:].to(device)


def _steps(spec, device):
    from types import SimpleNamespace

    from kdkernels.train.lm import distill_steps

    teacher, student = _models(spec, device)
    cfg = SimpleNamespace(temperature=spec["temperature"], alpha=spec["alpha"])
    return student, distill_steps(student, teacher, cfg)


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _child(spec: dict, which: str) -> float:
    student, steps = _steps(spec, "cpu")
    steps[which](_batch(spec, 1, "cpu"))
    student.zero_grad(set_to_none=True)
    batch = _batch(spec, spec["batch_size"], "cpu")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    base = _status_kib("VmRSS")
    steps[which](batch)
    return (_status_kib("VmHWM") - base) / 1024


def step_peak_mib(spec: dict, device: torch.device) -> dict:
    """``{"fused": MiB, "eager": MiB}`` (None where it cannot be measured). ``spec``: vocab,
    teacher_dim, teacher_layers, student_dim, student_layers, context, batch_size, temperature,
    alpha."""
    if device.type == "cuda":
        student, steps = _steps(spec, device)
        batch = _batch(spec, spec["batch_size"], device)
        out = {}
        for name, step in steps.items():
            student.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(batch)
            torch.cuda.synchronize(device)
            out[name] = (torch.cuda.max_memory_allocated(device) - base) / MIB
        return out
    if not (sys.platform.startswith("linux") and os.path.exists("/proc/self/clear_refs")):
        return {"fused": None, "eager": None}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = {}
    for name in ("fused", "eager"):
        res = subprocess.run([sys.executable, "-m", "kdkernels.train.memory", json.dumps(spec), name],
                             capture_output=True, text=True, env=env, timeout=600)
        try:
            out[name] = float(res.stdout.strip().splitlines()[-1])
        except (IndexError, ValueError):  # clear_refs refused (some containers), or the child failed
            out[name] = None
    return out


if __name__ == "__main__":
    try:
        print(_child(json.loads(sys.argv[1]), sys.argv[2]), flush=True)
    except OSError as exc:
        print(f"cannot measure: {exc}", file=sys.stderr)
        sys.exit(1)
