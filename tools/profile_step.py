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
from bench import make_model_dir, prefill_all  # noqa: E402


class TimedBackend:
    """A backend that adds up the wall time of its forward_and_sample and decode_steps calls."""

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


def run_steps(eng, num_steps: int) -> int:
    """Steps eng until num_steps decode steps ran (a step() may run several); returns how many."""
    done = 0
    while done < num_steps:
        done += len(eng.step()[0].new_token_ids)
    return done


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
    args = p.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile

    from pagedgpt2 import Engine, SamplingParams

    model_dir = make_model_dir(args.model, Path(args.workdir))
    rng = np.random.default_rng(0)
    for batch in args.batch:
        eng = Engine(model_dir, device="cuda", dtype=args.dtype, max_num_seqs=batch,
                     num_blocks=batch * 1024 // 16, decode_steps=args.decode_steps)
        eng.backend.use_cuda_graphs = not args.no_graphs
        for prompt in rng.integers(0, 50257, size=(batch, args.context)).tolist():
            eng.add_request(prompt, SamplingParams(max_new_tokens=1024 - args.context, temperature=0.0, ignore_eos=True))
        prefill_all(eng)
        run_steps(eng, 5)  # warm: graph capture
        timed = eng.runner.backend = TimedBackend(eng.backend)
        t0 = time.perf_counter()
        steps = run_steps(eng, args.steps)
        host_ms = (time.perf_counter() - t0) / steps * 1e3
        backend_ms = timed.seconds / steps * 1e3
        eng.runner.backend = eng.backend
        with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
            steps = run_steps(eng, args.steps)
        torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" or getattr(e, "self_device_time_total", 0) > 0]
        gpu_total = sum(getattr(e, "self_device_time_total", 0) for e in events) / steps / 1e3
        print(f"\n== batch {batch}, context {args.context}: {host_ms:.3f} ms/step wall, of which "
              f"{backend_ms:.3f} ms in the backend call (C++ and the GPU) and {host_ms - backend_ms:.3f} ms "
              f"of Python; {gpu_total:.3f} ms/step of GPU kernels, graphs={eng.backend.num_cuda_graphs}")
        rows = sorted(events, key=lambda e: -getattr(e, "self_device_time_total", 0))[:14]
        for e in rows:
            t = getattr(e, "self_device_time_total", 0) / steps
            print(f"  {t:9.1f} us  x{e.count // steps:<4} {e.key[:90]}")
        del eng


if __name__ == "__main__":
    main()
