"""scripts/gpu_check.sh, the first thing run on a GPU machine: on the CPU it stops at once for lack of CUDA, and
its steps (CLI run, CUDA tests, the four benchmarks) all run end to end at tiny sizes with GPU_CHECK_DEVICE=cpu."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["the card", "default experiment through the CLI", "the tests that need CUDA", "bench_train SGD",
         "bench_train SAM", "bench_analysis", "bench_grokking", "bench_data"]


def run_check(report: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(report)], cwd=ROOT, text=True,
                          capture_output=True, timeout=900,
                          env={**os.environ, "PYTHON": sys.executable, "OMP_NUM_THREADS": "1", **env})


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_without_cuda_it_stops_at_once_in_one_line_and_writes_nothing(tmp_path):
    out = run_check(tmp_path / "report.md")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "gpu_check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine"]
    assert not (tmp_path / "report.md").exists()


@pytest.mark.slow
def test_every_step_runs_on_the_cpu_and_the_section_is_appended(tmp_path):
    report = tmp_path / "benchmarks.md"
    report.write_text("# Benchmarks\n\nwhat was there before\n")
    out = run_check(report, GPU_CHECK_DEVICE="cpu", GPU_CHECK_QUICK="1")
    assert out.returncode == 0, out.stderr
    text = report.read_text()
    assert text.startswith("# Benchmarks\n\nwhat was there before\n")   # appended, not replaced
    assert "## GPU check, " in text and "Every step passed." in text
    for name in STEPS:
        assert f"### {name} (exit 0, " in text, name
    assert "completed: test/acc=" in text                                 # the CLI run finished
    assert "runner / minimal" in text and "hvp" in text                  # the benchmarks' numbers are there
