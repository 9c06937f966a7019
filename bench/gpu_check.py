"""`python -m bench.gpu_check`: everything a GPU machine should prove, in one call.

1. installs carried peer wheels (`.whl/*.whl`, see bench/README.md) into /tmp/site when present;
2. builds kdkernels from source with its CUDA part (`KDK_CUDA=1` when torch has CUDA);
3. runs the whole test suite (device-parametrized: every test that runs on the CPU runs on CUDA
   too when a GPU is present);
4. runs every benchmark family against eager PyTorch, torch.compile and the installed peers, and
   the roofline meter;
5. writes one markdown report and one CSV of all benchmark rows under bench/results/ and prints
   the summary table last.

Without a CUDA GPU it says so in a banner and runs the same steps on the CPU (quick benchmark
shapes), so the script itself is proven on every machine. Each step has a time limit so that the
whole call fits in 10 minutes on one H100.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import glob
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


def sh(cmd, *, timeout, env=None, log=None):
    """Run ``cmd`` (a list) from the repository root; returns (returncode, output, seconds)."""
    t0 = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        out = ((e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")) + \
            f"\n[timed out after {timeout} s]"
    dt = time.perf_counter() - t0
    if log is not None:
        log.write(f"\n$ {' '.join(cmd)}  (rc={rc}, {dt:.0f} s)\n{out}\n")
        log.flush()
    return rc, out, dt


def device_info():
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        cap = torch.cuda.get_device_capability(0)
        return True, f"{name} (sm_{cap[0]}{cap[1]}), torch {torch.__version__}, CUDA {torch.version.cuda}"
    return False, f"CPU only, torch {torch.__version__}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    p.add_argument("--skip-build", action="store_true", help="use the installed kdkernels as is")
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--reps", type=int, default=None, help="fixed benchmark repetitions (default: time budget)")
    p.add_argument("--families", default=None,
                   help="comma-separated benchmark families (default: all; python -m bench --help lists them)")
    p.add_argument("--dtype", default=None, help="benchmark dtypes, e.g. fp32,bf16 (default: python -m bench's)")
    p.add_argument("--out", type=Path, default=None,
                   help="where the report goes (default: bench/results on a GPU, /tmp/kdk-gpu-check on the CPU)")
    a = p.parse_args(argv)

    has_gpu, info = device_info()
    banner = ("GPU CHECK on " + info) if has_gpu else \
        ("NO CUDA GPU FOUND: this is a CPU run of the GPU check (" + info + "); nothing here measures a GPU")
    print("=" * len(banner) + "\n" + banner + "\n" + "=" * len(banner), flush=True)
    if a.out is None:
        a.out = RESULTS if has_gpu else Path("/tmp/kdk-gpu-check")
    a.out.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    import torch

    from bench.common import slug

    stem = a.out / f"{slug(torch.cuda.get_device_name(0) if has_gpu else 'cpu')}-{date}-gpu_check"
    log = open(stem.with_suffix(".log"), "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    steps = []

    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if wheels:
        rc, _, dt = sh([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", "/tmp/site", *wheels], timeout=120, log=log)
        env["PYTHONPATH"] = os.pathsep.join(["/tmp/site"] + [x for x in [env.get("PYTHONPATH")] if x])
        steps.append(("install carried wheels", rc, dt, f"{len(wheels)} wheels"))

    if not a.skip_build:
        build_env = dict(env, KDK_CUDA="1" if has_gpu else "auto", MAX_JOBS=str(os.cpu_count() or 2))
        rc, out, dt = sh([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e",
                          "."], timeout=300, env=build_env, log=log)
        steps.append(("build kdkernels", rc, dt, "KDK_CUDA=" + build_env["KDK_CUDA"]))
        if rc != 0:
            print(out[-3000:])
    rc, out, dt = sh([sys.executable, "-c", "import kdkernels, json; print(json.dumps(kdkernels.build_info()))"],
                     timeout=60, env=env, log=log)
    steps.append(("import kdkernels", rc, dt, out.strip().splitlines()[-1] if out.strip() else ""))

    if not a.skip_tests:
        rc, out, dt = sh([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"],
                         timeout=330 if has_gpu else 900, env=env, log=log)
        tail = [line for line in out.splitlines() if re.search(r"\d+ (passed|failed)", line)]
        steps.append(("test suite" + (" (CPU and CUDA)" if has_gpu else " (CPU)"), rc, dt, tail[-1] if tail else ""))

    device = "cuda" if has_gpu else "cpu"
    bench_dir = stem.parent / (stem.name + "-bench")
    cmd = [sys.executable, "-m", "bench", "--device", device, "--out", str(bench_dir)]
    if a.reps:
        cmd += ["--reps", str(a.reps)]
    if a.dtype:
        cmd += ["--dtype", a.dtype]
    if a.families:
        cmd += [f for f in a.families.split(",") if f]
    rc, out, dt = sh(cmd + ([] if has_gpu else ["--quick", "--skip-memory"]), timeout=240 if has_gpu else 600,
                     env=env, log=log)
    steps.append(("benchmarks", rc, dt, str(bench_dir)))
    bench_md = out[out.find("# "):] if rc == 0 else ""

    rc, out, dt = sh([sys.executable, "-m", "bench.roofline", "--quick"], timeout=180,
                     env=dict(env, TRITON_INTERPRET="1"), log=log)
    steps.append(("roofline meter", rc, dt, ""))
    roofline_md = out if rc == 0 else ""

    rows = []
    for path in sorted(bench_dir.glob("*.json")):
        rows += json.loads(path.read_text())["rows"]
    if rows:
        with open(stem.with_suffix(".csv"), "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)

    summary = ["| step | result | seconds | detail |", "|---|---|---:|---|"]
    for name, rc, dt, detail in steps:
        summary.append(f"| {name} | {'ok' if rc == 0 else f'FAILED (rc={rc})'} | {dt:.0f} | {detail} |")
    report = "\n\n".join([f"# {banner}", f"{date}, {sys.platform}, python {sys.version.split()[0]}",
                          "\n".join(summary), bench_md, roofline_md])
    stem.with_suffix(".md").write_text(report + "\n")
    log.close()
    print(f"\nwrote {stem.with_suffix('.md')}, {stem.with_suffix('.csv')}, {stem.with_suffix('.log')}\n")
    print(banner)
    print("\n".join(summary))
    return 0 if all(rc == 0 for _, rc, _, _ in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
