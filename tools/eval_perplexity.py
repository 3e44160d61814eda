"""Validation perplexity of a model on a token file (owns the metric: the window layout and the
token-weighted loss, for our Engine and for Hugging Face transformers alike).

Usage: python tools/eval_perplexity.py MODEL_DIR VAL_BIN [--hf HF_DIR] [--context 256]
                                      [--device cpu|cuda] [--top1 float16 bfloat16 ...]

The tokens (uint16, as written by tools/shakespeare_data.py) are cut into consecutive,
non-overlapping windows of ``context`` tokens (the last one may be shorter; a 1-token tail is
dropped). In each window the tokens at positions 1..n-1 are predicted from the ones before them,
so every window starts with a fresh context. Loss = total negative log-likelihood / number of
predicted tokens (nats), perplexity = exp(loss). MODEL_DIR is scored by our Engine in float32;
with --hf, HF_DIR is scored by transformers' GPT2LMHeadModel in float32 too, and the two
perplexities are compared to 4 significant digits. --top1 DTYPE... (with --hf) also reports
teacher-forced top-1 agreement: the fraction of predicted positions where our Engine in DTYPE
picks the same next token as HF in float32.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

DEFAULT_CONTEXT = 256
HF_BATCH = 16


def load_tokens(path: str | Path) -> np.ndarray:
    """uint16 token ids of a .bin file."""
    tokens = np.fromfile(path, dtype=np.uint16)
    if tokens.size < 2:
        raise ValueError(f"{path}: {tokens.size} tokens, need at least 2")
    return tokens


def windows(n_tokens: int, context: int) -> list[tuple[int, int]]:
    """[start, end) of the non-overlapping windows over n_tokens; windows of 1 token are dropped."""
    if context < 2:
        raise ValueError(f"context must be >= 2, got {context}")
    return [(s, min(s + context, n_tokens)) for s in range(0, n_tokens, context) if n_tokens - s >= 2]


def nll_from_logits(logits: np.ndarray, ids: np.ndarray) -> float:
    """Sum over positions 1..n-1 of -log p(ids[t] | ids[:t]) given [n, V] logits (float64 math)."""
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=1)
    logz = m + np.log(np.exp(x - m[:, None]).sum(axis=1))
    return float((logz - x[np.arange(len(x)), ids[1:]]).sum())


def engine_loss(model_dir: str | Path, tokens: np.ndarray, context: int, device: str = "cpu") -> tuple[float, int]:
    """(mean loss, tokens predicted) of our Engine, float32, on every window."""
    total, count = 0.0, 0
    spans = windows(tokens.size, context)
    for (s, e), logits in zip(spans, engine_windows_logits(model_dir, tokens, context, device)):
        total += nll_from_logits(logits, tokens[s:e].astype(np.int64))
        count += e - s - 1
    return total / count, count


def engine_windows_logits(model_dir: str | Path, tokens: np.ndarray, context: int, device: str = "cpu",
                          dtype: str = "float32") -> Iterator[np.ndarray]:
    """Our Engine's float32 logits [n, V] of each window, in window order."""
    from pagedgpt2 import Engine

    eng = Engine(model_dir, device=device, dtype=dtype)
    _check_context(context, eng.config["n_positions"], model_dir)
    for s, e in windows(tokens.size, context):
        yield eng.logits(tokens[s:e].astype(np.int64).tolist())


def hf_windows_argmax(model, tokens: np.ndarray, context: int, device: str = "cpu") -> list[np.ndarray]:
    """HF's top-1 next token [n] at every position of each window (model's own dtype)."""
    import torch

    out = []
    with torch.no_grad():
        for s, e in windows(tokens.size, context):
            ids = torch.from_numpy(tokens[s:e].astype(np.int64)).to(device)[None]
            out.append(model(ids).logits[0].argmax(-1).cpu().numpy())
    return out


def top1_agreement(model_dir: str | Path, hf_top1: list[np.ndarray], tokens: np.ndarray, context: int,
                   device: str, dtype: str) -> tuple[float, int]:
    """(fraction agreeing, positions compared): our Engine in dtype against HF's top-1 tokens at
    every predicting position (teacher forcing: both read the true tokens)."""
    logits = engine_windows_logits(model_dir, tokens, context, device, dtype)
    return _agreement(hf_top1, (window.argmax(-1) for window in logits))


def _agreement(refs: list[np.ndarray], preds) -> tuple[float, int]:
    """(fraction, count) of predicting positions (all but each window's last) where the top-1
    tokens of preds equal those of refs, window by window."""
    same = count = 0
    for ref, got in zip(refs, preds):
        same += int((got[:-1] == ref[:-1]).sum())
        count += len(ref) - 1
    return same / count, count


def hf_top1_agreement(model, hf_top1: list[np.ndarray], tokens: np.ndarray, context: int, device: str,
                      dtype: str) -> float:
    """Fraction of predicting positions where HF itself, cast to dtype, keeps its float32 top-1
    token: the yardstick for the engine's agreement in that dtype."""
    import copy

    import torch

    low = copy.deepcopy(model).to(getattr(torch, dtype))
    return _agreement(hf_top1, hf_windows_argmax(low, tokens, context, device))[0]


def hf_loss_sum(model, tokens: np.ndarray, context: int, device: str = "cpu",
                batch_size: int = HF_BATCH) -> tuple[float, int]:
    """(total NLL, tokens predicted) of a loaded HF causal LM on every window, as the model's
    dtype computes it (no autocast); the full windows go in batches."""
    import torch
    import torch.nn.functional as F

    spans = windows(tokens.size, context)
    full = [s for s, e in spans if e - s == context]
    groups = [[(s, s + context) for s in full[i:i + batch_size]] for i in range(0, len(full), batch_size)]
    groups += [[span] for span in spans if span[1] - span[0] != context]
    total, count = 0.0, 0
    with torch.no_grad():
        for group in groups:
            ids = torch.from_numpy(np.stack([tokens[s:e] for s, e in group]).astype(np.int64)).to(device)
            logits = model(ids).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), ids[:, 1:].reshape(-1),
                                  reduction="none")
            total += nll.double().sum().item()
            count += nll.numel()
    return total, count


def load_hf(hf_dir: str | Path, context: int, device: str = "cpu"):
    """An HF GPT-2 checkpoint directory as a float32 GPT2LMHeadModel in eval mode."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir).float().to(device).eval()
    _check_context(context, model.config.n_positions, hf_dir)
    return model


def hf_loss(model, tokens: np.ndarray, context: int, device: str = "cpu") -> tuple[float, int]:
    """(mean loss, tokens predicted) of a loaded HF GPT-2 model."""
    total, count = hf_loss_sum(model, tokens, context, device)
    return total / count, count


def agree(a: float, b: float, digits: int = 4) -> bool:
    """Whether a and b agree to `digits` significant digits: |a - b| is at most half a unit in
    the last of those digits of b."""
    if b == 0:
        return a == 0
    unit = 10.0 ** (math.floor(math.log10(abs(b))) - (digits - 1))
    return abs(a - b) <= unit / 2


def _check_context(context: int, n_positions: int, where) -> None:
    if context > n_positions:
        raise ValueError(f"--context {context} is longer than the model's n_positions {n_positions} ({where})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="pagedgpt2 model directory (or an HF directory the Engine loads)")
    ap.add_argument("val_bin", help="uint16 token file, e.g. val.bin from tools/shakespeare_data.py")
    ap.add_argument("--hf", help="also score this HF checkpoint directory with transformers")
    ap.add_argument("--context", type=int, default=DEFAULT_CONTEXT, help="window length in tokens")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--top1", nargs="+", default=[], choices=("float32", "float16", "bfloat16"),
                    help="with --hf: top-1 agreement of the Engine in these dtypes with HF float32")
    args = ap.parse_args(argv)
    if args.top1 and not args.hf:
        ap.error("--top1 needs --hf")
    try:
        tokens = load_tokens(args.val_bin)
        ours, count = engine_loss(args.model_dir, tokens, args.context, args.device)
        print(f"engine: loss {ours:.6f}  perplexity {math.exp(ours):.6g}  ({count:,} tokens predicted, "
              f"{len(windows(tokens.size, args.context))} windows of {args.context})")
        if args.hf:
            model = load_hf(args.hf, args.context, args.device)
            ref, _ = hf_loss(model, tokens, args.context, args.device)
            same = agree(math.exp(ours), math.exp(ref))
            print(f"hf:     loss {ref:.6f}  perplexity {math.exp(ref):.6g}")
            print(f"relative difference in perplexity {abs(math.exp(ours - ref) - 1):.2e}; "
                  f"agree to 4 significant digits: {'yes' if same else 'NO'}")
            hf_top1 = hf_windows_argmax(model, tokens, args.context, args.device) if args.top1 else []
            for dtype in args.top1:
                frac, n = top1_agreement(args.model_dir, hf_top1, tokens, args.context, args.device, dtype)
                line = f"top-1 agreement, engine {dtype} on {args.device} vs hf float32: {100 * frac:.2f}% of {n:,} positions"
                if dtype != "float32":
                    hf_frac = hf_top1_agreement(model, hf_top1, tokens, args.context, args.device, dtype)
                    line += f" (hf {dtype} itself: {100 * hf_frac:.2f}%)"
                print(line)
            return 0 if same else 2
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
