"""Where the persistent decode kernel's time goes: one batch-1 decode step traced.

Runs a few decode steps with the kernel on (PAGEDGPT2_PERSISTENT=1) and
PAGEDGPT2_PERSISTENT_TRACE set, then reads the stage marks the kernel wrote (clock64 of each
block's first consumer thread at every stage boundary) and prints, per stage, the time spent
working and waiting at the grid barrier after it, averaged over layers (median and max over
blocks), in µs at the SM's rated clock.

    python tools/persistent_trace.py --model gpt2 --batch 1 --context 192
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

STAGES = ["ln_1+qkv", "attention", "proj", "ln_2+fc", "fc_proj"]


def summarize(path: str) -> None:
    lines = Path(path).read_text().splitlines()
    head = lines[0].split()
    layers, khz = int(head[4]), int(head[6])
    marks = np.array([[int(x) for x in line.split()] for line in lines[1:]], dtype=np.float64)
    us = 1e3 / khz  # one clock in µs
    total = (marks[:, -1] - marks[:, 0]) * us
    print(f"step in the kernel: median {np.median(total):.1f} µs over {len(marks)} blocks "
          f"({layers} layers; {np.median(total) / layers:.2f} µs a layer with the LM head spread)")
    header = "".join(f"{h:>10}" for h in ("work med", "work max", "wait med", "wait max"))
    print(f"{'stage':<12}{header}   (µs, mean over layers)")
    for k, name in enumerate(STAGES):
        start = np.stack([marks[:, 10 * l + 2 * k] for l in range(layers)], axis=1)
        done = np.stack([marks[:, 10 * l + 2 * k + 1] for l in range(layers)], axis=1)
        out = np.stack([marks[:, 10 * l + 2 * k + 2] for l in range(layers)], axis=1)
        work, wait = ((done - start) * us).mean(1), ((out - done) * us).mean(1)
        cells = (np.median(work), work.max(), np.median(wait), wait.max())
        print(f"{name:<12}" + "".join(f"{c:10.2f}" for c in cells))
    lm = (marks[:, -1] - marks[:, -2]) * us
    print(f"{'ln_f+lm_head':<12}{np.median(lm):10.2f}{lm.max():10.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="gpt2")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=192)
    p.add_argument("--workdir", default="/tmp/bench")
    args = p.parse_args()
    trace = os.path.join(tempfile.mkdtemp(), "trace.txt")
    os.environ["PAGEDGPT2_PERSISTENT"] = "1"
    os.environ["PAGEDGPT2_PERSISTENT_TRACE"] = trace
    from bench import make_model_dir  # noqa: E402
    from pagedgpt2 import Engine, SamplingParams

    eng = Engine(make_model_dir(args.model, Path(args.workdir)), device="cuda", dtype=args.dtype)
    if not eng.backend.persistent_decode:
        sys.exit("the persistent decode kernel is off here (needs sm_90 and head size 64)")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 50257, size=args.context).tolist() for _ in range(args.batch)]
    eng.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True))
    del eng  # writes the trace of the last step
    import gc
    gc.collect()
    summarize(trace)


if __name__ == "__main__":
    main()
