"""Where a decode step's time goes: per-kernel GPU time from the PyTorch profiler (CUPTI sees our
kernels too), and wall time per step split into the backend call and the Python around it.

    python tools/profile_step.py --batch 1 64 256 --context 256
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import make_model_dir  # noqa: E402


class TimedBackend:
    """A backend that adds up the wall time of its forward_and_sample calls."""

    def __init__(self, backend):
        self.backend, self.seconds = backend, 0.0

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def forward_and_sample(self, **arrays):
        t = time.perf_counter()
        out = self.backend.forward_and_sample(**arrays)
        self.seconds += time.perf_counter() - t
        return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 64, 256])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--workdir", default="/tmp/bench")
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedgpt2 import Engine, SamplingParams

    model_dir = make_model_dir(args.model, Path(args.workdir))
    rng = np.random.default_rng(0)
    for batch in args.batch:
        eng = Engine(model_dir, device="cuda", dtype=args.dtype, max_num_seqs=batch,
                     num_blocks=batch * 1024 // 16)
        eng.backend.use_cuda_graphs = not args.no_graphs
        for prompt in rng.integers(0, 50257, size=(batch, args.context)).tolist():
            eng.add_request(prompt, SamplingParams(max_new_tokens=1024 - args.context, temperature=0.0, ignore_eos=True))
        while eng.kv_stats()["num_waiting"] or any(s.num_uncached > 1 for s in eng.scheduler.running):
            eng.step()  # prefill
        for _ in range(5):
            eng.step()  # warm: graph capture
        timed = eng.runner.backend = TimedBackend(eng.backend)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            eng.step()
        host_ms = (time.perf_counter() - t0) / args.steps * 1e3
        backend_ms = timed.seconds / args.steps * 1e3
        eng.runner.backend = eng.backend
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                eng.step()
        torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
        gpu_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / args.steps / 1e3
        print(f"\n== batch {batch}, context {args.context}: {host_ms:.3f} ms/step wall, of which "
              f"{backend_ms:.3f} ms in the backend call (C++ and the GPU) and {host_ms - backend_ms:.3f} ms "
              f"of Python; {gpu_total:.3f} ms/step of GPU kernels, graphs={eng.backend.num_cuda_graphs}")
        rows = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:14]
        for e in rows:
            t = getattr(e, "self_device_time_total", 0) / args.steps
            print(f"  {t:9.1f} us  x{e.count // args.steps:<4} {e.key[:90]}")
        del eng


if __name__ == "__main__":
    main()
