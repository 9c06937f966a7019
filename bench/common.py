"""Shared machinery for the kdkernels microbenchmarks.

A benchmark *family* is one module in this package (``bench/<name>.py``) that defines
``FAMILY = Family(...)``: the shapes to run, how to make the inputs, the minimum number of bytes
a kernel must move, and the providers (implementations) to compare. Everything else lives here:

* timing: every provider of a (shape, dtype) case is timed in the same process, interleaved
  round-robin (rep 1 of every provider, then rep 2, ...) so that clock and thermal drift cancel
  in the ratios; CPU uses ``time.perf_counter``, CUDA uses CUDA events with the L2 flushed;
* memory: peak memory allocated by one forward+backward beyond the inputs (CUDA: the caching
  allocator's counters; CPU: the resident set size of a fresh subprocess, see ``bench._memprobe``);
* output: a markdown table on stdout and CSV + JSON + markdown under ``bench/results/``.
"""

from __future__ import annotations

import csv
import datetime
import importlib
import io
import json
import math
import os
import pkgutil
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Relative error vs eager above which a provider's result is flagged as suspicious.
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 5e-3}

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MIB = 1024 * 1024

# Modules of this package that are not benchmark families.
_NOT_FAMILIES = {"common", "plots", "roofline", "test_benchmarks", "gpu_check"}


# --------------------------------------------------------------------------------------------
# Families and providers
# --------------------------------------------------------------------------------------------

Shape = tuple


@dataclass
class Family:
    """One benchmark family: a set of shapes, an input factory and the providers to compare."""

    name: str
    title: str  # one line, printed in result headers
    shapes: list  # default shapes
    quick_shapes: list  # shapes for --quick
    tiny_shape: Shape  # used to pay one-time costs (compilation) before a memory baseline
    make_inputs: Callable  # (shape, dtype, device) -> dict[str, Tensor]; grads wanted where requires_grad
    min_bytes: Callable  # (shape, dtype) -> bytes a perfect kernel must move (read + write)
    providers: Callable  # (device, notes: list[str]) -> list[Provider]; first one is the reference
    # (provider name, shape) -> why the provider cannot run that shape (e.g. an N x N matrix beyond
    # the machine's memory), or None; skipped cases are named in the notes
    skip: Optional[Callable] = None
    dims: str = "N×V"  # what the numbers of a case are, for the table's first column

    def shape_label(self, shape: Shape) -> str:
        return "x".join(str(d) for d in shape)

    def parse_shape(self, label: str) -> Shape:
        return tuple(int(d) for d in label.split("x"))


class Provider:
    """One implementation of a family's loss: ``step`` runs forward + backward once."""

    def __init__(self, name: str, loss_fn: Callable):
        self.name = name
        self.loss_fn = loss_fn
        self.fn = loss_fn

    def new_case(self) -> None:
        """Called before the first step on a new (shape, dtype)."""

    def warm_up_for_memprobe(self, tiny_inputs: dict) -> None:
        """Pay one-time costs (lazy initialization, compilation) on a tiny input, so that a memory
        baseline taken afterwards excludes them. The real-shape step must not redo them."""
        self.new_case()
        self.step(tiny_inputs)
        zero_grads(tiny_inputs)

    def step(self, inputs: dict) -> torch.Tensor:
        loss = self.fn(**inputs)
        loss.backward()
        return loss


class CompiledProvider(Provider):
    """``torch.compile`` of a loss function; backward is compiled by AOTAutograd."""

    def new_case(self) -> None:
        # A fresh compile per (shape, dtype): no automatic-dynamic recompiles from the previous
        # shape and no cache-size limit, and the first call's time is a cold compile (apart from
        # inductor's on-disk cache, which makes reruns of the same graph faster).
        torch._dynamo.reset()
        self.fn = torch.compile(self.loss_fn, dynamic=False)


def kdkernels_providers(device: str, make_loss: Callable, notes: list) -> list:
    """One provider ``kdkernels-<backend>`` per backend kdkernels offers on ``device``, except
    ``torch`` (the plain-PyTorch reference, which eager already covers) and, on the CPU,
    ``triton`` (it only runs under the slow interpreter there). ``make_loss(backend)`` returns the
    loss function for one backend."""
    try:
        import kdkernels

        backends = kdkernels.available_backends(device)
    except (ImportError, AttributeError) as exc:
        msg = f"kdkernels providers skipped: kdkernels is not usable ({type(exc).__name__}: {exc})"
        print(f"WARNING: {msg}", file=sys.stderr)
        notes.append(msg)
        return []
    skipped = [b for b in backends if b == "torch" or (b == "triton" and device == "cpu")]
    if skipped:
        notes.append(f"kdkernels backends not benchmarked: {', '.join(skipped)}")
    return [Provider(f"kdkernels-{b}", make_loss(b)) for b in backends if b not in skipped]


def peer_provider(name: str, import_fn: Callable, make_loss: Callable, notes: list, install: str) -> list:
    """``[Provider(name, make_loss(imported))]`` when the peer imports, else ``[]`` and a note:
    a missing peer is skipped, never a failure."""
    try:
        imported = import_fn()
    except Exception as exc:  # ImportError, or a peer broken against this torch
        notes.append(f"{name} skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} ({install})")
        return []
    return [Provider(name, make_loss(imported))]


def family_names() -> list:
    """Every family module in this package (found without importing them)."""
    pkg_dir = Path(__file__).resolve().parent
    return sorted(m.name for m in pkgutil.iter_modules([str(pkg_dir)])
                  if not m.name.startswith("_") and m.name not in _NOT_FAMILIES)


def load_family(name: str) -> Family:
    if name not in family_names():
        raise KeyError(name)
    return importlib.import_module(f"bench.{name}").FAMILY


def zero_grads(inputs: dict) -> None:
    for x in inputs.values():
        if isinstance(x, torch.Tensor) and x.requires_grad:
            x.grad = None


def grads_of(inputs: dict) -> dict:
    return {k: x.grad for k, x in inputs.items() if isinstance(x, torch.Tensor) and x.requires_grad}


# --------------------------------------------------------------------------------------------
# Machine description
# --------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_model(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return cpu_model()


def slug(name: str) -> str:
    """'Intel(R) Xeon(R) Platinum 8375C CPU @ 2.90GHz' -> 'intel-xeon-platinum-8375c';
    'AMD EPYC 7R13 48-Core Processor' -> 'amd-epyc-7r13'; 'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3'."""
    name = re.sub(r"\((R|TM|tm)\)", "", name)
    name = re.sub(r"\s+CPU\b.*$", "", name)  # "CPU @ 2.90GHz"
    name = re.sub(r"@.*$", "", name)
    name = re.sub(r"\s+\d+-Core Processor.*$", "", name)
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device: str) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return {
        "device": device,
        "device_model": device_model(device),
        "host_cpu": cpu_model(),
        "torch": torch.__version__,
        "triton": triton_version,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def header_line(family: Family, env: dict) -> str:
    if env["device"] == "cuda":
        machine = f"{env['device_model']}, host CPU {env['host_cpu']}"
    else:
        machine = f"{env['device_model']} (CPU)"
    return (f"{family.name}: {family.title} | machine: {machine} | "
            f"torch {env['torch']}, triton {env['triton']}, python {env['python']} | "
            f"{env['threads']} CPU threads | {env['date']}")


# --------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------

@dataclass
class TimingPlan:
    budget_s: float  # aim for about this much timed work per (shape, dtype), all providers together
    min_reps: int
    max_reps: int


def timing_plan(device: str, quick: bool, reps: Optional[int] = None) -> TimingPlan:
    if reps is not None:
        return TimingPlan(0.0, reps, reps)
    if device == "cuda":
        return TimingPlan(0.5 if quick else 2.0, 10, 50 if quick else 200)
    return TimingPlan(2.0 if quick else 4.0, 3 if quick else 5, 10 if quick else 40)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref||, in fp32 (enough for a sanity check, and cheap on big gradients)."""
    x, ref = x.float(), ref.float()
    denom = torch.linalg.vector_norm(ref).item()
    return torch.linalg.vector_norm(x - ref).item() / (denom if denom > 0 else 1.0)


@dataclass
class Timing:
    provider: str
    times_ms: list = field(default_factory=list)
    first_call_ms: float = float("nan")  # includes compilation for "compile" (and any JIT)
    check_rel_err: float = float("nan")  # max over loss and grads, vs the reference provider
    peak_extra_mib: float = float("nan")
    memory_method: str = ""


def time_case(family: Family, shape: Shape, dtype: torch.dtype, device: str, providers: list,
              plan: TimingPlan, log: Callable = print) -> list:
    """Time forward+backward of every provider on one (shape, dtype); returns one Timing each.

    The first provider is the reference for the correctness check."""
    inputs = family.make_inputs(shape, dtype, device)
    results = [Timing(p.name) for p in providers]

    # First call: compile/JIT, and check the result against the reference provider.
    ref_loss, ref_grads = None, None
    for p, r in zip(providers, results):
        zero_grads(inputs)
        p.new_case()
        _sync(device)
        t0 = time.perf_counter()
        loss = p.step(inputs)
        _sync(device)
        r.first_call_ms = (time.perf_counter() - t0) * 1e3
        grads = {k: g.detach().clone() for k, g in grads_of(inputs).items()}
        if ref_loss is None:
            ref_loss, ref_grads = loss.detach().float().clone(), grads
            r.check_rel_err = 0.0
        else:
            errs = [rel_err(loss.detach(), ref_loss)] + [rel_err(grads[k], ref_grads[k]) for k in ref_grads]
            r.check_rel_err = max(errs)
        del loss, grads
    del ref_grads

    # Second call of each: warm-up, and an estimate of one round's time to pick the rep count.
    t0 = time.perf_counter()
    for p in providers:
        zero_grads(inputs)
        p.step(inputs)
    _sync(device)
    round_s = time.perf_counter() - t0
    reps = plan.min_reps if round_s <= 0 else int(plan.budget_s / round_s)
    reps = max(plan.min_reps, min(plan.max_reps, reps))
    log(f"    {reps} reps (one round of {len(providers)} providers ~ {round_s * 1e3:.0f} ms)")

    if device == "cuda":
        _time_cuda(providers, inputs, results, reps)
    else:
        _time_cpu(providers, inputs, results, reps)

    if device == "cuda":
        _measure_cuda_memory(providers, inputs, results)
    zero_grads(inputs)
    return results


def _order(providers: list, rep: int) -> list:
    # Round-robin, rotating the starting provider each rep so no provider always follows the same one.
    k = rep % len(providers)
    return list(range(k, len(providers))) + list(range(k))


def _time_cpu(providers, inputs, results, reps) -> None:
    for rep in range(reps):
        for i in _order(providers, rep):
            zero_grads(inputs)
            t0 = time.perf_counter()
            providers[i].step(inputs)
            results[i].times_ms.append((time.perf_counter() - t0) * 1e3)


def _time_cuda(providers, inputs, results, reps) -> None:
    # Flush L2 before every call (write a buffer larger than any L2), as triton's do_bench does,
    # so no provider reads inputs the previous one left in cache.
    flush = torch.empty(256 * MIB, dtype=torch.int8, device="cuda")
    for rep in range(reps):
        events = []
        for i in _order(providers, rep):
            zero_grads(inputs)
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            providers[i].step(inputs)
            end.record()
            events.append((i, start, end))
        torch.cuda.synchronize()
        for i, start, end in events:
            results[i].times_ms.append(start.elapsed_time(end))
    del flush


def _measure_cuda_memory(providers, inputs, results) -> None:
    """Peak bytes allocated during one forward+backward beyond what was allocated before it
    (the inputs and anything else alive); the input gradient is part of it."""
    for p, r in zip(providers, results):
        zero_grads(inputs)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = p.step(inputs)
        torch.cuda.synchronize()
        r.peak_extra_mib = (torch.cuda.max_memory_allocated() - base) / MIB
        r.memory_method = "cuda max_memory_allocated"
        del loss


# --------------------------------------------------------------------------------------------
# CPU memory: one fresh subprocess per (family, shape, dtype, provider), see bench/_memprobe.py
# --------------------------------------------------------------------------------------------

def probe_cpu_memory(family: Family, shape: Shape, dtype: torch.dtype, provider: str,
                     timeout_s: float = 900) -> dict:
    cmd = [sys.executable, "-m", "bench._memprobe", family.name, family.shape_label(shape),
           DTYPE_NAMES[dtype], provider]
    env = dict(os.environ)
    # A fixed mmap threshold makes glibc give every allocation of 64 KiB or more its own mapping,
    # returned to the OS when freed, so the peak RSS follows the peak of live tensors. With the
    # default dynamic threshold, freed tensors under 32 MiB stay in the heap and the peak of the
    # small cases varies from run to run by a tensor or two. Set the variable to override.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(REPO_ROOT), env.get("PYTHONPATH", "")] if p)
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"memory probe {' '.join(cmd[2:])} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Summaries and output
# --------------------------------------------------------------------------------------------

def summarize(family: Family, shape: Shape, dtype: torch.dtype, timings: list) -> list:
    """One row per provider, with the ratios to 'eager' and 'compile' when they were run."""
    medians = {t.provider: statistics.median(t.times_ms) for t in timings}
    # peers: everything that is not kdkernels (eager and torch.compile included)
    peer_medians = [m for name, m in medians.items() if not name.startswith("kdkernels")]
    nbytes = family.min_bytes(shape, dtype)
    rows = []
    for t in timings:
        q1, _, q3 = statistics.quantiles(t.times_ms, n=4, method="inclusive")
        med = medians[t.provider]
        rows.append({
            "family": family.name,
            "case": family.shape_label(shape),
            "dtype": DTYPE_NAMES[dtype],
            "provider": t.provider,
            "reps": len(t.times_ms),
            "median_ms": med,
            "q1_ms": q1,
            "q3_ms": q3,
            "min_ms": min(t.times_ms),
            "max_ms": max(t.times_ms),
            "peak_extra_mib": t.peak_extra_mib,
            "memory_method": t.memory_method,
            "speedup_vs_eager": medians["eager"] / med if "eager" in medians else float("nan"),
            "speedup_vs_compile": medians["compile"] / med if "compile" in medians else float("nan"),
            "speedup_vs_best_peer": min(peer_medians) / med if peer_medians else float("nan"),
            "min_bytes": nbytes,
            "gb_per_s": nbytes / (med * 1e-3) / 1e9,
            "first_call_ms": t.first_call_ms,
            "check_rel_err": t.check_rel_err,
            "check_ok": bool(t.check_rel_err <= CHECK_TOLERANCE[dtype]),  # NaN (a NaN result) is not ok
        })
    return rows


def _fmt(x: float, digits: int) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _fmt_ms(x: float) -> str:
    return f"{x:.3f}" if x < 1 else f"{x:.2f}" if x < 100 else f"{x:.1f}"


TABLE_COLUMNS = ["case", "dtype", "provider", "median ms", "spread (IQR ms)", "peak extra MiB",
                 "speed-up vs eager", "speed-up vs compile", "speed-up vs fastest peer", "GB/s"]


def markdown_table(rows: list, dims: str = "N×V") -> str:
    lines = ["| " + " | ".join([f"case {dims}"] + TABLE_COLUMNS[1:]) + " |",
             "|" + "|".join("---:" if i >= 3 else "---" for i in range(len(TABLE_COLUMNS))) + "|"]
    for r in rows:
        flag = "" if r["check_ok"] else " (!)"
        cells = [r["case"].replace("x", "×"), r["dtype"], r["provider"] + flag, _fmt_ms(r["median_ms"]),
                 f"{_fmt_ms(r['q1_ms'])}–{_fmt_ms(r['q3_ms'])}", _fmt(r["peak_extra_mib"], 1),
                 _fmt(r["speedup_vs_eager"], 2), _fmt(r["speedup_vs_compile"], 2),
                 _fmt(r["speedup_vs_best_peer"], 2), _fmt(r["gb_per_s"], 2)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report_markdown(family: Family, env: dict, rows: list, notes: list) -> str:
    out = [f"# {header_line(family, env)}", ""]
    out.append("speed-up vs eager / vs compile / vs fastest peer: eager's / compile's / the fastest "
               "non-kdkernels provider's median time divided by this provider's (above 1 = faster). "
               "GB/s: minimum bytes (see bench/README.md) / median time. "
               "peak extra MiB: peak memory of one forward+backward beyond the inputs, "
               "input gradient included.")
    out.append("")
    first = [f"{r['case']} {r['dtype']} {r['provider']} {_fmt_ms(r['first_call_ms'])} ms"
             for r in rows if r["provider"] == "compile"]
    if first:
        out.append("compile: first call (compilation + one forward+backward, excluded from the reps): "
                   + "; ".join(first))
        out.append("")
    bad = [f"{r['case']} {r['dtype']} {r['provider']}: rel err {r['check_rel_err']:.2e}"
           for r in rows if not r["check_ok"]]
    for n in notes:
        out.append(f"note: {n}")
    if bad:
        out.append("(!) result differs from eager beyond tolerance: " + "; ".join(bad))
    if notes or bad:
        out.append("")
    out.append(markdown_table(rows, family.dims))
    return "\n".join(out) + "\n"


def write_results(family: Family, env: dict, rows: list, notes: list, out_dir: Path) -> list:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"{slug(env['device_model'])}-{env['date']}-{family.name}"
    paths = [stem.with_suffix(".csv"), stem.with_suffix(".json"), stem.with_suffix(".md")]

    buf = io.StringIO()
    buf.write(f"# {header_line(family, env)}\n")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    paths[0].write_text(buf.getvalue())

    # NaN (a measurement that was not taken) becomes null: strict JSON has no NaN.
    clean = [{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in r.items()} for r in rows]
    doc = {"header": header_line(family, env), "environment": env, "family": family.name,
           "notes": notes, "rows": clean}
    paths[1].write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")

    paths[2].write_text(report_markdown(family, env, rows, notes))
    return paths
