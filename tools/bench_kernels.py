"""Kernel and step benchmarks on the GPU, against the card's measured copy bandwidth.

1. Device-to-device copy bandwidth (bytes read + written): the roofline for memory-bound kernels.
2. The paged-attention decode kernel alone: batch x context, K/V bytes read per launch over the
   copy bandwidth, for several block sizes and for the contiguous layout (one block per sequence).
3. A whole decode step of the engine against context length, paged vs contiguous.

    python tools/bench_kernels.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import card_name, make_model_dir  # noqa: E402


def attention_table(ops, copy_gbs, dtype, iters):
    rows = []
    num_heads, head_size, elem = 12, 64, 2 if dtype != "float32" else 4
    print(f"{'batch':>5} {'context':>7} {'block':>5} {'ms':>8} {'GB/s':>8} {'of copy':>8}")
    for batch, context in [(64, 1024), (64, 512), (256, 256), (8, 1024), (1, 1024)]:
        for block_size in (16, 1, 8, 32, 1024):
            if block_size == 1024 and context != 1024:
                continue
            ms = ops.time_decode_attention(batch, context, num_heads, head_size, block_size, dtype, iters)
            kv_bytes = 2 * batch * context * num_heads * head_size * elem
            gbs = kv_bytes / (ms * 1e-3) / 1e9
            rows.append(dict(batch=batch, context=context, block_size=block_size, ms=ms, gbs=gbs,
                             of_copy=gbs / copy_gbs))
            name = "contig" if block_size == 1024 else str(block_size)
            print(f"{batch:>5} {context:>7} {name:>5} {ms:>8.4f} {gbs:>8.0f} {gbs / copy_gbs:>8.1%}")
    return rows


def step_vs_context(model_dir, dtype, batch, contexts, new_tokens=32):
    from pagedgpt2 import Engine, SamplingParams

    rng = np.random.default_rng(0)
    rows = []
    engines = {mode: Engine(model_dir, device="cuda", dtype=dtype, kv_cache=mode, max_num_seqs=batch,
                            num_blocks=(batch * 1024 * 2) // 16) for mode in ("paged", "contiguous")}
    print(f"{'context':>7} {'paged ms':>9} {'contig ms':>9} {'paged/contig':>12}")
    for context in contexts:
        prompts = rng.integers(0, 50257, size=(batch, context - new_tokens)).tolist()
        times = {}
        for mode, eng in engines.items():
            def run(n):
                t0 = time.perf_counter()
                eng.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))
                return time.perf_counter() - t0
            run(new_tokens)  # warm-up (graph capture)
            full = min(run(new_tokens) for _ in range(3))
            one = min(run(1) for _ in range(3))
            times[mode] = (full - one) / (new_tokens - 1) * 1e3
        rows.append(dict(context=context, paged_ms=times["paged"], contiguous_ms=times["contiguous"]))
        print(f"{context:>7} {times['paged']:>9.3f} {times['contiguous']:>9.3f} {times['paged'] / times['contiguous']:>12.3f}")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="float16")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--step-batch", type=int, default=64)
    p.add_argument("--workdir", default="/tmp/pagedgpt2-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from pagedgpt2 import _cuda

    ops = _cuda.ops
    copy_gbs = ops.copy_bandwidth_gbs(1 << 30, 20)
    print(f"# {card_name('cuda')} | {args.dtype} | device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    attention = attention_table(ops, copy_gbs, args.dtype, args.iters)
    model_dir = make_model_dir("gpt2", Path(args.workdir))
    steps = step_vs_context(model_dir, args.dtype, args.step_batch, [128, 256, 512, 768, 1024])
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card_name("cuda"), dtype=args.dtype, copy_gbs=copy_gbs,
                                                   attention=attention, steps=steps), indent=1))


if __name__ == "__main__":
    main()
