"""Tools that measure without a GPU or read a GPU run's logs: tools/bench_host.py (host time over
an emulated GPU) and tools/sanitize.py's log summary and test slices."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_host  # noqa: E402
import sanitize  # noqa: E402


class _Real:
    num_blocks = 7


def test_emulated_gpu_queues_work_and_waits_for_it():
    gpu = bench_host.EmulatedGpu(_Real(), step_s=0.02, prefill_token_s=1e-3, batch=4, vocab=50)
    assert gpu.num_blocks == 7  # the rest is the real backend's
    t0 = time.perf_counter()
    gpu.launch_decode_steps(slot_mappings=np.zeros((3, 4), np.int32))  # 3 steps: 60 ms
    gpu.launch_decode_steps(slot_mappings=np.zeros((1, 4), np.int32))  # queued behind: done at 80 ms
    first = gpu.collect_decode_steps()
    assert first.shape == (3, 4) and first.max() < 50 and time.perf_counter() - t0 >= 0.06
    assert gpu.collect_decode_steps().shape == (1, 4) and time.perf_counter() - t0 >= 0.08
    t1 = time.perf_counter()  # a prefill of 10 tokens (more than the batch): 10 ms
    out = gpu.forward_and_sample(token_ids=np.zeros(10, np.int32), logits_indices=np.arange(2))
    assert out.shape == (2,) and time.perf_counter() - t1 >= 0.01
    assert abs(gpu.busy - (0.06 + 0.02 + 0.01)) < 1e-9


def test_bench_host_runs_and_reports_the_host_share():
    out = subprocess.run([sys.executable, str(TOOLS / "bench_host.py"), "--batch", "4", "--prompt-len", "8",
                          "--new-tokens", "9", "--repeats", "3", "--step-ms", "0.5"],
                         capture_output=True, text=True, check=True, timeout=300).stdout
    m = re.search(r"median (-?[\d.]+) ms .*a step takes ([\d.]+) ms: ([\d,]+) tok/s against 8,000", out, re.S)
    assert m, out
    exposed, step = float(m[1]), float(m[2])
    assert step >= 0.5 - 1e-3 and exposed < step  # a step is at least the emulated GPU's


def test_sanitize_summary_reads_pytest_and_the_sanitizers():
    log = "....F.  [ 50%]\n=== 5 passed, 1 failed in 3.20s ===\n========= ERROR SUMMARY: 2 errors\n"
    assert sanitize.summarize(log) == dict(passed=5, failed=1, found=2)
    log = "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n90 passed in 96.47s\n"
    assert sanitize.summarize(log) == dict(passed=90, failed=0, found=0)
    # Stopped by the timeout before pytest's summary: its progress characters count.
    assert sanitize.summarize("..F..  [ 10%]\n...\n") == dict(passed=7, failed=1, found=None)
    assert sanitize.runs_cublaslt("tests/gpu/test_kernels.py::test_matmul[float16-shape0-bias]")
    assert sanitize.runs_cublaslt("tests/gpu/test_kernels.py::test_skinny_matches_cublas")
    assert not sanitize.runs_cublaslt("tests/gpu/test_kernels.py::test_skinny_matmul[float16-1-bias]")


def test_sanitize_parts_cover_every_test_once():
    tests = [f"t{i}" for i in range(34)]
    parts = [sanitize.part_of(tests, f"{k}/3") for k in (1, 2, 3)]
    assert sum(parts, []) == tests and [len(p) for p in parts] == [11, 11, 12]
    assert sanitize.part_of(tests, "1/1") == tests
    with pytest.raises(ValueError, match="K/N"):
        sanitize.part_of(tests, "4/3")
