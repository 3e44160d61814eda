"""Where a decode step's time goes: per-kernel GPU time from the PyTorch profiler (CUPTI sees our
kernels too), and wall time per step split into the backend call and the Python around it.

    python tools/profile_step.py --batch 1 64 256 --context 256
    python tools/profile_step.py --serving 1000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import CONFIGS, make_model_dir, prefill_all  # noqa: E402


class TimedBackend:
    """A backend that adds up the wall time of its calls that run steps (with async decode, the
    host's work between a launch and its collect is not in it)."""

    def __init__(self, backend):
        self.backend, self.seconds = backend, 0.0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _timed(self, fn, arrays):
        t = time.perf_counter()
        out = fn(**arrays)
        self.seconds += time.perf_counter() - t
        return out

    def forward_and_sample(self, **arrays):
        return self._timed(self.backend.forward_and_sample, arrays)

    def decode_steps(self, **arrays):
        return self._timed(self.backend.decode_steps, arrays)

    def launch_decode_steps(self, **arrays):
        return self._timed(self.backend.launch_decode_steps, arrays)

    def collect_decode_steps(self):
        return self._timed(self.backend.collect_decode_steps, {})

    def forward(self, **arrays):
        return self._timed(self.backend.forward, arrays)


def run_steps(eng, num_steps: int) -> int:
    """Steps eng until num_steps decode steps ran (a step() may run several); returns how many."""
    done = 0
    while done < num_steps:
        done += len(eng.step()[0].new_token_ids)
    return done


def drain(eng) -> int:
    """Reads the decode run eng launched ahead (async_decode), if any, without launching another,
    so that a timed window holds the GPU time of every step it counts; returns its steps."""
    saved, eng.async_decode = eng.async_decode, False
    try:
        done = 0
        while eng.backend.runs_in_flight:
            done += len(eng.step()[0].new_token_ids)
        return done
    finally:
        eng.async_decode = saved


def context_range(eng) -> tuple[int, int]:
    """The shortest and longest context among eng's running sequences."""
    lengths = [seq.num_tokens for seq in eng.scheduler.running]
    return min(lengths), max(lengths)


def print_kernels(prof, per: int, label: str) -> None:
    """The 14 kernels with the most GPU time in prof, per `per` (steps, or 1 for the whole run)."""
    events = [e for e in prof.key_averages() if getattr(e, "self_device_time_total", 0) > 0]
    gpu_total = sum(e.self_device_time_total for e in events) / per / 1e3
    print(f"  {gpu_total:.3f} ms of GPU kernels {label}")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
        print(f"  {e.self_device_time_total / per:9.1f} us  x{e.count // per:<5} {e.key[:90]}")


def short_name(name: str) -> str:
    """A kernel's name without its namespace and template arguments' noise."""
    name = name.replace("pagedgpt2::cuda::(anonymous namespace)::", "").replace("void ", "")
    name = name.replace("(pagedgpt2::cuda::SkinnyInput)", "in").replace("(pagedgpt2::cuda::SkinnyOutput)", "out")
    return name[:60]


def is_qkv(name: str) -> bool:
    """Whether a kernel is a layer's QKV GEMV (batch 1-2: the skinny kernel writing the K/V cache
    slots, SkinnyOutput::kBiasQkv)."""
    return "skinny_gemm_kernel" in name and "(pagedgpt2::cuda::SkinnyOutput)3" in name


def print_timeline(prof, num_steps: int, num_layers: int) -> None:
    """Every GPU kernel of num_steps consecutive decode steps in start order: start (us from the
    step's start), duration, and the idle gap since the previous kernel ended (negative: it
    overlapped, as programmatic launches do). A skinny step (1-2 rows) opens at layer 0's QKV
    GEMV, or at the embedding kernel just before it (graphs of later steps of a decode run have
    none: the advance of the step before embeds); a wider step at its embedding kernel."""
    from torch.autograd import DeviceType

    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    qkv = [i for i, e in enumerate(kernels) if is_qkv(e.name)]
    embeds = [i for i, e in enumerate(kernels) if "embedding_kernel" in e.name]
    if not embeds:
        print("  (no embedding kernel in the profile: no step to align the timeline on)")
        return
    # Layer 0's QKV GEMVs: every num_layers-th QKV from the first after an embedding.
    qkv = [i for i in qkv if i > embeds[0]][::num_layers]
    starts = [i - 1 if "embedding_kernel" in kernels[i - 1].name else i for i in qkv] if qkv else embeds
    if len(starts) < num_steps + 2:
        print("  (too few steps in the profile for a timeline)")
        return
    first, stop = starts[1], starts[1 + num_steps]  # skip the first step: the window's edge
    t0 = kernels[first].time_range.start
    prev_end = t0
    print(f"  timeline of {num_steps} step(s): start us, duration us, gap us, kernel")
    for e in kernels[first:stop]:
        r = e.time_range
        print(f"  {r.start - t0:8.1f} {r.end - r.start:7.2f} {r.start - prev_end:6.2f}  {short_name(e.name)}")
        prev_end = max(prev_end, r.end)
    print(f"  step span {(kernels[stop].time_range.start - t0) / num_steps:.1f} us")


def profile_serving(model: str, model_dir, dtype: str, num_requests: int, hf_subset: bool) -> None:
    """The serving workload of tools/bench_serving.py (first num_requests requests, or with
    hf_subset the requests it gives HF: each 128 new tokens; paged, 2 GiB of KV cache): wall time
    split into backend calls and Python, then GPU kernels over the run."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_serving
    from pagedgpt2 import Engine

    run_engine = bench_serving.run_engine
    requests = bench_serving.workload(max(num_requests, 32), 1024, 0)
    if hf_subset:
        requests = bench_serving.hf_subset(requests, num_requests)
    else:
        requests = requests[:num_requests]
    num_blocks = bench_serving.kv_blocks(model, dtype, 2.0, 16)

    def engine():
        return Engine(model_dir, device="cuda", dtype=dtype, block_size=16, num_blocks=num_blocks, max_num_seqs=512)

    run_engine(engine(), requests[:32])  # warm-up
    eng = engine()
    timed = eng.runner.backend = TimedBackend(eng.backend)
    r = run_engine(eng, requests)
    print(f"\n== serving, {num_requests} requests{' (HF subset)' if hf_subset else ''}: {r['seconds']:.2f} s, {r['steps']} steps "
          f"({r['seconds'] / r['steps'] * 1e3:.2f} ms each), {r['tok_s']:.0f} tok/s, mean running {r['mean_running']:.0f}; "
          f"backend calls {timed.seconds:.2f} s, Python {r['seconds'] - timed.seconds:.2f} s")
    eng = engine()  # its weight upload and GEMM warm-up stay out of the profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run_engine(eng, requests)
    torch.cuda.synchronize()
    print_kernels(prof, 1, "over the run")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--decode-steps", type=int, default=8, help="decode steps per backend call")
    p.add_argument("--workdir", default="/tmp/bench")
    p.add_argument("--serving", type=int, default=0, help="profile this many requests of the serving workload instead")
    p.add_argument("--hf-subset", action="store_true", help="with --serving: the requests tools/bench_serving.py gives HF")
    p.add_argument("--timeline", type=int, default=0, help="also list every kernel of this many steps in start order")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedgpt2 import Engine, SamplingParams

    model_dir = make_model_dir(args.model, Path(args.workdir))
    if args.serving:
        return profile_serving(args.model, model_dir, args.dtype, args.serving, args.hf_subset)
    rng = np.random.default_rng(0)
    for batch in args.batch:
        eng = Engine(model_dir, device="cuda", dtype=args.dtype, max_num_seqs=batch,
                     num_blocks=batch * 1024 // 16, decode_steps=args.decode_steps)
        eng.backend.use_cuda_graphs = not args.no_graphs
        for prompt in rng.integers(0, 50257, size=(batch, args.context)).tolist():
            eng.add_request(prompt, SamplingParams(max_new_tokens=1024 - args.context, temperature=0.0, ignore_eos=True))
        prefill_all(eng)
        run_steps(eng, 5)  # warm-up
        drain(eng)
        timed = eng.runner.backend = TimedBackend(eng.backend)
        t0 = time.perf_counter()
        steps = run_steps(eng, args.steps) + drain(eng)
        host_ms = (time.perf_counter() - t0) / steps * 1e3
        backend_ms = timed.seconds / steps * 1e3
        eng.runner.backend = eng.backend
        first = context_range(eng)[0]
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            steps = run_steps(eng, args.steps) + drain(eng)
        torch.cuda.synchronize()
        last = context_range(eng)[1]
        # NOTE: the warm-up and the timed window come first, so the profiled steps run past the
        # prompt's length (contexts ~215-245 for --context 192).
        print(f"\n== batch {batch}, prompts of {args.context}: {host_ms:.3f} ms/step wall, of which "
              f"{backend_ms:.3f} ms in the backend call (C++ and the GPU) and {host_ms - backend_ms:.3f} ms "
              f"of Python; graphs={eng.backend.num_cuda_graphs}; profiled contexts {first}-{last}")
        print_kernels(prof, steps, "per step")
        if args.timeline:
            print_timeline(prof, args.timeline, CONFIGS[args.model]["n_layer"])
        del eng


if __name__ == "__main__":
    main()
