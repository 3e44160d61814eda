"""Plots for docs/benchmarks.md from the JSON the benchmarks write (docs/results/*.json).

    python tools/plot_benchmarks.py   # needs matplotlib (a docs tool, not a dependency)
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs"
RESULTS = DOCS / "results"


def load(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def tokens_vs_batch() -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, style in (("h200_bench_gpt2.json", "-"), ("h200_bench_gpt2xl.json", "--")):
        data = load(name)
        for engine in ("hf-eager", "pagedgpt2-paged", "pagedgpt2-contiguous"):
            rows = [r for r in data["rows"] if r["engine"] == engine]
            if rows:
                ax.plot([r["batch"] for r in rows], [r["tok_s"] for r in rows], style, marker="o",
                        label=f"{rows[0]['model']} {engine}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch (sequences)")
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"{data['card']}, fp16, 128-token prompts, 128 new tokens")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "tokens_vs_batch.png", dpi=110)


def step_vs_context() -> None:
    data = load("h200_bench_kernels.json")
    steps = data["steps"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ctx = [s["context"] for s in steps]
    ax.plot(ctx, [s["paged_ms"] for s in steps], marker="o", label="paged (block 16)")
    ax.plot(ctx, [s["contiguous_ms"] for s in steps], marker="s", label="contiguous")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode step (ms), batch 64")
    ax.set_title(f"gpt2 decode step vs context, {data['card']}, fp16")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "step_vs_context.png", dpi=110)


def serving() -> None:
    data = load("h200_bench_serving.json")
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.6))
    modes = ["paged", "contiguous"]
    a.bar(modes, [data[m]["tok_s"] for m in modes], color=["tab:blue", "tab:gray"])
    a.set_ylabel("output tokens/s")
    a.set_title(f"{data['requests']} requests, {data['kv_gib']} GiB of KV")
    for m in modes:
        b.plot([16 * i for i in range(len(data[m]["running_trace"]))], data[m]["running_trace"], label=m)
    b.set_xlabel("step")
    b.set_ylabel("running sequences")
    b.set_title("concurrency over the run")
    b.legend()
    sweep = sorted([{"kv_gib": data["kv_gib"], "paged": data["paged"], "contiguous": data["contiguous"]}]
                   + data.get("kv_sweep", []), key=lambda r: r["kv_gib"])
    gib = [r["kv_gib"] for r in sweep]
    c.plot(gib, [r["paged"]["tok_s"] / r["contiguous"]["tok_s"] for r in sweep], marker="o", label="throughput")
    c.plot(gib, [r["paged"]["max_running"] / r["contiguous"]["max_running"] for r in sweep], marker="s",
           label="peak running sequences")
    c.axhline(2, color="gray", ls=":", lw=1)
    c.set_xscale("log", base=2)
    c.set_xlabel("KV memory of both modes (GiB)")
    c.set_ylabel("paged / contiguous")
    c.set_title("gain of paging vs KV budget")
    c.legend()
    fig.suptitle(f"gpt2 fp16 serving workload, {data['card']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / "serving.png", dpi=110)


def sharing() -> None:
    data = load("h200_bench_serving.json")
    fig, ax = plt.subplots(figsize=(5, 3.4))
    labels = ["n=4 samples", "shared 512-token prefix"]
    ax.bar(labels, [data["n4"]["max_saved_blocks"], data["prefix"]["max_saved_blocks"]], color="tab:green")
    ax.set_ylabel("blocks saved by sharing (peak)")
    ax.set_title("KV blocks shared instead of copied", fontsize=10)
    fig.tight_layout()
    fig.savefig(DOCS / "sharing.png", dpi=110)


def bundled_training() -> None:
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for name in ("bundled_model_train.json", "bundled_model_train_6000_steps.json"):
        data = load(name)
        hist = data["val_history"]
        ax.plot([h["step"] for h in hist], [math.exp(h["val_loss"]) for h in hist], marker=".",
                label=f"{data['steps']} steps ({data['epochs']:.0f} epochs)")
    ax.set_xlabel("training step (32 x 256 tokens)")
    ax.set_ylabel("held-out perplexity")
    ax.set_ylim(top=200)
    ax.set_title(f"bundled 4-layer GPT-2, {data['device_name']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(DOCS / "bundled_training.png", dpi=110)


def preloaded_gemv() -> None:
    data = load("h200_preloaded_gemv.json")
    fig, ax = plt.subplots(figsize=(6, 3.8))
    widths = data["widths"]
    for label, us in data["series"].items():
        ax.plot(widths, us, marker="o", label=label)
    # a layer's four fp16 weights: QKV 3 C^2, proj C^2, fc and fc_proj 4 C^2 each
    roofline = [12 * c * c * 2 / 1e3 / data["copy_gbs"] for c in widths]
    ax.plot(widths, roofline, "k--", label="weights at the copy bandwidth")
    ax.set_xticks(widths)
    ax.set_xlabel("model width (768: gpt2, 1280: gpt2-large, 1600: gpt2-xl)")
    ax.set_ylabel("us a layer (four GEMVs, batch 1)")
    ax.set_title(f"{data['card']}: the preloaded GEMV's chain of waits", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(DOCS / "preloaded_gemv.png", dpi=110)


if __name__ == "__main__":
    bundled_training()
    tokens_vs_batch()
    step_vs_context()
    serving()
    sharing()
    preloaded_gemv()
