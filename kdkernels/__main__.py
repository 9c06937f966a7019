"""`python -m kdkernels`: a short end-to-end run of the fused loss on a built-in default.

It distills nothing; it shows on this machine that the fused softmax-KL is right (loss and gradient
against the float64 reference, and torch.autograd.gradcheck) and how fast it is against eager
PyTorch, with the same inputs.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import kdkernels
from kdkernels import reference

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _median_ms(fn, repeats):
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--rows", type=int, default=256, help="N, tokens in the batch (default 256)")
    p.add_argument("--vocab", type=int, default=32000, help="V, vocabulary size (default 32000)")
    p.add_argument("--dtype", choices=DTYPES, default="fp32")
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--divergence", choices=["forward", "reverse", "jsd"], default="forward")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    return p


DESCRIPTION = __doc__.splitlines()[0]


def main(argv=None) -> int:
    return run(add_arguments(argparse.ArgumentParser(prog="python -m kdkernels", description=DESCRIPTION))
               .parse_args(argv))


def run(a: argparse.Namespace) -> int:
    torch.manual_seed(a.seed)
    dev, dt, T = torch.device(a.device), DTYPES[a.dtype], a.temperature
    print(f"kdkernels {kdkernels.__version__} | torch {torch.__version__} | device {dev} | "
          f"build {kdkernels.build_info()} | backends {kdkernels.available_backends(dev)}")
    s = (torch.randn(a.rows, a.vocab, device=dev) * 2).to(dt).requires_grad_()
    t = (s.detach().float() + torch.randn(a.rows, a.vocab, device=dev)).to(dt)
    print(f"student/teacher logits [{a.rows}, {a.vocab}] {a.dtype}, divergence={a.divergence}, T={T}")

    # 1. value and gradient against the float64 reference
    loss = kdkernels.softmax_kl(s, t, temperature=T, divergence=a.divergence, backend=a.backend)
    (g,) = torch.autograd.grad(loss, s)
    s64 = s.detach().double().requires_grad_()
    ref = reference.softmax_kl(s64, t.double(), temperature=T, divergence=a.divergence)
    (g64,) = torch.autograd.grad(ref, s64)
    rel_g = ((g.double() - g64).norm() / g64.norm()).item()
    print(f"loss {loss.item():.6f}  float64 reference {ref.item():.6f}  |rel err| "
          f"{abs(loss.item() - ref.item()) / abs(ref.item()):.2e}; gradient rel err {rel_g:.2e}")

    # 2. gradcheck in float64 on a small problem, student and teacher gradients
    xs = torch.randn(3, 7, dtype=torch.float64, device=dev, requires_grad=True)
    xt = torch.randn(3, 7, dtype=torch.float64, device=dev, requires_grad=True)
    labels = torch.tensor([2, -100, 6], device=dev)
    ok = torch.autograd.gradcheck(
        lambda x, y: kdkernels.distill_loss(x, y, labels, temperature=T, alpha=0.3, divergence=a.divergence,
                                            reduction="none", backend=a.backend), (xs, xt))
    print(f"gradcheck (float64, student and teacher, with CE mix and an ignored row): {'passed' if ok else 'FAILED'}")

    # 3. speed of forward + backward against eager PyTorch, same inputs
    def eager():
        out = F.kl_div(F.log_softmax(s.float() / T, -1), F.log_softmax(t.float() / T, -1),
                       reduction="batchmean", log_target=True)
        out.backward()
        s.grad = None

    def fused():
        kdkernels.softmax_kl(s, t, temperature=T, divergence=a.divergence, backend=a.backend).backward()
        s.grad = None

    if a.divergence == "forward":
        te, tf = _median_ms(eager, a.repeats), _median_ms(fused, a.repeats)
        print(f"forward+backward median of {a.repeats}: eager {te:.1f} ms, kdkernels {tf:.1f} ms "
              f"({te / tf:.1f}x); kdkernels allocates only the {s.numel() * s.element_size() / 2**20:.0f} MiB gradient")
    else:
        print(f"forward+backward median of {a.repeats}: kdkernels {_median_ms(fused, a.repeats):.1f} ms")
    return 0 if ok and rel_g < (1e-4 if dt == torch.float32 else 2e-2) else 1


if __name__ == "__main__":
    sys.exit(main())
