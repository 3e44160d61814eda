"""Trains the engine's default small GPT-2 on the Shakespeare + Milton tokens (owns the
hyperparameters, the training loop and the training report).

Usage: python tools/train_small_gpt2.py DATA_DIR OUT_DIR [--device cuda|cpu] [--max-steps N]
                                        [--seconds S] [--force]

DATA_DIR is the output of tools/shakespeare_data.py (train.bin, val.bin, manifest.json). The
model is a genuine transformers GPT2LMHeadModel (GPT-2 vocabulary, learned position embeddings,
tied LM head). Writes ``OUT_DIR/hf`` (save_pretrained: float32, safetensors; convert it with
tools/convert_hf.py) and ``OUT_DIR/report.json`` (parameters, tokens seen, time, device, final
validation loss and perplexity, hyperparameters, samples).

Batches are random contiguous windows of train.bin drawn with a seeded generator. The validation
loss is the metric of tools/eval_perplexity.py (whole val.bin, non-overlapping windows,
token-weighted, float32), measured every EVAL_EVERY steps and at the end. Training stops at
MAX_STEPS or after --seconds; the learning-rate schedule is laid out over MAX_STEPS.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from eval_perplexity import hf_loss_sum, load_tokens  # noqa: E402  (the one definition of the metric)

# ---------------------------------------------------------------- hyperparameters


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    # model: GPT-2 architecture, ~7.3M parameters, ~14.5 MB in float16
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 256
    vocab_size: int = 50257
    dropout: float = 0.0
    initializer_range: float = 0.02
    # data
    context: int = 256
    batch_size: int = 32
    # optimizer: AdamW, linear warmup then cosine decay to min_lr at max_steps
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1   # on matrices and embeddings only, not on biases or LayerNorms
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # run
    max_steps: int = 3000
    seconds: float = 600.0      # wall-clock cap on the training loop
    eval_every: int = 250
    log_every: int = 50
    seed: int = 1234
    bf16_autocast: bool = True  # on CUDA only; evaluation is always float32
    compile: bool = False       # torch.compile stays off


SAMPLE_PROMPTS = ("ROMEO:", "JULIET:", "Of Man's first disobedience")
SAMPLE_NEW_TOKENS = 64
SAMPLE_TEMPERATURE = 0.8
SAMPLE_TOP_K = 40


def make_config(overrides: dict | None = None) -> TrainConfig:
    """TrainConfig with overrides applied; unknown names are an error."""
    overrides = dict(overrides or {})
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}; known: {sorted(known)}")
    cfg = dataclasses.replace(TrainConfig(), **overrides)
    if cfg.context > cfg.n_positions:
        raise ValueError(f"context {cfg.context} exceeds n_positions {cfg.n_positions}")
    if cfg.n_embd % cfg.n_head:
        raise ValueError(f"n_embd {cfg.n_embd} is not divisible by n_head {cfg.n_head}")
    if cfg.compile:
        raise ValueError("torch.compile is not supported by this script; keep compile=False")
    return cfg

# ---------------------------------------------------------------- pieces


def build_model(cfg: TrainConfig):
    """A fresh GPT2LMHeadModel of cfg's shape (fp32, tied LM head, no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
        n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
        resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
        initializer_range=cfg.initializer_range, bos_token_id=50256, eos_token_id=50256,
        tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def count_params(model) -> int:
    """Distinct parameters (the tied LM head counted once)."""
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model, cfg: TrainConfig):
    """AdamW, weight decay on tensors of 2+ dimensions only."""
    import torch

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of step (0-based): linear warmup, then cosine from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * progress))


def sample_batch(data, batch_size: int, context: int, generator):
    """(inputs, targets), each [batch_size, context]: random contiguous windows of data."""
    import torch

    starts = torch.randint(0, data.numel() - context, (batch_size, 1), generator=generator)
    rows = data[(starts + torch.arange(context + 1)).to(data.device)]
    return rows[:, :-1], rows[:, 1:]


def evaluate(model, val: np.ndarray, cfg: TrainConfig, device: str) -> float:
    """Validation loss (nats/token) over all of val, float32."""
    model.eval()
    total, count = hf_loss_sum(model, val, cfg.context, device)
    model.train()
    return total / count


def device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def generate_samples(model, device: str, seed: int) -> list[dict]:
    """A greedy and a sampled continuation of each SAMPLE_PROMPTS prompt (within n_positions)."""
    import torch
    from pagedgpt2.tokenizer import get_tokenizer

    tok = get_tokenizer()
    model.eval()
    out = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt)], device=device)
        new_tokens = min(SAMPLE_NEW_TOKENS, model.config.n_positions - ids.shape[1])
        row = {"prompt": prompt}
        for mode, kwargs in (("greedy", {"do_sample": False}),
                             ("sampled", {"do_sample": True, "temperature": SAMPLE_TEMPERATURE,
                                          "top_k": SAMPLE_TOP_K})):
            torch.manual_seed(seed)
            with torch.no_grad():
                gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     pad_token_id=tok.eot_token, eos_token_id=tok.eot_token, **kwargs)
            row[mode] = tok.decode(gen[0, ids.shape[1]:].tolist())
        out.append(row)
    return out


def _resolve_device(device: str) -> str:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no CUDA GPU; pass --device cpu for a CPU run")
    return device

# ---------------------------------------------------------------- the run


def train(data_dir: str | Path, out_dir: str | Path, device: str = "cuda", *,
          max_steps: int | None = None, seconds: float | None = None,
          config_overrides: dict | None = None, force: bool = False, log=print) -> dict:
    """Train, save OUT_DIR/hf and OUT_DIR/report.json, return the report."""
    import torch

    overrides = dict(config_overrides or {})
    overrides.update({k: v for k, v in (("max_steps", max_steps), ("seconds", seconds)) if v is not None})
    cfg = make_config(overrides)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    device = _resolve_device(device)
    train_np, val_np = load_tokens(data_dir / "train.bin"), load_tokens(data_dir / "val.bin")
    if train_np.size <= cfg.context + 1:
        raise ValueError(f"train.bin has {train_np.size} tokens; need more than context + 1 = {cfg.context + 1}")
    hf_dir = _prepare_out(out_dir, force)

    torch.manual_seed(cfg.seed)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_model(cfg).to(device).train()
    opt = make_optimizer(model, cfg)
    data = torch.from_numpy(train_np.astype(np.int64)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda" and cfg.bf16_autocast)
    log(f"model: {count_params(model):,} parameters; train {train_np.size:,} tokens, val {val_np.size:,}; "
        f"device {device_name(device)}")

    history, step, t0 = [], 0, time.perf_counter()
    while step < cfg.max_steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = sample_batch(data, cfg.batch_size, cfg.context, gen)
        with autocast:
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.perf_counter() - t0
        if step % cfg.log_every == 0 or step == 1:
            log(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step - 1, cfg):.2e}  "
                f"{elapsed:7.1f}s  {step / elapsed:.2f} steps/s")
        if step % cfg.eval_every == 0 and step < cfg.max_steps:
            history.append(_eval_point(model, val_np, cfg, device, step, t0, log))
        if elapsed >= cfg.seconds:
            log(f"time budget of {cfg.seconds:g}s reached at step {step}")
            break
    if device == "cuda":
        torch.cuda.synchronize()
    train_seconds = time.perf_counter() - t0
    log(f"trained {step} steps in {train_seconds:.1f}s: {step / train_seconds:.3g} steps/s, "
        f"{step * cfg.batch_size * cfg.context / train_seconds:,.0f} tokens/s")
    history.append(_eval_point(model, val_np, cfg, device, step, t0, log))

    model.save_pretrained(hf_dir)
    report = _report(cfg, model, device, step, train_seconds, history, data_dir, train_np, val_np)
    report["samples"] = generate_samples(model, device, cfg.seed)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    log(f"final val loss {report['final_val_loss']:.4f}  perplexity {report['final_val_perplexity']:.2f}; "
        f"wrote {hf_dir} and {out_dir / 'report.json'}")
    return report


def _eval_point(model, val_np, cfg, device, step, t0, log) -> dict:
    loss = evaluate(model, val_np, cfg, device)
    log(f"step {step:5d}  val loss {loss:.4f}  perplexity {math.exp(loss):.2f}")
    return {"step": step, "seconds": round(time.perf_counter() - t0, 2), "val_loss": loss}


def _prepare_out(out_dir: Path, force: bool) -> Path:
    """OUT_DIR/hf, refusing to overwrite an earlier run unless force."""
    hf_dir = out_dir / "hf"
    if hf_dir.exists() or (out_dir / "report.json").exists():
        if not force:
            raise FileExistsError(f"{out_dir} already holds a run; pass --force to replace it")
        shutil.rmtree(hf_dir, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    return hf_dir


def _report(cfg, model, device, steps, train_seconds, history, data_dir, train_np, val_np) -> dict:
    import torch
    import transformers

    n_params = count_params(model)
    final = history[-1]["val_loss"]
    manifest_path = data_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    return {
        "params": n_params,
        "params_without_embeddings": n_params - model.transformer.wte.weight.numel()
        - model.transformer.wpe.weight.numel(),
        "float16_bytes": 2 * n_params,
        "steps": steps,
        "tokens_seen": steps * cfg.batch_size * cfg.context,
        "train_tokens": int(train_np.size),
        "epochs": round(steps * cfg.batch_size * cfg.context / train_np.size, 3),
        "train_seconds": round(train_seconds, 2),
        "device": device,
        "device_name": device_name(device),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "final_val_loss": final,
        "final_val_perplexity": math.exp(final),
        "val_tokens": int(val_np.size),
        "val_metric": f"non-overlapping windows of {cfg.context}, token-weighted mean NLL, float32",
        "val_history": history,
        "hyperparameters": dataclasses.asdict(cfg),
        "data": {"dir": str(data_dir), "sdist_sha256": manifest.get("source", {}).get("sha256"),
                 "val_works": [w["work"] for w in manifest.get("splits", {}).get("val", {}).get("works", [])]},
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--max-steps", type=int, help=f"default {TrainConfig.max_steps}")
    ap.add_argument("--seconds", type=float, help=f"training time cap, default {TrainConfig.seconds:g}")
    ap.add_argument("--force", action="store_true", help="replace an earlier run in OUT_DIR")
    args = ap.parse_args(argv)
    try:
        train(args.data_dir, args.out_dir, args.device, max_steps=args.max_steps, seconds=args.seconds,
              force=args.force, log=lambda line: print(line, flush=True))
    except (OSError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
