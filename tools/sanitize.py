"""compute-sanitizer over GPU tests, in parallel shards.

The tests are split round-robin into shards; each shard runs as one pytest process under
`compute-sanitizer --tool TOOL`, all shards of all tools at once (the sanitizers are bound by the
host's CPU, and one GPU holds many such processes). Only our kernels are instrumented (kernel
names containing `pagedgpt2`, the namespace every kernel of ours is in): cuBLASLt's and torch's
kernels run as usual. Instrumenting cuBLASLt under racecheck never finished (sixteenth session),
and what the issue asks is that our kernels are clean.

racecheck leaves out every test that runs cuBLASLt (its process dies on them): the kernel tests
in CUBLASLT_TESTS and the engine tests, whose prompts go through cuBLASLt GEMMs. The kernels of
ours those run are checked by the kernel tests, which call each of them directly.

The engine tests are slow under memcheck (9-19 s a test in one process, H200) and gain nothing
from shards: seven shards of them beside the kernel tests got 0-2 tests each through in 370 s
(nineteenth session), so run them in one shard, split across device calls with --part. A few
of them need the GPU to themselves (ALONE_TESTS: they compare the device's free memory before
and after, or size a pool from it): they run after the other shards, in a process of their own.

Prints one line per shard (tests passed and failed, the sanitizer's error or hazard count, its
exit code) and a total per tool; exits non-zero when any shard failed, reported an error, or
did not finish in time. Logs go to --out.

    python tools/sanitize.py --tools memcheck racecheck --shards 7 --timeout 420   # kernel tests
    python tools/sanitize.py --tools memcheck --shards 1 --timeout 560 --part 1/2 \
        tests/gpu/test_engine_gpu.py tests/gpu/test_continuous_batching_gpu.py   # then --part 2/2
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KERNEL_FILTER = "kns=pagedgpt2"
# Kernel tests that run cuBLASLt: racecheck's process dies on them even with cuBLASLt's kernels
# left out ("The Sanitizer failed to handle a hardware exception"; H200, CUDA 13.0), and with
# them the rest of its shard. racecheck skips them; our kernels they also call are checked by
# other tests (test_gelu runs the bias/GELU kernel).
CUBLASLT_TESTS = ("::test_matmul[", "::test_skinny_matches_cublas")


# Tests that need the GPU to themselves: they compare the device's free memory before and after
# their steps, or size their pool from it (the default gpu_memory_fraction takes 90% of it).
ALONE_TESTS = ("::test_kv_pool_is_sized_from_free_memory", "test_bundled_model_gpu.py::")


def runs_cublaslt(node_id: str) -> bool:
    """True for the kernel tests of cuBLASLt and for every engine test (prompts run cuBLASLt)."""
    if "test_kernels.py::" not in node_id:
        return True
    return any(name in node_id + "[" for name in CUBLASLT_TESTS)


def needs_gpu_alone(node_id: str) -> bool:
    return any(name in node_id for name in ALONE_TESTS)


def part_of(tests: list[str], part: str) -> list[str]:
    """The K-th of N consecutive, nearly equal slices of tests ("K/N", 1-based)."""
    k, n = (int(x) for x in part.split("/"))
    if not 1 <= k <= n:
        raise ValueError(f"--part {part}: expected K/N with 1 <= K <= N")
    return tests[(k - 1) * len(tests) // n:k * len(tests) // n]


def collect(paths: list[str], select: str | None) -> list[str]:
    """Node ids of the tests under paths (optionally filtered with -k select)."""
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *paths]
    if select:
        cmd += ["-k", select]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True).stdout  # 5: none
    return [line.strip() for line in out.splitlines() if "::" in line]


def sanitizer_command(tool: str, tests: list[str]) -> list[str]:
    return ["compute-sanitizer", "--tool", tool, "--kernel-name", KERNEL_FILTER,
            "--error-exitcode", "99", "--print-limit", "20",
            sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]


def summarize(log: str) -> dict:
    """Tests passed/failed and the sanitizer's count of errors (memcheck) or hazards (racecheck)."""
    summary = "\n".join(re.findall(r"^.*\d+ (?:passed|failed|errors?)\b.* in [\d.]+s.*$", log, re.M))
    if summary:
        passed = sum(int(n) for n in re.findall(r"(\d+) passed", summary))
        failed = sum(int(n) for n in re.findall(r"(\d+) (?:failed|errors?)\b", summary))
    else:  # stopped before pytest's summary: count its progress characters (-q)
        progress = "".join(re.findall(r"^([.FEsxX]+)(?:\s+\[\s*\d+%\])?$", log, re.M))
        passed, failed = progress.count("."), progress.count("F") + progress.count("E")
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", log)]
    hazards = [int(n) for n in re.findall(r"RACECHECK SUMMARY: (\d+) hazard", log)]
    counts = errors + hazards
    return dict(passed=passed, failed=failed, found=sum(counts) if counts else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tools", nargs="+", default=["memcheck", "racecheck"],
                   choices=["memcheck", "racecheck", "synccheck", "initcheck"])
    p.add_argument("--shards", type=int, default=6, help="pytest processes per tool")
    p.add_argument("--timeout", type=float, default=420, help="seconds for every shard together")
    p.add_argument("-k", dest="select", default=None, help="pytest -k expression")
    p.add_argument("--part", default="1/1",
                   help="K/N: only the K-th of N slices of the tests, to split a long run "
                        "across device calls")
    p.add_argument("--out", default="/tmp/pagedgpt2-sanitize", help="where the logs go")
    p.add_argument("paths", nargs="*", default=["tests/gpu/test_kernels.py"])
    args = p.parse_args()

    tests = part_of(collect(args.paths, args.select), args.part)
    if not tests:
        print("no tests collected", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(tests)} tests, {args.shards} shards per tool, kernels matching {KERNEL_FILTER}",
          flush=True)

    jobs = []  # (tool, shard index, tests, log path, process)
    t0 = time.monotonic()

    def start(tool: str, i: int, shard: list[str]) -> None:
        log = out / f"{tool}_{i}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(sanitizer_command(tool, shard), cwd=ROOT, stdout=f,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        jobs.append((tool, i, shard, log, proc))

    codes = {}

    def finish(started: list) -> None:
        for tool, i, _, _, proc in started:
            left = args.timeout - (time.monotonic() - t0)
            try:
                codes[(tool, i)] = proc.wait(timeout=max(left, 1))
            except subprocess.TimeoutExpired:  # the sanitizer and the pytest it started
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                codes[(tool, i)] = None

    alone = {}  # tool -> the tests it runs after the shards, in a process of their own
    for tool in args.tools:
        mine = [t for t in tests if tool != "racecheck" or not runs_cublaslt(t)]
        if len(mine) < len(tests):
            print(f"{tool}: {len(tests) - len(mine)} tests that run cuBLASLt left out", flush=True)
        alone[tool] = [t for t in mine if needs_gpu_alone(t)]
        shared = [t for t in mine if not needs_gpu_alone(t)]
        shards = [shared[i::args.shards] for i in range(args.shards) if shared[i::args.shards]]
        for i, shard in enumerate(shards):
            start(tool, i, shard)
    finish(list(jobs))
    for tool in args.tools:  # one at a time: each needs the GPU to itself
        if alone[tool]:
            start(tool, sum(t == tool for t, *_ in jobs), alone[tool])
            finish(jobs[-1:])
    seconds = time.monotonic() - t0

    ok = True
    print(f"{'tool':<10} {'shard':>5} {'tests':>5} {'passed':>6} {'failed':>6} {'found':>6} {'exit':>5}")
    for tool in args.tools:
        total = dict(tests=0, passed=0, failed=0, found=0)
        for t, i, shard, log, _ in jobs:
            if t != tool:
                continue
            s = summarize(log.read_text(errors="replace"))
            code = codes[(tool, i)]
            shard_ok = code == 0 and s["failed"] == 0 and s["found"] == 0
            ok &= shard_ok
            found = "-" if s["found"] is None else s["found"]
            print(f"{tool:<10} {i:>5} {len(shard):>5} {s['passed']:>6} {s['failed']:>6} {found:>6} "
                  f"{'timeout' if code is None else code:>5}")
            total["tests"] += len(shard)
            total["passed"] += s["passed"]
            total["failed"] += s["failed"]
            total["found"] += s["found"] or 0
        print(f"{tool:<10} {'all':>5} {total['tests']:>5} {total['passed']:>6} {total['failed']:>6} "
              f"{total['found']:>6}")
    print(f"{'clean' if ok else 'NOT clean'} in {seconds:.0f} s (logs in {out}; a shard that timed out "
          "counts the tests pytest had reported)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
