"""The ``kdkernels`` command: ``kdkernels distill ...`` (the trainer, :mod:`kdkernels.train`) and
``kdkernels demo ...`` (the fused loss on a built-in default, ``python -m kdkernels``)."""

from __future__ import annotations

import sys

__all__ = ["main"]

USAGE = """usage: kdkernels {distill,demo} [options]

  distill   distill a student from a teacher and compare it with the student trained alone
            (kdkernels distill --help)
  demo      the fused loss against the float64 reference and eager PyTorch (kdkernels demo --help)
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "distill":
        from kdkernels.train.cli import main as distill

        return distill(rest)
    if command == "demo":
        from kdkernels.__main__ import main as demo

        return demo(rest)
    print(f"kdkernels: unknown command {command!r}\n" + USAGE, file=sys.stderr, end="")
    return 2
