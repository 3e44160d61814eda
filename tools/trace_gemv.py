"""Where a batch-1 decode step's GEMVs spend their time, block by block (needs a trace build).

The skinny GEMV records, for every thread block, when it started, passed pdl_wait, had x staged
(and normalized, with a LayerNorm prologue) and ended (cpp/cuda/stage_trace.cuh; build with
`pip install -C cmake.define.PAGEDGPT2_TRACE=ON .`). This tool runs greedy decode steps at batch
1, groups the records into launches and prints, per GEMV of a layer, what sets the step's
critical path: every time is in microseconds after the end of the traced launch before it (for
proj, that is the QKV GEMV, so attention is inside its figures), medians over the steps' layers:

    early   blocks that started before that end (resident while the kernel before still ran)
    start   when the last block started
    waited  when the last block passed pdl_wait
    staged  when the last block had x staged
    mult    when the last block's warp 0 had the products of its first rows (its weights in)
    end     when the last block ended: the GEMV's share of the step
    crit    stage lengths of the block that ended last, from its SM's own clock: start -> waited,
            waited -> staged, staged -> multiplied, multiplied -> end

    python tools/trace_gemv.py --model gpt2 gpt2-xl
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

CAPACITY = 1 << 18  # records the trace holds (kStageTraceCapacity); later blocks are dropped
# Columns of ops.stage_trace().
N, K, ROWS, BLOCK, SM = range(5)
# %globaltimer (ns): start, pdl_wait passed, x staged, first products, end
G0, G1, G2, G3, G4 = range(5, 10)
C0, C1, C2, C3, C4 = range(10, 15)  # clock64 of the block's SM at the same stages


def launches(records: np.ndarray) -> list[np.ndarray]:
    """The records split into launches, in start order. A launch has each block id once, and a
    block of launch i starts before the same block of the next launch of that GEMV, so the i-th
    record (by start) of block b of a shape belongs to that shape's i-th launch."""
    out = []
    for shape in sorted({(int(r[N]), int(r[K]), int(r[ROWS])) for r in records}):
        mine = records[(records[:, N] == shape[0]) & (records[:, K] == shape[1]) & (records[:, ROWS] == shape[2])]
        mine = mine[np.argsort(mine[:, G0], kind="stable")]
        seen: dict[int, int] = {}
        index = np.empty(len(mine), dtype=np.int64)
        for i, block in enumerate(mine[:, BLOCK]):
            index[i] = seen.get(int(block), 0)
            seen[int(block)] = index[i] + 1
        out += [mine[index == i] for i in range(int(index.max()) + 1)]
    return sorted(out, key=lambda launch: int(launch[:, G0].min()))


def cycles_per_ns(records: np.ndarray) -> float:
    """The SMs' clock against %globaltimer, from blocks that ran at least 2 us."""
    ns = records[:, G4].astype(np.float64) - records[:, G0]
    cycles = records[:, C4].astype(np.float64) - records[:, C0]
    long = ns >= 2000
    return float(np.median(cycles[long] / ns[long])) if long.any() else 1.0


def launch_figures(launch: np.ndarray, prev_end: int, clock: float) -> dict:
    """One launch's figures (us after prev_end, the end of the traced launch before it)."""
    us = lambda t: (int(t) - prev_end) / 1e3  # noqa: E731
    crit = launch[np.argmax(launch[:, G4])]
    stage = lambda a, b: float(int(crit[b]) - int(crit[a])) / clock / 1e3  # noqa: E731
    return dict(blocks=len(launch), early=float(np.mean(launch[:, G0].astype(np.int64) < prev_end)),
                start=us(launch[:, G0].max()), waited=us(launch[:, G1].max()),
                staged=us(launch[:, G2].max()), mult=us(launch[:, G3].max()), end=us(launch[:, G4].max()),
                crit_wait=stage(C0, C1), crit_stage=stage(C1, C2), crit_mult=stage(C2, C3),
                crit_tail=stage(C3, C4))


def gemv_name(n: int, k: int, c: int, vocab_min: int = 50000) -> str:
    if n >= vocab_min:
        return "LM head"
    return {(3 * c, c): "ln_1+QKV", (c, c): "proj", (4 * c, c): "ln_2+fc", (c, 4 * c): "fc_proj"}.get((n, k), f"{n}x{k}")


def summarize(records: np.ndarray, c: int) -> dict[str, dict]:
    """Median figures per GEMV of a layer (and the LM head) over the launches after the first."""
    clock = cycles_per_ns(records)
    order = launches(records)
    rows: dict[str, list[dict]] = {}
    for prev, launch in zip(order, order[1:]):
        name = gemv_name(int(launch[0, N]), int(launch[0, K]), c)
        rows.setdefault(name, []).append(launch_figures(launch, int(prev[:, G4].max()), clock))
    return {name: {key: statistics.median(f[key] for f in figs) for key in figs[0]} | {"launches": len(figs)}
            for name, figs in rows.items()}


def print_table(model: str, table: dict[str, dict]) -> None:
    print(f"{model}: us after the end of the traced GEMV before (proj: after QKV, attention inside)")
    print(f"{'GEMV':<9} {'n':>4} {'blocks':>6} {'early':>6} {'start':>6} {'waited':>6} {'staged':>6} {'mult':>6}"
          f" {'end':>6}   crit: {'wait':>5} {'stage':>5} {'mult':>5} {'tail':>5}")
    for name in ("ln_1+QKV", "proj", "ln_2+fc", "fc_proj", "LM head"):
        if name in table:
            f = table[name]
            print(f"{name:<9} {f['launches']:>4} {f['blocks']:>6.0f} {f['early']:>6.0%} {f['start']:>6.2f} "
                  f"{f['waited']:>6.2f} {f['staged']:>6.2f} {f['mult']:>6.2f} {f['end']:>6.2f}   "
                  f"      {f['crit_wait']:>5.2f} {f['crit_stage']:>5.2f} {f['crit_mult']:>5.2f} "
                  f"{f['crit_tail']:>5.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["gpt2"])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    args = p.parse_args()

    from bench import CONFIGS, card_name, make_engine, make_model_dir

    from pagedgpt2 import SamplingParams, _cuda

    ops = _cuda.ops
    if not ops.stage_trace_built():
        sys.exit("this build has no stage trace: pip install -C cmake.define.PAGEDGPT2_TRACE=ON .")
    print(f"card: {card_name('cuda')}; batch 1, {args.prompt_len}-token prompt, {args.new_tokens} greedy steps")
    for name in args.model:
        eng = make_engine(make_model_dir(name, args.workdir), "cuda", "float16", "paged", 1)
        prompt = [[(13 * j) % 50000 + 1 for j in range(args.prompt_len)]]
        params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
        eng.generate(prompt, params)  # warm-up
        ops.stage_trace_reset()
        eng.generate(prompt, params)
        records = np.asarray(ops.stage_trace())
        if len(records) >= CAPACITY:
            print(f"the trace filled its {CAPACITY} records: only the first steps are in it")
        records = records[records[:, ROWS] == 1]  # the decode steps' GEMVs
        stamps = np.unique(records[:, G0:G4 + 1])
        print(f"{len(records)} block records; smallest %globaltimer step {int(np.diff(stamps).min())} ns; "
              f"SM clock {cycles_per_ns(records):.2f} cycles/ns")
        print_table(name, summarize(records, CONFIGS[name]["n_embd"]))
        del eng


if __name__ == "__main__":
    main()
