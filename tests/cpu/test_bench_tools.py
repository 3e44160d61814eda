"""Tools that measure without a GPU or read a GPU run's logs: tools/bench_host.py (host time over
an emulated GPU), tools/sanitize.py's log summary and test slices, tools/trace_gemv.py's
reading of the GEMV's stage records and tools/profile_step.py's kernel timeline."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tools"
sys.path.insert(0, str(TOOLS))
import bench_host  # noqa: E402
import profile_step  # noqa: E402
import sanitize  # noqa: E402
import trace_gemv  # noqa: E402


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
    assert sanitize.runs_cublaslt("tests/gpu/test_engine_gpu.py::test_cpu_and_gpu_engines_agree")


def test_sanitize_runs_the_tests_that_measure_free_memory_alone():
    alone = ["tests/gpu/test_engine_gpu.py::test_kv_pool_is_sized_from_free_memory_and_steps_allocate_nothing",
             "tests/gpu/test_bundled_model_gpu.py::test_bundled_model_matches_cpu[float16]"]
    assert all(sanitize.needs_gpu_alone(t) for t in alone)
    assert not sanitize.needs_gpu_alone("tests/gpu/test_engine_gpu.py::test_cpu_and_gpu_engines_agree")
    assert not sanitize.needs_gpu_alone("tests/gpu/test_kernels.py::test_gelu[float16]")


def test_sanitize_parts_cover_every_test_once():
    tests = [f"t{i}" for i in range(34)]
    parts = [sanitize.part_of(tests, f"{k}/3") for k in (1, 2, 3)]
    assert sum(parts, []) == tests and [len(p) for p in parts] == [11, 11, 12]
    assert sanitize.part_of(tests, "1/1") == tests
    with pytest.raises(ValueError, match="K/N"):
        sanitize.part_of(tests, "4/3")


def _stage_record(n, k, block, start_ns, stages_ns, clock=2.0):
    """A record as ops.stage_trace() gives it: stages_ns are the waited/staged/multiplied/end
    offsets."""
    g = [start_ns] + [start_ns + t for t in stages_ns]
    return [n, k, 1, block, block % 132, *g, *(int(1000 + clock * (t - start_ns)) for t in g)]


def test_trace_groups_blocks_into_launches_and_times_them_after_the_one_before():
    c = 768
    rng = np.random.default_rng(5)
    rows, t = [], 10_000
    for _ in range(3):  # three layers: fc (4 blocks) then fc_proj (2 blocks), overlapping
        fc_end = t + 4000
        for b in rng.permutation(4):
            rows.append(_stage_record(4 * c, c, b, t + 100 * b, [1000, 2000, 3000, 4000 - 100 * b]))
        for b in rng.permutation(2):  # block 0 starts early, block 1 after fc's end
            start = fc_end - 500 if b == 0 else fc_end + 300
            rows.append(_stage_record(c, 4 * c, b, start, [fc_end + 900 - start, fc_end + 1500 - start,
                                                           fc_end + 2100 - start + 100 * b,
                                                           fc_end + 2500 - start + 200 * b]))
        t = fc_end + 2700 + 5000
    records = np.array(rows, dtype=np.uint64)
    order = trace_gemv.launches(records)
    assert [len(launch) for launch in order] == [4, 2] * 3
    assert all(sorted(launch[:, trace_gemv.BLOCK].tolist()) == list(range(len(launch))) for launch in order)
    assert trace_gemv.cycles_per_ns(records) == pytest.approx(2.0)
    table = trace_gemv.summarize(records, c)
    proj = table["fc_proj"]
    assert proj["launches"] == 3 and proj["blocks"] == 2 and proj["early"] == 0.5
    assert proj["start"] == pytest.approx(0.3) and proj["waited"] == pytest.approx(0.9)
    assert proj["mult"] == pytest.approx(2.2) and proj["end"] == pytest.approx(2.7)
    # The block that ended last started after fc's end: 0.6 us to its wait, 0.6 to x, 0.7 to its
    # products, 0.5 more.
    assert (proj["crit_wait"], proj["crit_stage"], proj["crit_mult"], proj["crit_tail"]) == \
        pytest.approx((0.6, 0.6, 0.7, 0.5))
    assert table["ln_2+fc"]["launches"] == 2  # the first launch has no traced launch before it


def _kernel(name, start, duration):
    from torch.autograd import DeviceType

    return SimpleNamespace(device_type=DeviceType.CUDA, name=name,
                           time_range=SimpleNamespace(start=start, end=start + duration))


def test_timeline_opens_each_step_at_layer_0s_qkv(capsys):
    """Decode runs of 8 steps: only a run's first step has an embedding kernel (the advance of
    the step before embeds the others), so a step opens at layer 0's QKV GEMV, or at the
    embedding right before it."""
    gemv = "void pagedgpt2::cuda::(anonymous namespace)::skinny_gemm_kernel<__half, 1, (pagedgpt2::cuda::SkinnyInput)1, (pagedgpt2::cuda::SkinnyOutput){}, false>(p)"
    layer = [gemv.format(3), "decode_attention_kernel", gemv.format(2), gemv.format(1), gemv.format(2)]
    rng = np.random.default_rng(5)
    kernels, step_starts, t = [], [], 0.0
    for step in range(20):
        step_starts.append(t)
        names = (["embedding_kernel<__half>"] if step % 8 == 0 else []) + layer * 3 + [gemv.format(4), "advance"]
        for name in names:
            duration = float(rng.uniform(1, 5))
            kernels.append(_kernel(name, t, duration))
            t += duration
    rng.shuffle(kernels)  # the profiler's order is not start order
    profile_step.print_timeline(SimpleNamespace(events=lambda: kernels), 3, num_layers=3)
    lines = capsys.readouterr().out.splitlines()
    rows = lines[1:-1]
    # the window skips step 0 and starts at step 1, which has no embedding kernel
    assert "in1, out3" in rows[0] and float(rows[0].split()[0]) == 0.0
    assert len(rows) == 3 * (3 * len(layer) + 2)  # steps 1-3: no embedding among them
    span = float(lines[-1].split()[2])
    assert span == pytest.approx((step_starts[4] - step_starts[1]) / 3, abs=0.06)
    # steps 1-8: step 8, a run's first, opens at its embedding kernel
    profile_step.print_timeline(SimpleNamespace(events=lambda: kernels), 8, num_layers=3)
    rows = capsys.readouterr().out.splitlines()[1:-1]
    per_step = 3 * len(layer) + 2
    assert len(rows) == 8 * per_step + 1 and "embedding_kernel" in rows[7 * per_step]
    assert "in1, out3" in rows[7 * per_step + 1]
    # wide steps (cuBLASLt, no skinny QKV) each open at their embedding kernel
    wide = [k for k in kernels if "skinny" not in k.name]
    profile_step.print_timeline(SimpleNamespace(events=lambda: wide), 1, num_layers=3)
    rows = capsys.readouterr().out.splitlines()[1:-1]
    assert "embedding_kernel" in rows[0] and sum("embedding_kernel" in r for r in rows) == 1
