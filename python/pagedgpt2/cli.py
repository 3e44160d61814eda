"""The `pagedgpt2` command line: `pagedgpt2 generate [--model DIR] "prompt"` streams the answer
(without --model, from the bundled Shakespeare model)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pagedgpt2.engine import DEVICES, DTYPES, Engine
from pagedgpt2.kv_cache import KV_CACHE_MODES
from pagedgpt2.sampling import SamplingParams


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedgpt2", description="GPT-2 inference over a paged KV cache")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, printing tokens as they come")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None,
                     help="a converted model directory, a Hugging Face GPT-2 directory, or a hub name "
                          "(e.g. gpt2); default: the bundled 7M-parameter Shakespeare model")
    gen.add_argument("--device", default="auto", choices=DEVICES)
    gen.add_argument("--dtype", default=None, choices=DTYPES)
    gen.add_argument("--kv-cache", default="paged", choices=KV_CACHE_MODES)
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    return parser


def _model_path(model: str | None) -> Path | None:
    """A local directory as is; otherwise a hub name, downloaded when the hub is reachable;
    None (the bundled model) as is."""
    if model is None:
        return None
    path = Path(model)
    if path.exists():
        return path
    from pagedgpt2.convert import resolve_source
    return resolve_source(model)


def generate(args) -> None:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, ignore_eos=args.ignore_eos)
    eng = Engine(_model_path(args.model), device=args.device, dtype=args.dtype, kv_cache=args.kv_cache)
    sys.stdout.write(args.prompt)
    for piece in eng.stream(args.prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        generate(args)
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, RuntimeError,
            ConnectionError, ImportError) as e:
        print(f"pagedgpt2: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
