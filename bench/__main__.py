"""python -m bench [family ...] [--device cpu|cuda] [--dtype fp32,bf16] [--quick] [--out DIR]"""

from __future__ import annotations

import argparse
import difflib
import gc
import sys
import time
from pathlib import Path

import torch

from bench import common


def parse_args(argv):
    families = common.family_names()
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Time forward+backward of kdkernels losses against eager PyTorch and torch.compile.",
        epilog=f"families: {', '.join(families)}. Results go to bench/results/ "
               "(<device>-<date>-<family>.csv/.json/.md) and the markdown table is printed last.")
    parser.add_argument("families", nargs="*", metavar="family",
                        help="families to run (default: all)")
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu",
                        help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default="fp32,bf16",
                        help=f"comma-separated, from {', '.join(common.DTYPES)} (default: fp32,bf16)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and reps")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated shapes to run instead of the family's (e.g. 1024x512x32768)")
    parser.add_argument("--reps", type=int, default=None,
                        help="timed reps per provider (default: as many as fit a time budget per case)")
    parser.add_argument("--skip-memory", action="store_true",
                        help="do not measure peak memory (on CPU that saves one subprocess per row)")
    parser.add_argument("--out", type=Path, default=common.RESULTS_DIR,
                        help=f"results directory (default: {common.RESULTS_DIR.relative_to(common.REPO_ROOT)})")
    args = parser.parse_args(argv)

    for name in args.families:
        if name not in families:
            close = difflib.get_close_matches(name, families, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            parser.error(f"unknown family {name!r}{hint}; available: {', '.join(families)}")
    args.families = list(dict.fromkeys(args.families)) or families

    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    for d in dtypes:
        if d not in common.DTYPES:
            parser.error(f"unknown dtype {d!r}; choose from {', '.join(common.DTYPES)}")
    if not dtypes:
        parser.error("--dtype is empty")
    args.dtypes = [common.DTYPES[d] for d in dict.fromkeys(dtypes)]

    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    if args.reps is not None and args.reps < 2:
        parser.error("--reps must be at least 2")
    return args


_START = time.perf_counter()


def log(msg):
    print(f"[{time.perf_counter() - _START:6.1f}s] {msg}", file=sys.stderr, flush=True)


def run_family(name, args):
    family = common.load_family(name)
    env = common.environment(args.device)
    log(f"# {common.header_line(family, env)}")
    notes = []
    providers = family.providers(args.device, notes)
    log(f"providers: {', '.join(p.name for p in providers)}")
    plan = common.timing_plan(args.device, args.quick, args.reps)
    shapes = family.quick_shapes if args.quick else family.shapes
    if args.shapes:
        shapes = [family.parse_shape(label) for label in args.shapes.split(",")]
    started = time.perf_counter()
    rows = []
    for shape in shapes:
        for dtype in args.dtypes:
            label = f"{family.shape_label(shape)} {common.DTYPE_NAMES[dtype]}"
            case_providers = []
            for p in providers:
                why = family.skip(p.name, shape) if family.skip else None
                if why:
                    notes.append(f"{p.name} not run at {family.shape_label(shape)}: {why}")
                else:
                    case_providers.append(p)
            log(f"  {label}: timing")
            timings = common.time_case(family, shape, dtype, args.device, case_providers, plan, log=log)
            gc.collect()
            if args.device == "cpu" and not args.skip_memory:
                for t in timings:
                    log(f"  {label}: memory probe for {t.provider}")
                    try:
                        probe = common.probe_cpu_memory(family, shape, dtype, t.provider)
                    except Exception as exc:  # keep the timings; say what went wrong
                        log(f"WARNING: {exc}")
                        notes.append(f"memory probe failed for {label} {t.provider}: {str(exc).splitlines()[0]}")
                        continue
                    t.peak_extra_mib, t.memory_method = probe["peak_extra_mib"], probe["method"]
            case_rows = common.summarize(family, shape, dtype, timings)
            for r in case_rows:
                log(f"    {r['provider']:>16}: median {r['median_ms']:9.3f} ms  first call {r['first_call_ms']:9.1f} ms"
                    f"  peak extra {r['peak_extra_mib']:8.1f} MiB  rel err {r['check_rel_err']:.1e}")
            rows += case_rows
    methods = sorted({r["memory_method"] for r in rows if r["memory_method"]})
    if methods:
        notes.append(f"memory measured with: {', '.join(methods)}")
    if args.quick:
        notes.append("--quick run")
    notes.append(f"this run took {time.perf_counter() - started:.0f} s")
    paths = common.write_results(family, env, rows, notes, args.out)
    try:
        from bench.plots import plot_rows

        paths.append(plot_rows(rows, common.header_line(family, env), paths[0].with_suffix(".png")))
    except ImportError as exc:
        log(f"no plot: {exc} (pip install .[bench])")
    log("wrote " + ", ".join(str(p) for p in paths))
    return common.report_markdown(family, env, rows, notes)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    reports = [run_family(name, args) for name in args.families]
    print("\n".join(reports), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
