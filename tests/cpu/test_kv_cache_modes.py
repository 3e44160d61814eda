"""Paged and contiguous caching compute the same function; so do all block sizes."""

from __future__ import annotations

import numpy as np
import pytest

from pagedgpt2 import Engine, SamplingParams


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(5)
    return [rng.integers(0, 1000, size=n).tolist() for n in (3, 14, 30, 1, 21)]


def run(engine_dir, prompts, **kwargs):
    eng = Engine(engine_dir, device="cpu", **kwargs)
    params = [SamplingParams(max_new_tokens=20, temperature=0.0, ignore_eos=True),
              SamplingParams(max_new_tokens=13, temperature=0.8, top_k=50, top_p=0.9, seed=11, ignore_eos=True)]
    outs = eng.generate(prompts, [params[i % 2] for i in range(len(prompts))])
    assert eng.kv_stats()["blocks_used"] == 0
    return [o.token_ids for o in outs], eng


def test_paged_equals_contiguous_and_every_block_size(hf_model_dirs, prompts):
    engine_dir = hf_model_dirs["d48"][2]
    reference, _ = run(engine_dir, prompts, kv_cache="contiguous")
    for block_size in (1, 16, 7):  # 7 divides none of the lengths
        tokens, _ = run(engine_dir, prompts, block_size=block_size)
        assert tokens == reference, f"block_size={block_size}"


def test_logits_equal_across_modes(hf_model_dirs):
    engine_dir = hf_model_dirs["d48"][2]
    ids = np.random.default_rng(6).integers(0, 1000, size=50).tolist()
    ref = Engine(engine_dir, device="cpu", kv_cache="contiguous").logits(ids)
    for block_size in (1, 7, 16):
        np.testing.assert_allclose(Engine(engine_dir, device="cpu", block_size=block_size).logits(ids),
                                   ref, rtol=0, atol=1e-5)


def test_a_small_pool_runs_the_batch_in_waves(hf_model_dirs, prompts):
    """A pool that holds two sequences at a time still gives every request its full answer."""
    engine_dir = hf_model_dirs["d48"][2]
    reference, _ = run(engine_dir, prompts)
    tokens, eng = run(engine_dir, prompts, block_size=8, num_blocks=11)  # 2 x ceil(50 / 8) = 14 > 11
    assert tokens == reference


def test_paged_reserves_less_memory_than_contiguous(hf_model_dirs):
    engine_dir = hf_model_dirs["d48"][2]
    stats = {}
    for mode in ("paged", "contiguous"):
        eng = Engine(engine_dir, device="cpu", kv_cache=mode, block_size=16)
        seq = [1, 2, 3, 4, 5]
        eng.kv.manager.add_sequence(999)
        eng.kv.manager.append_slots(999, seq)
        stats[mode] = eng.kv_stats()
    assert stats["paged"]["bytes_holding_tokens"] == stats["contiguous"]["bytes_holding_tokens"]
    # 5 tokens: one block of 16 vs one buffer of n_positions = 96 tokens.
    assert stats["contiguous"]["bytes_reserved"] == 6 * stats["paged"]["bytes_reserved"]
