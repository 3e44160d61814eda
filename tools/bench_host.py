"""Host time a decode step leaves the GPU waiting for, measured without a GPU.

The engine runs over a stand-in backend that samples at once but keeps the clock of a GPU it
emulates: each forward or decode run occupies that GPU for a set time (--step-ms a decode step,
--prefill-us a prompt token), queued behind the work before it, and waiting for results spins
until the emulated GPU is there. The host's Python overlaps the emulated GPU as it would a real
one; what it does not overlap is wall time the GPU sits idle. The figure is per decode step, as
tools/bench.py counts a step: ((t(new_tokens) - t(1)) - (GPU(new_tokens) - GPU(1))) /
(new_tokens - 1), less the time in Python's cyclic GC (reported apart: a full collection now and
then is most of the spread between runs). Runs on the bundled model's CPU engine (its weights
are never used).

    python tools/bench_host.py --batch 256 --prompt-len 128 --new-tokens 128 --step-ms 1.0
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import numpy as np


def spin_until(t: float) -> None:
    while time.perf_counter() < t:
        pass


class EmulatedGpu:
    """A backend whose forwards take time on an emulated GPU and sample random tokens.
    Everything else (copy_blocks, sizes) is the real backend's."""

    def __init__(self, real, step_s: float, prefill_token_s: float, batch: int, vocab: int):
        self._real = real
        self._step_s, self._prefill_token_s, self._batch = step_s, prefill_token_s, batch
        self._rng = np.random.default_rng(0)
        self._vocab = vocab
        self._runs: list[tuple[float, np.ndarray]] = []
        self.free_at = 0.0  # when the emulated GPU finishes what it was given
        self.busy = 0.0     # seconds of work it was given

    def __getattr__(self, name):
        return getattr(self._real, name)

    def _enqueue(self, seconds: float) -> float:
        self.free_at = max(self.free_at, time.perf_counter()) + seconds
        self.busy += seconds
        return self.free_at

    def _forward_s(self, num_tokens: int) -> float:
        # A decode-only step costs a step; a step with prompt tokens, their prefill time.
        return self._step_s if num_tokens <= self._batch else num_tokens * self._prefill_token_s

    def forward(self, **a):
        spin_until(self._enqueue(self._forward_s(len(a["token_ids"]))))
        return np.zeros((len(a["logits_indices"]), self._vocab), dtype=np.float32)

    def forward_and_sample(self, **a):
        spin_until(self._enqueue(self._forward_s(len(a["token_ids"]))))
        return self._rng.integers(0, self._vocab, len(a["logits_indices"])).astype(np.int32)

    def launch_decode_steps(self, **a):
        steps, seqs = a["slot_mappings"].shape
        tokens = self._rng.integers(0, self._vocab, (steps, seqs)).astype(np.int32)
        self._runs.append((self._enqueue(steps * self._step_s), tokens))

    def collect_decode_steps(self):
        done_at, tokens = self._runs.pop(0)
        spin_until(done_at)
        return tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--step-ms", type=float, default=1.0, help="emulated GPU time of a decode step")
    p.add_argument("--prefill-us", type=float, default=0.35, help="emulated GPU time a prompt token")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="default: the GPU engine's budget in generate()")
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()

    from pagedgpt2 import Engine, SamplingParams
    from pagedgpt2.engine import DEFAULT_BATCHED_TOKENS

    block_size = 16
    blocks = args.batch * -(-(args.prompt_len + args.new_tokens) // block_size) + 64
    eng = Engine(device="cpu", block_size=block_size, num_blocks=blocks, max_num_seqs=args.batch,
                 max_num_batched_tokens=args.max_num_batched_tokens or DEFAULT_BATCHED_TOKENS["cuda"][1])
    gpu = EmulatedGpu(eng.runner.backend, args.step_ms * 1e-3, args.prefill_us * 1e-6, args.batch,
                      eng.config["vocab_size"])
    eng.runner.backend = gpu
    prompts = np.random.default_rng(0).integers(0, eng.config["vocab_size"],
                                                size=(args.batch, args.prompt_len)).tolist()

    gc_s = [0.0, 0.0]  # [seconds in the cyclic GC so far, start of the current collection]

    def on_gc(phase, _info):
        if phase == "start":
            gc_s[1] = time.perf_counter()
        else:
            gc_s[0] += time.perf_counter() - gc_s[1]

    gc.callbacks.append(on_gc)

    def run(n: int) -> tuple[float, float, float]:
        """(wall, emulated GPU, cyclic GC) seconds of one generate of n new tokens."""
        gpu.busy, gc_s[0] = 0.0, 0.0
        t0 = time.perf_counter()
        eng.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
        return time.perf_counter() - t0, gpu.busy, gc_s[0]

    run(1)  # warm-up
    run(args.new_tokens)
    exposed, in_gc, walls = [], [], []
    steps = args.new_tokens - 1
    for _ in range(args.repeats):
        (w1, g1, c1), (wn, gn, cn) = run(1), run(args.new_tokens)
        exposed.append(((wn - w1) - (gn - g1) - (cn - c1)) / steps * 1e3)
        in_gc.append((cn - c1) / steps * 1e3)
        walls.append((wn - w1) / steps * 1e3)
    step = statistics.median(walls)
    q = statistics.quantiles(exposed, n=4)
    print(f"batch {args.batch}, prompt {args.prompt_len}, {args.new_tokens} new tokens, emulated GPU "
          f"{args.step_ms:.3f} ms a decode step, {args.repeats} pairs of runs")
    print(f"host time the GPU waits for, a step: median {q[1]:.3f} ms (quartiles {q[0]:.3f}-{q[2]:.3f}), "
          f"and {statistics.mean(in_gc):.3f} ms of cyclic GC on average")
    print(f"a step takes {step:.3f} ms: {args.batch / step * 1e3:,.0f} tok/s against "
          f"{args.batch / args.step_ms * 1e3:,.0f} for the GPU alone")


if __name__ == "__main__":
    main()
