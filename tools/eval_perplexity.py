"""Validation perplexity of a model on a token file (owns the metric: the window layout and the
token-weighted loss, for our Engine and for Hugging Face transformers alike).

Usage: python tools/eval_perplexity.py MODEL_DIR VAL_BIN [--hf HF_DIR] [--context 256]
                                      [--device cpu|cuda]

The tokens (uint16, as written by tools/shakespeare_data.py) are cut into consecutive,
non-overlapping windows of ``context`` tokens (the last one may be shorter; a 1-token tail is
dropped). In each window the tokens at positions 1..n-1 are predicted from the ones before them,
so every window starts with a fresh context. Loss = total negative log-likelihood / number of
predicted tokens (nats), perplexity = exp(loss). MODEL_DIR is scored by our Engine in float32;
with --hf, HF_DIR is scored by transformers' GPT2LMHeadModel in float32 too, and the two
perplexities are compared to 4 significant digits.
"""

from __future__ import annotations

import argparse
import math
import sys
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
    from pagedgpt2 import Engine

    eng = Engine(model_dir, device=device, dtype="float32")
    _check_context(context, eng.config["n_positions"], model_dir)
    total, count = 0.0, 0
    for s, e in windows(tokens.size, context):
        ids = tokens[s:e].astype(np.int64)
        total += nll_from_logits(eng.logits(ids.tolist()), ids)
        count += e - s - 1
    return total / count, count


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


def hf_loss(hf_dir: str | Path, tokens: np.ndarray, context: int, device: str = "cpu") -> tuple[float, int]:
    """(mean loss, tokens predicted) of an HF GPT-2 checkpoint directory, float32."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(hf_dir).float().to(device).eval()
    _check_context(context, model.config.n_positions, hf_dir)
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
    args = ap.parse_args(argv)
    try:
        tokens = load_tokens(args.val_bin)
        ours, count = engine_loss(args.model_dir, tokens, args.context, args.device)
        print(f"engine: loss {ours:.6f}  perplexity {math.exp(ours):.6g}  ({count:,} tokens predicted, "
              f"{len(windows(tokens.size, args.context))} windows of {args.context})")
        if args.hf:
            ref, _ = hf_loss(args.hf, tokens, args.context, args.device)
            same = agree(math.exp(ours), math.exp(ref))
            print(f"hf:     loss {ref:.6f}  perplexity {math.exp(ref):.6g}")
            print(f"relative difference in perplexity {abs(math.exp(ours - ref) - 1):.2e}; "
                  f"agree to 4 significant digits: {'yes' if same else 'NO'}")
            return 0 if same else 2
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
