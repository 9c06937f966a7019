"""The one-call GPU check degrades to a clearly labelled CPU run without a GPU, and writes its report."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check itself is the test")
def test_gpu_check_runs_on_cpu_with_a_banner(tmp_path):
    out = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--skip-build", "--skip-tests", "--reps", "2",
                          "--families", "softmax_kl", "--dtype", "fp32", "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "NO CUDA GPU FOUND" in out.stdout
    (report,) = tmp_path.glob("cpu-*-gpu_check.md")
    text = report.read_text()
    assert "| benchmarks | ok |" in text and "| roofline meter | ok |" in text
    assert "kdkernels-cpu" in text  # the benchmark table made it into the report
    (table,) = tmp_path.glob("cpu-*-gpu_check.csv")
    assert "speedup_vs_compile" in table.read_text().splitlines()[0]
