"""Decode throughput of pagedgpt2 against Hugging Face transformers, in one process.

Random weights of a real GPT-2 configuration, a fixed prompt length and number of new tokens.
Decode tokens/s = batch * (new_tokens - 1) / (time(new_tokens) - time(1)): the prefill and the
first token cancel out, for both engines alike. Prints a table with the ratio to HF.

    python tools/bench.py --device cpu --batch-sizes 1 8 --prompt-len 64 --new-tokens 64
    python tools/bench.py --device cuda --dtype float16 --model gpt2 gpt2-xl --batch-sizes 1 8 64 256
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = {  # the released shapes
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16),
    "gpt2-large": dict(n_layer=36, n_embd=1280, n_head=20),
    "gpt2-xl": dict(n_layer=48, n_embd=1600, n_head=25),
}


def parse_setting(text: str) -> dict[str, str]:
    """Space-separated NAME=VALUE pairs: upper-case names are environment variables, lower-case
    ones Engine arguments (see engine_args)."""
    pairs = dict(item.split("=", 1) for item in text.split())
    if not pairs:
        raise SystemExit(f"empty setting {text!r}: give NAME=VALUE pairs")
    return pairs


def engine_args(setting: dict[str, str]) -> dict:
    """The Engine arguments of a setting, their values read as Python literals."""
    return {name: ast.literal_eval(value) for name, value in setting.items() if not name.isupper()}


def make_model_dir(name: str, root: Path) -> Path:
    """A random-weight HF checkpoint of the named shape, converted for the engine."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from pagedgpt2.convert import convert_checkpoint

    hf_dir, dst = root / f"hf-{name}", root / f"engine-{name}"
    if not dst.exists():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(**CONFIGS[name]))
        (model if name == "gpt2" else model.half()).save_pretrained(hf_dir)  # big ones: half the bytes
        convert_checkpoint(hf_dir, dst, dtype="float16" if name != "gpt2" else "float32", progress=False)
    return dst


def prefill_all(eng) -> None:
    """Steps eng until every request is admitted and its whole prompt is in the cache (the next
    step is a pure decode step)."""
    scheduler = eng.scheduler
    while scheduler.waiting or any(seq.num_uncached > 1 for seq in scheduler.running):
        eng.step()


def timed(fn, repeats: int) -> float:
    """Median wall time of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(run, batch: int, new_tokens: int, repeats: int) -> tuple[float, float]:
    """(decode tokens/s, ms per decode step) from run(max_new_tokens)."""
    t_full = timed(lambda: run(new_tokens), repeats)
    t_one = timed(lambda: run(1), repeats)
    step = (t_full - t_one) / (new_tokens - 1)
    return batch / step, step * 1e3


def make_engine(model_dir, device, dtype, kv_cache, max_batch, **engine_args):
    from pagedgpt2 import Engine

    # A pool of one full context per sequence (in blocks of 16): both cache modes fit the batch.
    # engine_args may override these.
    args = dict(block_size=16, num_blocks=max_batch * 1024 // 16, max_num_seqs=max_batch)
    args.update(engine_args)
    return Engine(model_dir, device=device, dtype=dtype, kv_cache=kv_cache, **args)


def bench_engine(eng, batch, prompts, new_tokens, repeats):
    from pagedgpt2 import SamplingParams

    def run(n):
        eng.generate(prompts, SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))

    return decode_rate(run, batch, new_tokens, repeats)


def bench_hf(hf_dir, device, dtype, batch, prompts, new_tokens, repeats):
    import torch
    from transformers import GPT2LMHeadModel

    torch_dtype = getattr(torch, dtype)
    model = GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch_dtype,
                                            attn_implementation="eager").to(device).eval()
    ids = torch.tensor(prompts, device=device)
    mask = torch.ones_like(ids)

    def run(n):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                           do_sample=False, pad_token_id=0)
        if device == "cuda":
            torch.cuda.synchronize()

    return decode_rate(run, batch, new_tokens, repeats)


def card_name(device: str) -> str:
    if device == "cuda":
        import torch
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default=None)
    p.add_argument("--model", nargs="+", default=["gpt2"], choices=list(CONFIGS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--kv-cache", nargs="+", default=["paged"], choices=["paged", "contiguous"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face baseline")
    p.add_argument("--hf-max-batch", type=int, default=1 << 30, help="largest batch to run HF at")
    p.add_argument("--workdir", default=None, help="where the random checkpoints are kept")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--engine-args", default="",
                   help='Engine arguments as NAME=VALUE pairs, e.g. "max_num_batched_tokens=16384"')
    args = p.parse_args()
    extra = engine_args(parse_setting(args.engine_args)) if args.engine_args else {}
    dtype = args.dtype or ("float32" if args.device == "cpu" else "float16")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="pagedgpt2-bench-"))
    rng = np.random.default_rng(0)
    rows = []
    print(f"# {card_name(args.device)} | {dtype} | prompt {args.prompt_len} | {args.new_tokens} new tokens")
    print(f"{'model':<10} {'batch':>5} {'engine':<20} {'tok/s':>10} {'ms/step':>8} {'vs HF':>7}")
    for name in args.model:
        model_dir = make_model_dir(name, root)
        prompts = {b: rng.integers(0, 50257, size=(b, args.prompt_len)).tolist() for b in args.batch_sizes}
        hf = {}
        for batch in args.batch_sizes:
            if not args.no_hf and batch <= args.hf_max_batch:
                hf[batch] = bench_hf(root / f"hf-{name}", args.device, dtype, batch, prompts[batch],
                                     args.new_tokens, args.repeats)
                rows.append(dict(model=name, batch=batch, engine="hf-eager", tok_s=hf[batch][0], ms_step=hf[batch][1]))
                print(f"{name:<10} {batch:>5} {'hf-eager':<20} {hf[batch][0]:>10.0f} {hf[batch][1]:>8.2f} {1.0:>7.2f}", flush=True)
        for mode in args.kv_cache:  # one engine per mode, sized for the largest batch, one at a time
            eng = make_engine(model_dir, args.device, dtype, mode, max(args.batch_sizes), **extra)
            for batch in args.batch_sizes:
                ours = bench_engine(eng, batch, prompts[batch], args.new_tokens, args.repeats)
                ratio = ours[0] / hf[batch][0] if batch in hf else float("nan")
                rows.append(dict(model=name, batch=batch, engine=f"pagedgpt2-{mode}", tok_s=ours[0],
                                 ms_step=ours[1], vs_hf=ratio))
                print(f"{name:<10} {batch:>5} {'pagedgpt2-' + mode:<20} {ours[0]:>10.0f} {ours[1]:>8.2f} {ratio:>7.2f}", flush=True)
            del eng
    if args.json:
        Path(args.json).write_text(json.dumps(dict(card=card_name(args.device), dtype=dtype, rows=rows), indent=1))


if __name__ == "__main__":
    main()
