"""The engine against Hugging Face transformers on the same random weights (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import hf_greedy, hf_logits

from pagedgpt2 import Engine, SamplingParams

SHAPES = ["d16", "d48", "d64"]


@pytest.mark.parametrize("shape", SHAPES)
def test_logits_match_hf(hf_model_dirs, shape):
    model, _, engine_dir = hf_model_dirs[shape]
    eng = Engine(engine_dir, device="cpu")
    rng = np.random.default_rng(1)
    for length in (1, 7, model.config.n_positions):
        ids = rng.integers(0, model.config.vocab_size, size=length).tolist()
        ours, ref = eng.logits(ids), hf_logits(model, ids)
        assert ours.shape == ref.shape == (length, model.config.vocab_size)
        assert np.abs(ref).max() > 0.5  # logits of order 1, so 1e-4 is a real bound
        np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
    assert eng.kv_stats()["blocks_used"] == 0


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_greedy_matches_hf_per_prompt(hf_model_dirs, shape):
    model, _, engine_dir = hf_model_dirs[shape]
    eng = Engine(engine_dir, device="cpu", block_size=16)
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, model.config.vocab_size, size=n).tolist() for n in (1, 5, 17, 33, 16)]
    max_new = 24
    outs = eng.generate(prompts, SamplingParams(max_new_tokens=max_new, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(model, prompt, max_new)
        assert out.finish_reason == "length"
    assert eng.kv_stats()["blocks_used"] == 0


def test_loading_the_raw_hf_directory_equals_converted(hf_model_dirs):
    model, hf_dir, engine_dir = hf_model_dirs["d48"]
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    a = Engine(hf_dir, device="cpu").logits(ids)
    b = Engine(engine_dir, device="cpu").logits(ids)
    np.testing.assert_array_equal(a, b)


def test_text_prompts_and_stop_token(hf_model_dirs):
    model, _, engine_dir = hf_model_dirs["d16"]
    eng = Engine(engine_dir, device="cpu")
    ids = eng.tokenizer.encode("Alan Turing")
    first = hf_greedy(model, ids, 1)[0]
    # Make the first greedy token a stop token: generation must stop there and leave it out of text.
    out = eng.generate("Alan Turing", SamplingParams(max_new_tokens=8, temperature=0.0, stop_token_ids=[first]))[0]
    assert out.token_ids == [first] and out.finish_reason == "stop" and out.text == ""
    out = eng.generate(["Alan Turing", [15496, 995]], SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True))
    assert out[0].prompt_token_ids == ids and out[1].prompt_token_ids == [15496, 995]
    assert out[0].token_ids == hf_greedy(model, ids, 6)
    assert out[0].text == eng.tokenizer.decode(out[0].token_ids)
