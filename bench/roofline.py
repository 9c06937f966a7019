"""`python -m bench.roofline`: the DRAM traffic of each Triton kernel, measured without a GPU.

Each kernel runs under the Triton interpreter (TRITON_INTERPRET=1) with its loads and stores
instrumented: every element a `tl.load` reads (mask on) or a `tl.store` writes counts its bytes,
as if each access went to DRAM (no cache is modelled, so a row read twice counts twice). The
result, in bytes per row element, is set against

* the minimum the loss needs (read student, read teacher, write each requested gradient), and
* what the kernel's header promises (`documented_traffic` next to the kernel),

and turned into the time that traffic would take at H100 HBM3 bandwidth (3.35 TB/s) for a
full-size problem. `--check` exits 1 when a kernel moves more than it documents, which
`tests/test_roofline.py` runs on every CI run. Each measured variant is also compiled ahead of
time for sm_90 (`kdkernels.triton.aot`), and its registers, spills and the occupancy they allow are
reported beside its traffic.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import numpy as np  # noqa: E402
import torch  # noqa: E402

H100_BYTES_PER_S = 3.35e12
FULL_ROWS = 4096  # tokens in the full-size problem the time estimate is for
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
KINDS = {"forward": 0, "reverse": 1, "jsd": 2}


class TrafficMeter(contextlib.AbstractContextManager):
    """Counts the bytes the interpreted kernels load and store while active."""

    def __init__(self):
        from triton.runtime import interpreter

        self._builder = interpreter.interpreter_builder
        self._np_dtype = interpreter._get_np_dtype
        self.read = 0
        self.written = 0

    def __enter__(self):
        b = self._builder
        load, store = b.create_masked_load, b.create_masked_store

        def counted_load(ptrs, mask, other, cache_policy, is_volatile):
            itemsize = np.dtype(self._np_dtype(ptrs.get_element_ty())).itemsize
            self.read += int(np.count_nonzero(mask.data)) * itemsize
            return load(ptrs, mask, other, cache_policy, is_volatile)

        def counted_store(ptrs, value, mask, cache_policy):
            self.written += int(np.count_nonzero(mask.data)) * value.data.dtype.itemsize
            return store(ptrs, value, mask, cache_policy)

        b.create_masked_load, b.create_masked_store = counted_load, counted_store
        return self

    def __exit__(self, *exc):
        del self._builder.create_masked_load, self._builder.create_masked_store  # back to the class's
        return False


def softmax_kl_cases(quick: bool):
    vocabs = [4096, 32001] if quick else [4096, 32001, 131072]
    for dtype in ("bf16", "fp32"):
        for kind in ("forward", "jsd"):
            for V in vocabs:
                yield {"kernel": "softmax_kl", "dtype": dtype, "kind": kind, "V": V, "grad_teacher": False}
    yield {"kernel": "softmax_kl", "dtype": "bf16", "kind": "reverse", "V": 32001, "grad_teacher": True}


def measure_softmax_kl(case, rows=2):
    from kdkernels.triton import softmax_kl as K

    dt, V = DTYPES[case["dtype"]], case["V"]
    kind = KINDS[case["kind"]]
    s = torch.randn(rows, V).to(dt)
    t = torch.randn(rows, V).to(dt)
    labels = torch.randint(0, V, (rows,))
    scale = torch.ones((), dtype=torch.float32)
    with TrafficMeter() as m:
        K.softmax_kl_forward(s, t, labels, scale, temperature=2.0, kind=kind, beta=0.5, ignore_index=-100,
                             ce_weight=0.0, kd_weight=1.0, need_grad_student=True,
                             need_grad_teacher=case["grad_teacher"])
    elems = rows * V
    doc_r, doc_w = K.documented_traffic(V, dt, dt, kind, True, case["grad_teacher"])
    item = s.element_size()
    minimum = 2 * item + item * (1 + case["grad_teacher"])
    # per-row scalars (label, grad_scale, loss) are allowed on top of the per-element promise
    per_row_allowance = 64
    read, written = m.read / elems, m.written / elems
    measured = read + written
    full_bytes = measured * FULL_ROWS * V
    return {
        **case,
        "config": K.launch_config(V, dt, dt),
        "read_B_per_elem": read,
        "write_B_per_elem": written,
        "documented_B_per_elem": doc_r + doc_w,
        "minimum_B_per_elem": minimum,
        "over_minimum": measured / minimum,
        "within_documented": m.read + m.written <= (doc_r + doc_w) * elems + per_row_allowance * rows,
        "h100_us_full": full_bytes / H100_BYTES_PER_S * 1e6,
        "h100_us_full_at_minimum": minimum * FULL_ROWS * V / H100_BYTES_PER_S * 1e6,
    }


def add_sm90_resources(results):
    """Registers, spills, shared memory and occupancy of each measured variant, compiled for sm_90."""
    from kdkernels.triton import aot, softmax_kl as K

    cases = [K.aot_case(r["V"], DTYPES[r["dtype"]], DTYPES[r["dtype"]], KINDS[r["kind"]], True, 0.0, 2.0, True,
                        r["grad_teacher"]) for r in results]
    compiled = aot.compile_cases([("softmax_kl", *c, 90) for c in cases])
    for r, c, out in zip(results, cases, compiled):
        r["sm90"] = out
        if out["error"] is None:
            out["occupancy"] = aot.occupancy(out["reg"], out["shared"], c[2], 90)


def _resources(r):
    out = r.get("sm90")
    if out is None:
        return "not compiled"
    if out["error"] is not None:
        return "compile failed"
    return f"{out['reg']} / {out['stack']} / {out['occupancy']:.0%}"


def best_gpu_results(kernel: str) -> list:
    """Lines naming the best measured GPU GB/s of kdkernels' Triton backend per committed result file."""
    from pathlib import Path

    lines = []
    for path in sorted((Path(__file__).resolve().parent / "results").glob(f"*-{kernel}.json")):
        doc = json.loads(path.read_text())
        if doc.get("environment", {}).get("device") != "cuda":
            continue
        rows = [r for r in doc["rows"] if r["provider"] == "kdkernels-triton" and r.get("gb_per_s")]
        if rows:
            best = max(rows, key=lambda r: r["gb_per_s"])
            lines.append(f"best measured on {doc['environment']['device_model']}: {best['gb_per_s']:.0f} GB/s of the "
                         f"minimum bytes at {best['case']} {best['dtype']} ({path.name})")
    return lines


def table(results):
    head = ("| kernel | case | config | read B/elem | write B/elem | documented | minimum | × minimum | "
            f"H100 µs at {FULL_ROWS}×V (measured / minimum bytes) | sm_90 REG / STACK / occupancy | ok |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        cfg = r["config"]
        mode = f"single BLOCK={cfg['BLOCK']}" if cfg["SINGLE_PASS"] else f"stream BLOCK={cfg['BLOCK']}"
        case = f"{r['kind']} {r['dtype']} V={r['V']}" + (" +grad_t" if r["grad_teacher"] else "")
        lines.append(f"| {r['kernel']} | {case} | {mode}, {cfg['num_warps']} warps | {r['read_B_per_elem']:.2f} | "
                     f"{r['write_B_per_elem']:.2f} | {r['documented_B_per_elem']:.0f} | "
                     f"{r['minimum_B_per_elem']:.0f} | {r['over_minimum']:.2f} | "
                     f"{r['h100_us_full']:.0f} / {r['h100_us_full_at_minimum']:.0f} | "
                     f"{_resources(r)} | {'yes' if r['within_documented'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.roofline", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer vocabulary sizes")
    p.add_argument("--check", action="store_true", help="exit 1 if a kernel moves more than it documents")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--no-compile", action="store_true", help="skip the sm_90 ahead-of-time compile")
    a = p.parse_args(argv)
    # the interpreter evaluates both sides of tl.where with numpy, which warns about the discarded one
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="triton.runtime.interpreter")
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        p.error("needs TRITON_INTERPRET=1 (unset it or set it to 1)")
    results = [measure_softmax_kl(c) for c in softmax_kl_cases(a.quick)]
    if not a.no_compile:
        add_sm90_resources(results)
    if a.json:
        print(json.dumps(results, indent=1))
    else:
        print(f"DRAM bytes per row element, measured in the Triton interpreter; H100 at "
              f"{H100_BYTES_PER_S / 1e12:.2f} TB/s.\n")
        print(table(results))
        measured = best_gpu_results("softmax_kl")
        print("\n" + ("\n".join(measured) if measured else "No GPU result for softmax_kl in bench/results yet."))
    bad = [r for r in results if not r["within_documented"]]
    return 1 if a.check and bad else 0


if __name__ == "__main__":
    sys.exit(main())
