"""A/B decode throughput of engine settings, in one process.

Each setting is a space-separated list of NAME=VALUE pairs: upper-case names are environment
variables the engine reads when it is built (e.g. "PAGEDGPT2_L2_PREFETCH_MB=16"), lower-case ones
Engine arguments, as Python literals (e.g. "async_decode=False max_num_batched_tokens=8192").
One engine is built per setting and model, then the settings are timed in turn, round after
round, so that slow drifts of the host hit them alike. Prints the median decode tokens/s of each
and its ratio to the first.

    python tools/bench_env.py --model gpt2 gpt2-xl --batch-sizes 1 \\
        --setting "PAGEDGPT2_L2_PREFETCH_MB=0" --setting "PAGEDGPT2_L2_PREFETCH_MB=16"
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import (CONFIGS, bench_engine, card_name, engine_args, make_engine,  # noqa: E402
                   make_model_dir, parse_setting)


def build_engine(model_dir, setting: dict[str, str], dtype: str, max_batch: int):
    env = {name: value for name, value in setting.items() if name.isupper()}
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        return make_engine(model_dir, "cuda", dtype, "paged", max_batch, **engine_args(setting))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", nargs="+", default=["gpt2"], choices=sorted(CONFIGS))
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    ap.add_argument("--setting", action="append", required=True,
                    help="NAME=VALUE pairs, space-separated; repeat for each setting")
    ap.add_argument("--dtype", default="float16")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    args = ap.parse_args()
    settings = [parse_setting(s) for s in args.setting]

    print(f"card: {card_name('cuda')}; {args.prompt_len}-token prompts, {args.new_tokens} new tokens, "
          f"{args.rounds} rounds, median")
    print(f"{'model':<8} {'batch':>5}  {'setting':<48} {'tok/s':>9} {'ms/step':>8} {'ratio':>6}")
    for name in args.model:
        model_dir = make_model_dir(name, args.workdir)
        max_batch = max(args.batch_sizes)
        engines = [build_engine(model_dir, s, args.dtype, max_batch) for s in settings]
        for batch in args.batch_sizes:
            prompts = [[(7 * i + 13 * j) % 50000 + 1 for j in range(args.prompt_len)]
                       for i in range(batch)]
            rates = [[] for _ in settings]
            for _ in range(args.rounds):
                for eng, out in zip(engines, rates):
                    out.append(bench_engine(eng, batch, prompts, args.new_tokens, 1)[0])
            base = statistics.median(rates[0])
            for setting, out in zip(args.setting, rates):
                rate = statistics.median(out)
                print(f"{name:<8} {batch:>5}  {setting:<48} {rate:>9,.0f} "
                      f"{batch / rate * 1e3:>8.3f} {rate / base:>6.2f}")
        del engines


if __name__ == "__main__":
    main()
