"""The single-memory-pass claim, checked on every run: each Triton kernel's measured DRAM traffic
(bench.roofline, loads and stores counted in the interpreter) stays within what its header
documents, and a row that fits in registers is read exactly once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def traffic():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "bench.roofline", "--quick", "--json", "--no-compile"], cwd=ROOT,
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_no_kernel_moves_more_than_documented(traffic):
    over = [f"{r['kernel']} {r['kind']} {r['dtype']} V={r['V']}: {r['read_B_per_elem'] + r['write_B_per_elem']:.3f} "
            f"B/elem > documented {r['documented_B_per_elem']}" for r in traffic if not r["within_documented"]]
    assert not over, "\n".join(over)


def test_rows_in_registers_are_read_once(traffic):
    single = [r for r in traffic if r["config"]["SINGLE_PASS"]]
    assert single
    for r in single:  # the minimum: read student + teacher once, write the gradient once
        assert r["read_B_per_elem"] + r["write_B_per_elem"] == pytest.approx(r["minimum_B_per_elem"], abs=0.01), r


def test_streamed_rows_are_read_twice_for_kl_three_times_for_jsd(traffic):
    for r in traffic:
        if r["config"]["SINGLE_PASS"]:
            continue
        item = {"bf16": 2, "fp16": 2, "fp32": 4}[r["dtype"]]
        passes = 3 if r["kind"] == "jsd" else 2
        assert r["read_B_per_elem"] == pytest.approx(passes * 2 * item, abs=0.01), r
