"""The ``kdkernels`` command, one argparse subparser per subcommand: ``kdkernels distill ...``
(the trainer, :mod:`kdkernels.train`) and ``kdkernels demo ...`` (the fused loss on a built-in
default, ``python -m kdkernels``)."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    from kdkernels import __main__ as demo
    from kdkernels.train import config

    parser = argparse.ArgumentParser(prog="kdkernels", description="Fused knowledge-distillation losses for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="{distill,demo}", title="commands")
    distill = sub.add_parser("distill", help="distill a student from a teacher and compare it with the student "
                             "trained alone (kdkernels distill --help)", **config._parser_options("kdkernels distill"))
    config.add_arguments(distill)
    distill.set_defaults(parser=distill)
    demo_parser = sub.add_parser("demo", help="the fused loss against the float64 reference and eager PyTorch "
                                 "(kdkernels demo --help)", prog="kdkernels demo", description=demo.DESCRIPTION)
    demo.add_arguments(demo_parser)
    demo_parser.set_defaults(parser=demo_parser)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args, rest = parser.parse_known_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed by argparse
        return exc.code if isinstance(exc.code, int) else 2
    if args.command is None:
        parser.print_usage(sys.stderr)
        return 2
    if args.command == "demo":
        if rest:
            print(f"kdkernels demo: error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
            return 2
        from kdkernels.__main__ import run

        return run(args)
    from kdkernels.train.cli import main as distill

    return distill(prog="kdkernels distill", parsed=(args.parser, args, rest))
