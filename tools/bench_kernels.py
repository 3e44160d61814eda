"""Kernel and step benchmarks on the GPU, against the card's measured copy bandwidth.

1. Device-to-device copy bandwidth (bytes read + written): the roofline for memory-bound kernels.
2. The paged-attention decode kernel alone: batch x context, K/V bytes read per launch over the
   copy bandwidth, for several block sizes and for the contiguous layout (one block per sequence);
   then one head a thread block against four (a warp each). Launches are replayed from a CUDA
   graph, each on its own copy of the cache, so that none finds its rows in L2 (as in a step).
3. The skinny GEMV alone at gpt2's and gpt2-xl's layer shapes, weight bytes over copy bandwidth.
4. One dependent stage of a batch-1 step alone: a kernel boundary, a grid barrier, tagged words;
   then gpt2's layer GEMVs as the engine's kernels against one persistent kernel.
5. A whole decode step of the engine against context length, paged vs contiguous.

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
from bench import card_name, make_model_dir, prefill_all  # noqa: E402


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


def partition_sweep(ops, copy_gbs, dtype, iters):
    """The decode kernel at fixed partition sizes (0: the model's pick), block size 16."""
    num_heads, head_size, elem = 12, 64, 2 if dtype != "float32" else 4
    sizes = [0, 64, 128, 256, 512, 1024]
    rows = []
    print("partition size sweep, of copy bandwidth (0 = the model's pick)")
    print(f"{'batch':>5} {'context':>7} " + " ".join(f"{s:>6}" for s in sizes))
    for batch, context in [(64, 1024), (256, 256), (256, 192), (8, 1024), (1, 1024), (1, 256)]:
        fractions = []
        for size in sizes:
            if size > context:
                fractions.append(float("nan"))
                continue
            ms = ops.time_decode_attention(batch, context, num_heads, head_size, 16, dtype, iters, size)
            kv_bytes = 2 * batch * context * num_heads * head_size * elem
            fractions.append(kv_bytes / (ms * 1e-3) / 1e9 / copy_gbs)
            rows.append(dict(batch=batch, context=context, partition_size=size, ms=ms, of_copy=fractions[-1]))
        print(f"{batch:>5} {context:>7} " + " ".join(f"{f:>6.1%}" for f in fractions))
    return rows


def heads_table(ops, copy_gbs, dtype, iters):
    """The decode kernel with a block per head against a warp per head (4 heads a block), block
    size 16, partitions as the model picks them for each; 'auto' is what the model runs."""
    elem = 2 if dtype != "float32" else 4
    shapes = [(256, 192, 12), (256, 256, 12), (128, 192, 12), (64, 192, 12), (64, 1024, 12),
              (32, 512, 12), (8, 1024, 12), (1, 1024, 12), (1, 192, 12), (256, 192, 25), (8, 192, 25)]
    rows = []
    print("heads per thread block, of copy bandwidth")
    print(f"{'batch':>5} {'context':>7} {'heads':>5} {'1 head':>8} {'4 heads':>8} {'4 / 1':>6} {'auto':>5}")
    for batch, context, num_heads in shapes:
        kv_bytes = 2 * batch * context * num_heads * 64 * elem
        ms = {g: ops.time_decode_attention(batch, context, num_heads, 64, 16, dtype, iters, 0, g) for g in (1, 4)}
        frac = {g: kv_bytes / (t * 1e-3) / 1e9 / copy_gbs for g, t in ms.items()}
        auto = ops.decode_heads_per_block(batch, num_heads)
        rows.append(dict(batch=batch, context=context, num_heads=num_heads, ms_1=ms[1], ms_4=ms[4],
                         of_copy_1=frac[1], of_copy_4=frac[4], auto=auto))
        print(f"{batch:>5} {context:>7} {num_heads:>5} {frac[1]:>8.1%} {frac[4]:>8.1%} "
              f"{ms[1] / ms[4]:>5.2f}x {auto:>5}")
    return rows


# The GEMV shapes of a layer (qkv, proj, fc, fc_proj) and of the LM head, N x K.
# Weights the "in L2" column times: well under the 50-60 MB of L2 of an H100 / H200.
L2_RESIDENT_MAX_BYTES = 32 << 20
GEMV_SHAPES = {"gpt2": [(2304, 768), (768, 768), (3072, 768), (768, 3072), (50304, 768)],
               "gpt2-xl": [(4800, 1600), (1600, 1600), (6400, 1600), (1600, 6400), (50304, 1600)]}


def gemv_table(ops, copy_gbs):
    """The skinny GEMV alone (float16) at the layer shapes of gpt2 and gpt2-xl, replayed from a
    graph of programmatic launches (as in a step) on weights not in L2: weight bytes per launch
    over the copy bandwidth. Beside it, where W fits in L2, the same chain on one copy of W that
    stays there: what the GEMV costs when no byte comes from memory."""
    rows = []
    print("skinny GEMV alone, float16 (N x K weights), of copy bandwidth; 'in L2': W resident in L2")
    print(f"{'model':>8} {'N':>6} {'K':>5} {'MB':>6} {'rows':>4} {'us':>7} {'GB/s':>6} {'of copy':>8} "
          f"{'in L2 us':>8}")
    for model, mats in GEMV_SHAPES.items():
        for n, k in mats:
            for r in (1, 2):
                ms = ops.time_skinny_gemm(r, n, k)
                gbs = 2 * n * k / (ms * 1e-3) / 1e9
                fits = 2 * n * k <= L2_RESIDENT_MAX_BYTES
                l2_ms = ops.time_skinny_gemm(r, n, k, l2_resident=True) if fits else None
                rows.append(dict(model=model, N=n, K=k, rows=r, ms=ms, gbs=gbs, of_copy=gbs / copy_gbs,
                                 l2_resident_ms=l2_ms))
                l2_cell = f"{l2_ms * 1e3:>8.2f}" if fits else f"{'-':>8}"
                print(f"{model:>8} {n:>6} {k:>5} {2 * n * k / 1e6:>6.1f} {r:>4} {ms * 1e3:>7.2f} {gbs:>6.0f} "
                      f"{gbs / copy_gbs:>8.1%} {l2_cell}")
    return rows


def dependency_table(ops):
    """The floor under each dependent step of a batch-1 decode: one all-to-all hand-over between
    thread blocks (256 threads), as a boundary between programmatically launched kernels (alone,
    and with each kernel asking L2 for the next 4 MB of "weights", as the GEMVs do) and as a
    grid-wide barrier inside one kernel, at 1, 2 and 3 blocks an SM (the skinny GEMV runs 3)."""
    rows = []
    print("one all-to-all hand-over between thread blocks (us): kernel boundary vs grid barrier")
    print(f"{'blocks an SM':>12} {'kernel':>7} {'+4 MB L2':>8} {'barrier':>7}")
    for per_sm in (1, 2, 3):
        kernel_us = ops.time_dependency("kernel", per_sm)
        prefetch_us = ops.time_dependency("kernel", per_sm, prefetch_mb=4)
        barrier_us = ops.time_dependency("barrier", per_sm)
        rows.append(dict(per_sm=per_sm, kernel_us=kernel_us, kernel_prefetch_4mb_us=prefetch_us,
                         barrier_us=barrier_us))
        print(f"{per_sm:>12} {kernel_us:>7.2f} {prefetch_us:>8.2f} {barrier_us:>7.2f}")
    return rows


def handover_table(ops):
    """One dependent stage of a batch-1 step with nothing else in it: every block (512 threads,
    1 an SM: a persistent kernel's shape) gathers a float32 vector all blocks wrote and writes
    its slice of the next, synchronized by a kernel boundary, a grid barrier, or words that carry
    the round that wrote them (no barrier). Widths: gpt2's x (768) and gpt2-xl's (1,600); at
    wider ones a round is mostly its own arithmetic."""
    rows = []
    print("one stage: gather a vector all blocks wrote, write a slice of the next (us a round)")
    print(f"{'width':>6} {'kernel':>7} {'barrier':>7} {'tagged':>7}")
    for width in (768, 1600):
        us = {kind: ops.time_handover(kind, width, threads=512) for kind in ("kernel", "barrier", "tagged")}
        rows.append(dict(width=width, **{f"{k}_us": v for k, v in us.items()}))
        print(f"{width:>6} {us['kernel']:>7.2f} {us['barrier']:>7.2f} {us['tagged']:>7.2f}")
    return rows


def gemv_layers_table(ops):
    """gpt2's four layer GEMVs (QKV, proj, fc with GELU, fc_proj), 12 layers of their own fp16
    weights at batch 1, at gpt2's, gpt2-medium's and gpt2-xl's widths: the engine's skinny GEMV
    kernels, launched programmatically, against one persistent kernel (a block an SM, tagged
    words between stages, a producer warp streaming each block's rows through a ring in shared
    memory, ahead across stages). Microseconds a layer."""
    rows = []
    print("gpt2's layer GEMVs, 12 layers (us a layer): engine kernels vs one persistent kernel")
    print(f"{'width':>6} {'MB/layer':>8} {'kernels':>8} {'persistent':>10} {'ratio':>6}")
    for width in (768, 1024, 1600):
        kernels_us = ops.time_gemv_layers("kernels", width)
        persistent_us = ops.time_gemv_layers("persistent", width)
        mb = 12 * width * width * 2 / 1e6
        rows.append(dict(width=width, weight_mb=mb, kernels_us=kernels_us, persistent_us=persistent_us))
        print(f"{width:>6} {mb:>8.1f} {kernels_us:>8.2f} {persistent_us:>10.2f} {kernels_us / persistent_us:>6.2f}")
    return rows


def gemv_split_sweep(ops):
    """The skinny GEMV (batch 1 and 2) against its K split: 1, 2, 4 or 8 warps per output row
    (0 = as the launcher picks), without and with the 4 MB L2 prefetch of the next GEMV's
    weights a step's GEMVs ask for. Microseconds per GEMV, as in gemv_table."""
    splits = (0, 1, 2, 4, 8)
    rows = []
    print("skinny GEMV against warps per row (us; 0 = the launcher's pick), float16")
    print(f"{'model':>8} {'N':>6} {'K':>5} {'rows':>4} {'L2 MB':>5} " + " ".join(f"{'w=' + str(w):>7}" for w in splits))
    for model, mats in GEMV_SHAPES.items():
        for n, k in mats:
            for r in (1, 2):
                for mb in (0, 4):
                    us = {}
                    for w in splits:
                        if k // 8 >= 32 * w:  # at least one 16-byte vector per lane
                            us[w] = ops.time_skinny_gemm(r, n, k, warps_per_row=w, prefetch_mb=mb) * 1e3
                    rows.append(dict(model=model, N=n, K=k, rows=r, prefetch_mb=mb, us=us))
                    cells = " ".join(f"{us[w]:>7.2f}" if w in us else f"{'-':>7}" for w in splits)
                    print(f"{model:>8} {n:>6} {k:>5} {r:>4} {mb:>5} {cells}")
    return rows


def decode_ms_per_step(eng, prompts, new_tokens, repeats=3):
    """Best wall time per decode step once every prompt is in the cache: the prefill steps and
    the first decode call run untimed."""
    from pagedgpt2 import SamplingParams

    best = float("inf")
    for _ in range(repeats):
        for p in prompts:
            eng.add_request(p, SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True))
        prefill_all(eng)
        eng.step()
        t0 = time.perf_counter()
        timed = 0  # decode steps (a step() may run several)
        while eng.has_unfinished_requests():
            timed += len(eng.step()[0].new_token_ids)
        best = min(best, (time.perf_counter() - t0) / timed * 1e3)
    return best


def step_vs_context(model_dir, dtype, batch, contexts, new_tokens=41):
    """Decode step time against context length, paged vs contiguous, same batch and pool."""
    from pagedgpt2 import Engine

    rng = np.random.default_rng(0)
    rows = []
    engines = {mode: Engine(model_dir, device="cuda", dtype=dtype, kv_cache=mode, max_num_seqs=batch,
                            num_blocks=(batch * 1024 * 2) // 16) for mode in ("paged", "contiguous")}
    print(f"{'context':>7} {'paged ms':>9} {'contig ms':>9} {'paged/contig':>12}")
    for context in contexts:
        prompts = rng.integers(0, 50257, size=(batch, context - new_tokens)).tolist()
        times = {mode: decode_ms_per_step(eng, prompts, new_tokens) for mode, eng in engines.items()}
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
    p.add_argument("--sweep", action="store_true", help="also time the decode kernel at fixed partition sizes")
    p.add_argument("--gemv-splits", action="store_true",
                   help="also time the skinny GEMV at every K split (warps per output row)")
    args = p.parse_args()

    from pagedgpt2 import _cuda

    ops = _cuda.ops
    copy_gbs = ops.copy_bandwidth_gbs(1 << 30, 20)
    print(f"# {card_name('cuda')} | {args.dtype} | device copy bandwidth {copy_gbs:.0f} GB/s (read + write)")
    attention = attention_table(ops, copy_gbs, args.dtype, args.iters)
    sweep = partition_sweep(ops, copy_gbs, args.dtype, args.iters) if args.sweep else []
    heads = heads_table(ops, copy_gbs, args.dtype, args.iters)
    gemv = gemv_table(ops, copy_gbs)
    dependency = dependency_table(ops)
    handover = handover_table(ops)
    gemv_layers = gemv_layers_table(ops)
    gemv_splits = gemv_split_sweep(ops) if args.gemv_splits else []
    model_dir = make_model_dir("gpt2", Path(args.workdir))
    steps = step_vs_context(model_dir, args.dtype, args.step_batch, [128, 256, 512, 768, 1024])
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card_name("cuda"), dtype=args.dtype, copy_gbs=copy_gbs,
                                                   attention=attention, partition_sweep=sweep, heads_per_block=heads,
                                                   gemv=gemv, dependency=dependency, handover=handover, gemv_layers=gemv_layers,
                                                   gemv_splits=gemv_splits,
                                                   steps=steps),
                                              indent=1))


if __name__ == "__main__":
    main()
