"""A serving workload: many requests of long-tailed lengths submitted at once.

Runs the same seeded workload through pagedgpt2's paged cache, its contiguous cache at the same
KV memory, and Hugging Face's own paged continuous batching (`generate_batch`), and reports
throughput, concurrency, KV waste and preemptions; then the blocks saved by sharing, with n=4
samples and with a shared 512-token prefix (prefix caching).

HF's subset runs twice through the paged engine: at the KV budget of the other runs, and with the
engine's default pool (a fraction of free GPU memory, as `generate_batch` sizes its own cache).
`--sweep-kv-gib` repeats paged against contiguous at other budgets: how the gain of paging
depends on how scarce KV memory is.

    python tools/bench_serving.py --requests 1000 --kv-gib 0.5 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from bench import CONFIGS, card_name, engine_args, make_model_dir, parse_setting  # noqa: E402


def workload(num_requests: int, n_positions: int, seed: int) -> list[tuple[list[int], int]]:
    """(prompt token ids, new tokens) pairs; log-normal lengths, clipped to the context."""
    rng = np.random.default_rng(seed)
    prompt_lens = np.clip(rng.lognormal(np.log(90), 1.0, num_requests), 4, n_positions - 64).astype(int)
    out_lens = np.clip(rng.lognormal(np.log(80), 1.0, num_requests), 4, None).astype(int)
    out_lens = np.minimum(out_lens, n_positions - prompt_lens)
    return [(rng.integers(0, 50257, size=p).tolist(), int(o)) for p, o in zip(prompt_lens, out_lens)]


def kv_blocks(model: str, dtype: str, kv_gib: float, block_size: int) -> int:
    """Blocks of block_size tokens that kv_gib GiB of K and V cache hold for the model."""
    shape = CONFIGS[model]
    bytes_per_token = 2 * shape["n_layer"] * shape["n_embd"] * (4 if dtype == "float32" else 2)
    return int(kv_gib * (1 << 30) / bytes_per_token / block_size)


def run_engine(eng, requests, sample_every: int = 16, params_fn=None) -> dict:
    """Submits every request at once and steps to the end; samples the cache as it goes."""
    from pagedgpt2 import SamplingParams

    for prompt, new in requests:
        params = params_fn(new) if params_fn else SamplingParams(max_new_tokens=new, temperature=0.0, ignore_eos=True)
        eng.add_request(prompt, params)
    num_tokens = steps = 0
    running, waste, saved = [], [], []
    t0 = time.perf_counter()
    while eng.has_unfinished_requests():
        num_tokens += sum(len(out.new_token_ids) for out in eng.step())  # a step may carry several
        steps += 1
        if steps % sample_every == 0:
            s = eng.kv_stats()
            running.append(s["num_running"])
            saved.append(s["blocks_saved_by_sharing"])
            if s["bytes_reserved"]:
                waste.append(1 - s["bytes_holding_tokens"] / s["bytes_reserved"])
    seconds = time.perf_counter() - t0
    stats = eng.kv_stats()
    return dict(seconds=seconds, output_tokens=num_tokens, tok_s=num_tokens / seconds, steps=steps,
                max_running=max(running, default=0), mean_running=float(np.mean(running or [0])),
                mean_waste=float(np.mean(waste or [0])), max_waste=float(np.max(waste or [0])),
                preemptions=stats["num_preemptions"], max_saved_blocks=max(saved, default=0),
                prefix_hit_blocks=stats["prefix_hit_blocks"], running_trace=running)


def hf_subset(requests, num_requests: int, new_tokens: int = 128):
    """HF's generate_batch takes one max_new_tokens for all requests: the first requests, each
    asked for new_tokens, prompts cut to fit the context."""
    return [(prompt[: 1024 - new_tokens], new_tokens) for prompt, _ in requests[:num_requests]]


def run_hf(hf_dir, requests, dtype) -> dict:
    import torch
    from transformers import GPT2LMHeadModel
    from transformers.generation import GenerationConfig

    model = GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="paged|sdpa",
                                            dtype=getattr(torch, dtype)).to("cuda").eval()
    config = GenerationConfig(max_new_tokens=requests[0][1], do_sample=False, eos_token_id=-1, pad_token_id=0)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = model.generate_batch(inputs=[p for p, _ in requests], generation_config=config, progress_bar=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    num_tokens = sum(len(o.generated_tokens) for o in out.values())
    # HF sizes its paged cache from free memory; its peak says how much it took.
    return dict(seconds=seconds, output_tokens=num_tokens, tok_s=num_tokens / seconds,
                peak_gib=torch.cuda.max_memory_allocated() / (1 << 30))


def report(name: str, r: dict) -> None:
    extra = (f" max conc. {r['max_running']}, mean conc. {r['mean_running']:.1f}, waste {r['mean_waste']:.1%} "
             f"(max {r['max_waste']:.1%}), preemptions {r['preemptions']}, peak blocks saved {r['max_saved_blocks']}, "
             f"prefix hits {r['prefix_hit_blocks']}") if "max_running" in r else ""
    print(f"{name:<20} {r['tok_s']:>9.0f} tok/s ({r['output_tokens']} tokens in {r['seconds']:.2f} s){extra}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gpt2", choices=list(CONFIGS))
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--requests", type=int, default=1000)
    # NOTE: 0.5 GiB holds 14,563 gpt2 tokens, 14 full contexts reserved contiguously: the regime
    # of the PagedAttention paper (OPT-13B on an A100-40GB: ~12 GB of KV at 800 KB a token).
    p.add_argument("--kv-gib", type=float, default=0.5, help="KV-cache memory of both cache modes")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=512)
    p.add_argument("--hf-requests", type=int, default=256, help="requests given to HF (0: skip)")
    p.add_argument("--share-requests", type=int, default=200, help="requests of the sharing runs")
    p.add_argument("--sweep-kv-gib", type=float, nargs="*", default=[],
                   help="more KV budgets (GiB) at which to run paged and contiguous")
    p.add_argument("--more-block-sizes", type=int, nargs="*", default=[],
                   help="block sizes at which to repeat the paged run (waste falls with the block)")
    p.add_argument("--engine-args", default="",
                   help='Engine arguments for every pagedgpt2 run, e.g. "async_decode=False"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workdir", default="/tmp/pagedgpt2-bench")
    p.add_argument("--json", default=None)
    args = p.parse_args()

    from pagedgpt2 import Engine, SamplingParams

    dtype = args.dtype or ("float16" if args.device == "cuda" else "float32")
    root = Path(args.workdir)
    model_dir = make_model_dir(args.model, root)
    requests = workload(args.requests, 1024, args.seed)
    num_blocks = kv_blocks(args.model, dtype, args.kv_gib, args.block_size)

    extra = engine_args(parse_setting(args.engine_args)) if args.engine_args else {}

    def engine(mode, blocks=num_blocks, block_size=args.block_size, **kw):
        return Engine(model_dir, device=args.device, dtype=dtype, kv_cache=mode, block_size=block_size,
                      num_blocks=blocks, max_num_seqs=args.max_num_seqs, **extra, **kw)

    results = {"card": card_name(args.device), "dtype": dtype, "model": args.model, "requests": args.requests,
               "kv_gib": args.kv_gib, "block_size": args.block_size,
               "mean_prompt": float(np.mean([len(p) for p, _ in requests])),
               "mean_output": float(np.mean([n for _, n in requests]))}
    print(f"# {results['card']} | {args.model} {dtype} | {args.requests} requests | KV {args.kv_gib} GiB "
          f"| mean prompt {results['mean_prompt']:.0f}, output {results['mean_output']:.0f}")
    run_engine(engine("paged"), requests[:32])  # warm-up: the GEMM timings every engine of the process shares
    for mode in ("paged", "contiguous"):
        results[mode] = run_engine(engine(mode), requests)
        report(mode, results[mode])
    results["block_sizes"] = {}
    for size in args.more_block_sizes:  # the same KV bytes in blocks of `size` tokens
        blocks = kv_blocks(args.model, dtype, args.kv_gib, size)
        results["block_sizes"][size] = run_engine(engine("paged", blocks=blocks, block_size=size), requests)
        report(f"paged, block {size}", results["block_sizes"][size])
    if args.hf_requests and args.device == "cuda":
        sub = hf_subset(requests, args.hf_requests)
        results["paged_same_subset"] = run_engine(engine("paged"), sub)
        report(f"paged, HF's subset, {args.kv_gib:g} GiB", results["paged_same_subset"])
        default_pool = engine("paged", blocks=None)
        results["paged_same_subset_default_pool"] = run_engine(default_pool, sub)
        results["paged_same_subset_default_pool"]["kv_gib"] = default_pool.kv_stats()["bytes_total"] / (1 << 30)
        report("paged, HF's subset, default pool", results["paged_same_subset_default_pool"])
        del default_pool
        gc.collect()  # its pool goes back before HF sizes its own cache
        results["hf_generate_batch"] = run_hf(root / f"hf-{args.model}", sub, dtype)
        report("HF generate_batch", results["hf_generate_batch"])

    results["kv_sweep"] = []
    for gib in args.sweep_kv_gib:
        blocks = kv_blocks(args.model, dtype, gib, args.block_size)
        row = {"kv_gib": gib}
        for mode in ("paged", "contiguous"):
            r = run_engine(engine(mode, blocks=blocks), requests)
            row[mode] = {k: r[k] for k in ("tok_s", "max_running", "mean_running", "mean_waste", "max_waste", "preemptions")}
            report(f"{mode}, {gib:g} GiB", r)
        results["kv_sweep"].append(row)

    share = requests[:args.share_requests]
    sampled = lambda new: SamplingParams(n=4, max_new_tokens=new, temperature=1.0, seed=1, ignore_eos=True)
    results["n4"] = run_engine(engine("paged"), share, sample_every=4, params_fn=sampled)
    report("paged, n=4", results["n4"])
    prefix = np.random.default_rng(1).integers(0, 50257, size=512).tolist()
    with_prefix = [(prefix + p[: 1024 - 512 - n], n) for p, n in share if 512 + n < 1024]
    results["prefix"] = run_engine(engine("paged", enable_prefix_caching=True), with_prefix, sample_every=4)
    report("paged, 512 prefix", results["prefix"])
    results["prefix_off"] = run_engine(engine("paged"), with_prefix, sample_every=4)
    report("same, no caching", results["prefix_off"])

    pg, ct = results["paged"], results["contiguous"]
    print(f"{'run':<22} {'tok/s':>9} {'max conc.':>9} {'mean conc.':>10} {'waste':>7} {'preempt':>7}")
    for name in ("paged", "contiguous"):
        r = results[name]
        print(f"{name:<22} {r['tok_s']:>9.0f} {r['max_running']:>9} {r['mean_running']:>10.1f} "
              f"{r['mean_waste']:>7.1%} {r['preemptions']:>7}")
    print(f"paged / contiguous: throughput {pg['tok_s'] / ct['tok_s']:.2f}x, "
          f"concurrency {pg['max_running'] / max(ct['max_running'], 1):.2f}x")
    if "hf_generate_batch" in results:
        hf = results["hf_generate_batch"]
        print(f"HF generate_batch ({args.hf_requests} requests): {hf['tok_s']:.0f} tok/s, peak {hf['peak_gib']:.1f} GiB allocated")
        for key, name in (("paged_same_subset", f"{args.kv_gib:g} GiB pool"),
                          ("paged_same_subset_default_pool", "default pool")):
            sub = results[key]
            print(f"  pagedgpt2 on the same, {name}: {sub['tok_s']:.0f} tok/s = {sub['tok_s'] / hf['tok_s']:.1f}x")
    for row in results["kv_sweep"]:
        pg, ct = row["paged"], row["contiguous"]
        print(f"KV {row['kv_gib']:g} GiB: paged {pg['tok_s']:.0f} / contiguous {ct['tok_s']:.0f} tok/s = "
              f"{pg['tok_s'] / ct['tok_s']:.2f}x; peak running {pg['max_running']} / {ct['max_running']} = "
              f"{pg['max_running'] / max(ct['max_running'], 1):.2f}x")
    print(f"n=4 sampling: peak blocks saved by sharing {results['n4']['max_saved_blocks']}, {results['n4']['tok_s']:.0f} tok/s")
    print(f"shared 512-token prefix: prefix-cache hit blocks {results['prefix']['prefix_hit_blocks']}, "
          f"{results['prefix']['tok_s']:.0f} tok/s vs {results['prefix_off']['tok_s']:.0f} without caching")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
